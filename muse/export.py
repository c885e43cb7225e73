"""Export a Muse model to the formats other tools read: Hugging Face directories and GGUF.

    export_hf("runs/ft/last", "out/hf")          # transformers.AutoModelForCausalLM.from_pretrained("out/hf")
    export_gguf("runs/ft/last", "out/model.gguf", dtype="q8_0")   # llama.cpp, Ollama, LM Studio

Both take a loaded `muse.Model`, a bare `muse.Transformer`, or anything `muse.load` accepts
(a name or path, including a LoRA adapter directory). Quantized layers are dequantized and
LoRA adapters folded in first, so the export holds plain float weights of what the model
computes. Both write atomically: a temporary sibling is renamed into place when complete.

The Hugging Face side reuses `muse.checkpoints.hf.muse_to_hf` (the inverse of the loader);
the GGUF side inverts `muse.checkpoints.gguf_file` (llama.cpp tensor names, q/k rows
permuted back for llama, fused q/k/v and gate/up split again) and writes the tokenizer as
`tokenizer.ggml.*` metadata for byte-level BPE vocabularies.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from muse.config import ModelConfig
from muse.errors import MuseError
from muse.fileio import atomic_dir

GGUF_DTYPES = ("f32", "f16", "q8_0")


class ExportError(MuseError):
    """A model that the target format cannot represent."""


# ----------------------------------------------------------------------------- model → float state

def _resolve(model_or_path) -> tuple[nn.Module, Any, str]:
    """(Transformer, tokenizer or None, a name) from a Model, a Transformer or a name/path."""
    from muse.api import Model, load
    from muse.model import Transformer

    if isinstance(model_or_path, Model):
        return model_or_path.model, model_or_path.tokenizer, model_or_path.name
    if isinstance(model_or_path, Transformer):
        return model_or_path, None, "muse-model"
    if isinstance(model_or_path, (str, Path)):
        path = Path(model_or_path).expanduser()
        if (path / "adapter_config.json").is_file():
            from muse.api import load

            m = load(path, precision="fp32")
        else:
            m = load(model_or_path, precision="fp32")
        return m.model, m.tokenizer, Path(str(model_or_path)).name or m.name
    raise ValueError(f"model_or_path must be a muse.Model, a muse.Transformer or a name/path, "
                     f"got {type(model_or_path).__name__}")


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Muse parameter names → fp32 tensors of what `model` computes.

    QuantLinear layers are dequantized (their `weight`), LoRA layers folded (W + scale·B·A);
    the model itself is not modified.
    """
    from muse.quant import QuantLinear
    from muse.lora import LoRALinear

    state: dict[str, torch.Tensor] = {}
    special: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            state[f"{name}.weight"] = module.dequantize(torch.float32)
        elif isinstance(module, LoRALinear):
            state[f"{name}.weight"] = (module.base.weight.float() + module.delta().float()).detach()
            if module.base.bias is not None:
                state[f"{name}.bias"] = module.base.bias.detach().float()
        else:
            continue
        if getattr(module, "bias", None) is not None and isinstance(module, QuantLinear):
            state[f"{name}.bias"] = module.bias.detach().float()
        special.append(name + ".")
    for key, t in model.state_dict().items():
        if any(key.startswith(s) for s in special):
            continue
        state[key] = t.detach().float()
    return {k: v.contiguous() for k, v in state.items()}


# ----------------------------------------------------------------------------- Hugging Face

