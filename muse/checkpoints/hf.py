"""Hugging Face checkpoint directories (GPT-2, Llama, Qwen2): config.json + safetensors.

config.json is schema-checked (types, ranges) and every tensor's name, shape and dtype is
checked against it from the safetensors headers before any weight is read. Weights come
only from safetensors (single file or a sharded index whose files stay inside the
directory); pickled `pytorch_model.bin` files are refused with how to convert them.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from muse.checkpoints.files import (
    MAX_INDEX_BYTES, PICKLE_HINT, Fields, SafetensorsFile, check_specs, model_file, read_json, show,
)
from muse.checkpoints.weights import fuse_rows
from muse.config import ModelConfig
from muse.errors import CheckpointError

MODEL_TYPES = ("gpt2", "llama", "qwen2")


def read_hf_config(path: Path) -> ModelConfig:
    where = f"{path}/config.json"
    hf = read_json(model_file(path, "config.json"))
    kind = hf.get("model_type")
    if kind not in MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type {show(kind)} is not supported; "
                              f"Muse loads {', '.join(MODEL_TYPES)}.")
    f = Fields(hf, where)
    if kind == "gpt2":
        n_embd = f.integer("n_embd", "n_embd")
        kw = dict(
            arch="gpt2",
            vocab_size=f.integer("vocab_size", "vocab_size"),
            n_layer=f.integer("n_layer", "n_layer"),
            n_head=f.integer("n_head", "n_head"),
            n_embd=n_embd,
            intermediate_size=f.integer("n_inner", "intermediate_size", None) or 4 * n_embd,
            block_size=f.integer("n_positions", "block_size"),
            norm_eps=f.number("layer_norm_epsilon", 1e-5),
            tie_embeddings=f.boolean("tie_word_embeddings", True),
        )
    else:
        rope = f.mapping("rope_parameters") or f.mapping("rope_scaling")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise CheckpointError(f"{where}: RoPE scaling {show(rope_type)} is not supported yet.")
        n_head = f.integer("num_attention_heads", "n_head")
        kw = dict(
            arch=kind,
            vocab_size=f.integer("vocab_size", "vocab_size"),
            n_layer=f.integer("num_hidden_layers", "n_layer"),
            n_head=n_head,
            n_kv_head=f.integer("num_key_value_heads", "n_kv_head", n_head),
            n_embd=f.integer("hidden_size", "n_embd"),
            intermediate_size=f.integer("intermediate_size", "intermediate_size"),
            head_dim=f.integer("head_dim", "head_dim", None),
            block_size=f.integer("max_position_embeddings", "block_size"),
            norm_eps=f.number("rms_norm_eps", 1e-6),
            rope_theta=f.number("rope_theta", None) or Fields(rope, where).number("rope_theta", 10000.0),
            qkv_bias=kind == "qwen2" or f.boolean("attention_bias", False),
            bias=f.boolean("mlp_bias", False),
            tie_embeddings=f.boolean("tie_word_embeddings", False),
        )
    try:
        return ModelConfig(**kw)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from e


_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "*.bin", "*.pt", "*.pth", "*.ckpt")


def _pickle_in(path: Path) -> Path | None:
    """A PyTorch pickle among the directory's weight files (by content: zip or pickle magic)."""
    for pattern in _PICKLES:
        for file in sorted(path.glob(pattern))[:4]:
            if file.name.endswith(".json"):
                return file
            try:
                with open(file, "rb") as fh:
                    head = fh.read(4)
            except OSError:
                continue
            if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
                return file
    return None


