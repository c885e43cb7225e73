"""Hugging Face checkpoint directories (GPT-2, Llama, Qwen2): config.json + safetensors.

Weights are read with `safetensors` (single file or sharded index); a legacy
`pytorch_model.bin` is read only through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from muse.checkpoints.weights import fuse_rows
from muse.config import ModelConfig
from muse.errors import CheckpointError

MODEL_TYPES = ("gpt2", "llama", "qwen2")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; a Hugging Face model directory needs it.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the file is corrupt.") from e


def read_hf_config(path: Path) -> ModelConfig:
    hf = read_json(path / "config.json")
    kind = hf.get("model_type")
    if kind not in MODEL_TYPES:
        raise CheckpointError(
            f"{path}/config.json: model_type {kind!r} is not supported; Muse loads {', '.join(MODEL_TYPES)}."
        )
    try:
        if kind == "gpt2":
            return ModelConfig(
                arch="gpt2", vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                n_embd=hf["n_embd"], intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"],
                block_size=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                tie_embeddings=hf.get("tie_word_embeddings", True),
            )
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise CheckpointError(f"{path}: RoPE scaling {rope_type!r} is not supported yet.")
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        return ModelConfig(
            arch=kind, vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"], n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            n_embd=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            head_dim=hf.get("head_dim"), block_size=hf["max_position_embeddings"],
            norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            qkv_bias=kind == "qwen2" or bool(hf.get("attention_bias", False)),
            bias=bool(hf.get("mlp_bias", False)),
            tie_embeddings=hf.get("tie_word_embeddings", False),
        )
    except KeyError as e:
        raise CheckpointError(f"{path}/config.json lacks the field {e.args[0]!r}.") from None
    except ValueError as e:
        raise CheckpointError(f"{path}/config.json: {e}") from e


def read_hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(read_json(index)["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    elif (path / "pytorch_model.bin").exists():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"{path} has no model.safetensors (or sharded index); nothing to load.")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            tensors.update(load_file(str(path / name)))
        except FileNotFoundError:
            raise CheckpointError(f"{path / name} is listed in the index but missing.") from None
        except Exception as e:
            raise CheckpointError(f"{path / name} is corrupt or truncated ({e}).") from e
    return tensors


_LLAMA = {
    "model.embed_tokens.weight": "wte.weight", "model.norm.weight": "norm_f.weight",
    "lm_head.weight": "lm_head.weight",
}
_LLAMA_LAYER = {
    "input_layernorm.weight": "norm1.weight", "post_attention_layernorm.weight": "norm2.weight",
    "self_attn.o_proj.weight": "attn.proj.weight", "self_attn.o_proj.bias": "attn.proj.bias",
    "mlp.down_proj.weight": "mlp.down.weight", "mlp.down_proj.bias": "mlp.down.bias",
}
_GPT2 = {"wte.weight": "wte.weight", "wpe.weight": "wpe.weight", "ln_f.weight": "norm_f.weight",
         "ln_f.bias": "norm_f.bias", "lm_head.weight": "lm_head.weight"}
_GPT2_LAYER = {
    "ln_1.weight": "norm1.weight", "ln_1.bias": "norm1.bias", "ln_2.weight": "norm2.weight",
    "ln_2.bias": "norm2.bias", "attn.c_attn.weight": "attn.qkv.weight", "attn.c_attn.bias": "attn.qkv.bias",
    "attn.c_proj.weight": "attn.proj.weight", "attn.c_proj.bias": "attn.proj.bias",
    "mlp.c_fc.weight": "mlp.fc.weight", "mlp.c_fc.bias": "mlp.fc.bias",
    "mlp.c_proj.weight": "mlp.proj.weight", "mlp.c_proj.bias": "mlp.proj.bias",
}
_LAYER_RE = re.compile(r"^(?:model\.layers|h)\.(\d+)\.(.+)$")


def hf_to_muse(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename (and fuse) HF tensors into Muse's parameter names."""
    gpt2 = config.arch == "gpt2"
    top, per_layer = (_GPT2, _GPT2_LAYER) if gpt2 else (_LLAMA, _LLAMA_LAYER)
    out: dict[str, torch.Tensor] = {}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        name = name.removeprefix("transformer.")
        if name in top:
            out[top[name]] = t
        elif m := _LAYER_RE.match(name):
            layers.setdefault(int(m[1]), {})[m[2]] = t
        # anything else (gpt2's attn.bias mask buffers, rotary inv_freq) is derived
    if config.tie_embeddings:
        out.pop("lm_head.weight", None)
    for i, p in layers.items():
        pre = f"layers.{i}."
        if not gpt2:
            qkv = [p.pop(f"self_attn.{x}_proj.weight") for x in "qkv"]
            out[pre + "attn.qkv.weight"] = fuse_rows(qkv)
            if "self_attn.q_proj.bias" in p:
                out[pre + "attn.qkv.bias"] = torch.cat([p.pop(f"self_attn.{x}_proj.bias") for x in "qkv"])
            out[pre + "mlp.gate_up.weight"] = fuse_rows([p.pop("mlp.gate_proj.weight"), p.pop("mlp.up_proj.weight")])
            if "mlp.gate_proj.bias" in p:
                out[pre + "mlp.gate_up.bias"] = torch.cat([p.pop("mlp.gate_proj.bias"), p.pop("mlp.up_proj.bias")])
        for rest, t in p.items():
            if rest in ("attn.bias", "attn.masked_bias"):  # causal-mask buffers
                continue
            if rest not in per_layer:
                raise CheckpointError(f"tensor {rest!r} of layer {i} is not understood by Muse")
            if gpt2 and t.dim() == 2:
                t = t.t()  # GPT-2 stores Conv1D weights as (in, out)
            out[pre + per_layer[rest]] = t
    return out


def muse_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of `hf_to_muse`, for exporting a Muse model as an HF directory."""
    gpt2 = config.arch == "gpt2"
    top, per_layer = (_GPT2, _GPT2_LAYER) if gpt2 else (_LLAMA, _LLAMA_LAYER)
    top_inv = {v: k for k, v in top.items()}
    layer_inv = {v: k for k, v in per_layer.items()}
    prefix = "transformer." if gpt2 else ""
    out: dict[str, torch.Tensor] = {}
    d_q = config.n_head * config.head_dim
    d_kv = config.n_kv_head * config.head_dim
    for name, t in state.items():
        t = t.detach().contiguous()
        if name in top_inv:
            out[(prefix if name != "lm_head.weight" else "") + top_inv[name]] = t
            continue
        m = re.match(r"^layers\.(\d+)\.(.+)$", name)
        i, rest = int(m[1]), m[2]
        pre = f"{prefix}h.{i}." if gpt2 else f"model.layers.{i}."
        if not gpt2 and rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            for x, part in zip("qkv", t.split([d_q, d_kv, d_kv])):
                out[f"{pre}self_attn.{x}_proj.{kind}"] = part.contiguous()
        elif not gpt2 and rest.startswith("mlp.gate_up."):
            kind = rest.rsplit(".", 1)[1]
            gate, up = t.chunk(2)
            out[f"{pre}mlp.gate_proj.{kind}"] = gate.contiguous()
            out[f"{pre}mlp.up_proj.{kind}"] = up.contiguous()
        else:
            out[pre + layer_inv[rest]] = t.t().contiguous() if gpt2 and t.dim() == 2 else t
    return out