def _check_family(c: ModelConfig) -> None:
    """Refuse switch combinations the HF model class of `c.arch` cannot compute."""
    expect = {"norm": "layernorm", "pos": "learned", "mlp": "gelu"} if c.arch == "gpt2" else \
        {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu"}
    wrong = [f"{k}={getattr(c, k)!r}" for k, v in expect.items() if getattr(c, k) != v]
    if c.arch == "gpt2" and c.n_kv_head != c.n_head:
        wrong.append(f"n_kv_head={c.n_kv_head} (grouped-query attention)")
    if wrong:
        raise ExportError(f"This {c.arch} model uses {', '.join(wrong)}, which Hugging Face's {c.arch} "
                          f"architecture (and GGUF's) cannot express; set arch to the family those switches belong to.")


def hf_config(config: ModelConfig, tokenizer=None) -> dict[str, Any]:
    """The transformers config.json for a Muse config (model_type gpt2, llama or qwen2)."""
    c = config
    _check_family(c)
    special = _special_ids(tokenizer)
    if c.arch == "gpt2":
        hf = {
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": c.vocab_size,
            "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
            "n_head": c.n_head, "n_inner": c.intermediate_size, "layer_norm_epsilon": c.norm_eps,
            "activation_function": "gelu_new", "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        }
        if c.head_dim * c.n_head != c.n_embd:
            raise ExportError(f"GPT-2 needs head_dim * n_head == n_embd ({c.head_dim} * {c.n_head} != {c.n_embd})")
    else:
        hf = {
            "model_type": c.arch, "architectures": ["LlamaForCausalLM" if c.arch == "llama" else "Qwen2ForCausalLM"],
            "vocab_size": c.vocab_size, "hidden_size": c.n_embd, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head,
            "head_dim": c.head_dim, "max_position_embeddings": c.block_size, "rms_norm_eps": c.norm_eps,
            "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
            "hidden_act": "silu", "attention_dropout": 0.0,
        }
        if c.arch == "llama":
            # HF llama's attention_bias covers q, k, v and o; missing ones are written as zeros.
            hf.update(attention_bias=bool(c.qkv_bias or c.bias), mlp_bias=bool(c.bias))
    hf.update(tie_word_embeddings=c.tie_embeddings, torch_dtype="float32", dtype="float32",
              bos_token_id=special["bos"], eos_token_id=special["eos"], pad_token_id=special["pad"])
    return hf


def _special_ids(tokenizer) -> dict[str, Any]:
    if tokenizer is None:
        return {"bos": None, "eos": None, "pad": None}
    eos = [tokenizer.token_to_id(t) for t in tokenizer.eos_tokens]
    return {"bos": tokenizer.bos_id, "eos": eos[0] if len(eos) == 1 else (eos or None), "pad": tokenizer.pad_id}


def _fill_biases(state: dict[str, torch.Tensor], config: ModelConfig, fmt: str) -> dict[str, torch.Tensor]:
    """Add zero biases that the target family always has but this Muse model lacks (zeros compute
    the same): GPT-2 has biases on every linear and norm, Qwen2 on q/k/v, HF Llama's
    attention_bias covers q/k/v and o together. Muse's GGUF reader knows no llama biases."""
    c = config
    if c.arch == "llama" and fmt == "gguf" and (c.qkv_bias or c.bias):
        raise ExportError("A llama model with biases cannot be written as GGUF yet (Muse's GGUF reader would "
                          "drop them); export it to Hugging Face (export_hf) instead.")
    if c.arch == "qwen2" and c.bias:
        raise ExportError("Qwen2 has no biases on o_proj and the MLP; export this model with arch='llama' (to HF).")
    d, qkv = c.n_embd, (c.n_head + 2 * c.n_kv_head) * c.head_dim
    if c.arch == "gpt2":
        need = {"norm1": d, "norm2": d, "attn.qkv": qkv, "attn.proj": d, "mlp.fc": c.intermediate_size,
                "mlp.proj": d}
    elif c.arch == "qwen2" or c.qkv_bias or c.bias:
        need = {"attn.qkv": qkv, **({"attn.proj": d} if c.arch == "llama" else {})}
    else:
        need = {}
    out = dict(state)
    for i in range(c.n_layer):
        for module, n in need.items():
            out.setdefault(f"layers.{i}.{module}.bias", torch.zeros(n))
    if c.arch == "gpt2":
        out.setdefault("norm_f.bias", torch.zeros(d))
    return out


def export_hf(model_or_path, out_dir: str | Path) -> Path:
    """Write a Hugging Face model directory (config.json, model.safetensors, tokenizer files,
    generation_config.json) that `transformers.AutoModelForCausalLM.from_pretrained(out_dir)`
    loads with the same logits. Weights are fp32."""
    from safetensors.torch import save_file

    from muse.checkpoints.hf import muse_to_hf

    model, tokenizer, _ = _resolve(model_or_path)
    config = model.config
    cfg = hf_config(config, tokenizer)
    state = _fill_biases(float_state(model), config, "hf")
    hf_state = {k: v.contiguous() for k, v in muse_to_hf(state, config).items()}

    def write(tmp: Path) -> None:
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        gen = {k: v for k, v in (("bos_token_id", cfg["bos_token_id"]), ("eos_token_id", cfg["eos_token_id"]),
                                 ("pad_token_id", cfg["pad_token_id"])) if v is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(tmp)

    return atomic_dir(out_dir, write)


# ----------------------------------------------------------------------------- GGUF

def _permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order (interleaved RoPE pairs): the inverse of gguf_file._unpermute_rows."""
    rows = w.shape[0]
    head_dim = rows // n_head
    perm = torch.arange(rows).view(n_head, head_dim // 2, 2).transpose(1, 2).reshape(rows)
    return w.index_select(0, torch.argsort(perm))


def gguf_tensors(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Muse names → llama.cpp names (q/k/v and gate/up split for llama/qwen2; GPT-2 keeps attn_qkv)."""
    from muse.checkpoints.gguf_file import _GPT2_LAYER_NAMES, _LAYER_NAMES, _TOP_NAMES

    c = config
    top = {v: k for k, v in _TOP_NAMES.items()}
    layer = {v: k for k, v in _LAYER_NAMES.items()}
    if c.arch == "gpt2":
        layer.update({v: k for k, v in _GPT2_LAYER_NAMES.items()})
    dq, dkv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name in top:
            out[top[name]] = t
            continue
        _, i, rest = name.split(".", 2)
        pre = f"blk.{i}."
        if c.arch != "gpt2" and rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            q, k, v = t.split([dq, dkv, dkv])
            if c.arch == "llama":  # the reader un-permutes llama's q/k only (weights and biases)
                q = _permute_rows(q, c.n_head) if kind == "weight" else _permute_rows(q[:, None], c.n_head)[:, 0]
                k = _permute_rows(k, c.n_kv_head) if kind == "weight" else _permute_rows(k[:, None], c.n_kv_head)[:, 0]
            for x, part in zip("qkv", (q, k, v)):
                out[f"{pre}attn_{x}.{kind}"] = part
        elif c.arch != "gpt2" and rest.startswith("mlp.gate_up."):
            kind = rest.rsplit(".", 1)[1]
            gate, up = t.chunk(2)
            out[f"{pre}ffn_gate.{kind}"], out[f"{pre}ffn_up.{kind}"] = gate, up
        elif rest in layer:
            out[pre + layer[rest]] = t
        else:
            raise ExportError(f"tensor {name} has no GGUF name")
    return {k: v.contiguous() for k, v in out.items()}


def _write_gguf_config(w, config: ModelConfig, name: str) -> None:
    c = config
    w.add_name(name)
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_kv_head)
    w.add_vocab_size(c.vocab_size)
    if c.arch == "gpt2":
        w.add_layer_norm_eps(c.norm_eps)
    else:
        w.add_layer_norm_rms_eps(c.norm_eps)
        w.add_rope_freq_base(c.rope_theta)
        w.add_rope_dimension_count(c.head_dim)
        if c.head_dim * c.n_head != c.n_embd:
            w.add_key_length(c.head_dim)
            w.add_value_length(c.head_dim)


# llama.cpp's names for the pre-tokenizer splits `muse.tokenizer` knows (and reads back).
_PRE_NAMES = ("gpt-2", "smollm", "llama-bpe", "qwen2", "gpt-4o")


def _pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """The `tokenizer.ggml.pre` name whose split regex (and digit/NFC handling) this tokenizer uses."""
    from muse.tokenizer import _GPT2_SPLIT, _PRE_TOKENIZERS

    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # the classic GPT-2 tokenizer.json: ByteLevel splits with GPT-2's regex
    digits = "Digits" in kinds and any(s.get("individual_digits") for s in steps if s.get("type") == "Digits")
    split = next((s for s in steps if s.get("type") == "Split"), None)
    regex = (split or {}).get("pattern", {}).get("Regex") if split else None
    nfc = (spec.get("normalizer") or {}).get("type") == "NFC"
    for name in _PRE_NAMES:
        pattern, dig, norm, _ = _PRE_TOKENIZERS[name]
        if regex == pattern and dig == digits and norm == nfc:
            return name
    raise ExportError(
        "This tokenizer's pre-tokenizer split matches none that llama.cpp and Muse both know "
        f"({', '.join(_PRE_NAMES)}), so a GGUF could not reproduce its tokenization. "
        "Export to Hugging Face instead (export_hf), or export the GGUF without it (tokenizer=False)."
        + (" (The split is GPT-2's but with other options.)" if regex == _GPT2_SPLIT else "")
    )


def _write_gguf_tokenizer(w, tokenizer, vocab_size: int) -> None:
    """tokenizer.ggml.* for a byte-level BPE tokenizer (llama.cpp's "gpt2" tokenizer model)."""
    from gguf import TokenType

    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError("Only byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM style) can be written "
                          "into a GGUF by Muse; export to Hugging Face instead, or pass tokenizer=False.")
    pre = _pre_tokenizer_name(spec)
    n = tokenizer.vocab_size
    if n > vocab_size:
        raise ExportError(f"the tokenizer has {n} tokens but the model only {vocab_size} embeddings")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [TokenType.UNUSED] * vocab_size
    for tok, i in tokenizer.backend.get_vocab(with_added_tokens=True).items():
        tokens[i], types[i] = tok, TokenType.NORMAL
    for i, added in tokenizer.backend.get_added_tokens_decoder().items():
        tokens[i] = added.content
        types[i] = TokenType.CONTROL if added.special else TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges(merges)
    if tokenizer.bos_id is not None:
        w.add_bos_token_id(tokenizer.bos_id)
    if tokenizer.eos_tokens:
        w.add_eos_token_id(tokenizer.token_to_id(tokenizer.eos_tokens[0]))
    if tokenizer.pad_id is not None:
        w.add_pad_token_id(tokenizer.pad_id)
    w.add_add_bos_token(bool(tokenizer.add_bos))
    if tokenizer.chat_template is not None:
        w.add_chat_template(tokenizer.chat_template)


def _gguf_array(name: str, t: torch.Tensor, dtype: str):
    """(array, raw_dtype) for one tensor: 1-D tensors (norms, biases) stay f32, as llama.cpp wants."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    arr = t.float().numpy()
    if t.dim() < 2 or dtype == "f32":
        return arr, None
    if dtype == "q8_0" and arr.shape[-1] % 32 == 0:
        return quantize(arr, Q.Q8_0), Q.Q8_0
    if dtype == "q8_0":
        warnings.warn(f"{name}: width {arr.shape[-1]} is not a multiple of 32, so it is stored as f16, not q8_0",
                      stacklevel=3)
    return arr.astype(np.float16), None


def export_gguf(model_or_path, out_path: str | Path, dtype: str = "f16", tokenizer: bool = True) -> Path:
    """Write a GGUF file that llama.cpp (and `muse.load`) runs: llama.cpp tensor names and
    architecture metadata, the tokenizer (byte-level BPE) and its chat template.

    dtype: "f32" (exact), "f16" (half the size), or "q8_0" (8-bit blocks of 32, about a
    quarter of f32; matrices whose width is not a multiple of 32 fall back to f16).
    tokenizer=False writes weights and architecture only.
    """
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"dtype must be one of {GGUF_DTYPES}, got {dtype!r}")
    model, tok, name = _resolve(model_or_path)
    config = model.config
    _check_family(config)
    if tokenizer and tok is None:
        raise ExportError("This model has no tokenizer to write; pass tokenizer=False for a weights-only GGUF.")
    tensors = gguf_tensors(_fill_biases(float_state(model), config, "gguf"), config)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.parent / f".{out_path.name}.tmp-{os.getpid()}"
    try:
        w = gguf.GGUFWriter(str(tmp), config.arch)
        _write_gguf_config(w, config, name)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
        if tokenizer:
            _write_gguf_tokenizer(w, tok, config.vocab_size)
        for tname, t in tensors.items():
            arr, raw = _gguf_array(tname, t, dtype)
            w.add_tensor(tname, arr, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path


__all__ = ["ExportError", "GGUF_DTYPES", "export_gguf", "export_hf", "float_state", "gguf_tensors", "hf_config"]