def weight_files(path: Path) -> tuple[list[Path], dict[str, str]]:
    """The safetensors files of an HF directory and the index's tensor → file map ({} without one)."""
    index = path / "model.safetensors.index.json"
    if index.exists() or index.is_symlink():
        where = f"{index}"
        data = read_json(model_file(path, index.name), MAX_INDEX_BYTES)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{where} has no weight_map (an object of tensor name → shard file); "
                                  "the index is corrupt. Download it again, or delete it if model.safetensors "
                                  "holds every tensor.")
        bad = [f"{k!r}: {show(v)}" for k, v in weight_map.items() if not isinstance(v, str)]
        if bad:
            raise CheckpointError(f"{where}: weight_map must map tensor names to file names; got {', '.join(bad[:4])}.")
        names = sorted(set(weight_map.values()))
        for name in names:
            if not name.endswith(".safetensors"):
                raise CheckpointError(f"{where} lists {name!r}, which is not a .safetensors file. " + PICKLE_HINT)
        files = [model_file(path, name, "shard") for name in names]
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{file} is listed in {index.name} but missing; download it again.")
        return files, weight_map
    if (path / "model.safetensors").exists() or (path / "model.safetensors").is_symlink():
        return [model_file(path, "model.safetensors")], {}
    pickle = _pickle_in(path)
    if pickle is not None:
        raise CheckpointError(f"{path} holds its weights as a PyTorch pickle ({pickle.name}), not safetensors. "
                              + PICKLE_HINT)
    raise CheckpointError(f"{path} has no model.safetensors (or sharded model.safetensors.index.json); "
                          "nothing to load.")


# Tensors HF checkpoints carry that Muse derives from the config instead.
_DERIVED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$")


def expected_hf_shapes(config: ModelConfig) -> tuple[dict[str, tuple[int, ...]], frozenset[str]]:
    """HF tensor name (without GPT-2's "transformer." prefix) → shape, and the optional names."""
    from muse.model import Transformer

    with torch.device("meta"):
        state = Transformer(config).state_dict()
    shapes = {k.removeprefix("transformer."): tuple(v.shape) for k, v in muse_to_hf(state, config).items()}
    optional = frozenset()
    if config.tie_embeddings:  # some tied checkpoints store the head anyway; it is dropped
        shapes["lm_head.weight"] = (config.vocab_size, config.n_embd)
        optional = frozenset({"lm_head.weight"})
    return shapes, optional


def read_hf_tensors(path: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The tensors of an HF directory, after checking every name, shape and dtype against `config`."""
    files, weight_map = weight_files(path)
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    owner: dict[str, tuple[SafetensorsFile, str]] = {}
    for file in files:
        st = SafetensorsFile(file)
        for name, spec in st.specs.items():
            key = name.removeprefix("transformer.")
            if key in owner:
                raise CheckpointError(f"{path}: tensor {name!r} is in both {owner[key][0].path.name} and "
                                      f"{file.name}; the checkpoint is corrupt.")
            owner[key] = (st, name)
            if not _DERIVED.search(key):
                found[key] = spec
    absent = [f"{k} ({v})" for k, v in weight_map.items() if k.removeprefix("transformer.") not in owner]
    if absent:
        raise CheckpointError(f"{path}/model.safetensors.index.json lists tensors its shards do not hold: "
                              f"{', '.join(absent[:8])}; the download is incomplete or the index is corrupt.")
    expected, optional = expected_hf_shapes(config)
    check_specs(str(path), found, expected, optional)
    return {key: owner[key][0].get(owner[key][1]) for key in found}


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
        if _DERIVED.search(name):
            continue
        if name in top:
            out[top[name]] = t
        elif m := _LAYER_RE.match(name):
            layers.setdefault(int(m[1]), {})[m[2]] = t
        # other names were refused by read_hf_tensors
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


def read_generation_config(path: Path) -> dict:
    """The sampling settings `path/generation_config.json` recommends, as `SamplingParams` fields;
    {} when there is none, when it sets `do_sample: false` (its values are then unused, as in
    transformers), or for a broken file. A value outside Muse's ranges is left out."""
    from muse.sampling import recommendation

    if not (path / "generation_config.json").is_file():
        return {}
    try:
        g = read_json(model_file(path, "generation_config.json"))
    except CheckpointError:
        return {}
    if not isinstance(g, dict) or g.get("do_sample") is False:
        return {}
    return recommendation(g)
