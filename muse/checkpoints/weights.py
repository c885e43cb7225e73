"""Weights on their way from a file into a `Transformer`.

Loaders (GGUF, Hugging Face) yield tensors under Muse's parameter names; a tensor
is either a float array or an already-quantized `Packed` (integer codes plus fp16
scales/mins, group 32 from GGUF blocks). `build_model` fuses, quantizes or
dequantizes them per the chosen precision and assembles the model without ever
materialising a random-initialised copy (construction happens on the meta device).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from muse.config import ModelConfig
from muse.model import Transformer

# w4a8: the weights as "auto" keeps them (int4 for Q4 files), activations rounded to int8 in
# the kernels (muse.quant.set_activation_bits); chosen at load time, never stored.
PRECISIONS = ("auto", "fp32", "bf16", "int8", "int4", "w4a8")


@dataclass
class Packed:
    """A quantized matrix: w[r, c] = scales[r, c // G] * codes[r, c] (+ mins[r, c // G])."""

    bits: int
    codes: torch.Tensor  # (out, in) int8 (bits=8) or uint8 0..15 (bits=4)
    scales: torch.Tensor  # (out, in // G) float16
    mins: torch.Tensor | None  # (out, in // G) float16, bits=4 only

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def group_size(self) -> int:
        return self.codes.shape[1] // self.scales.shape[1]

    def dequantize(self) -> torch.Tensor:
        G = self.group_size
        w = self.codes.float() * self.scales.float().repeat_interleave(G, dim=1)
        if self.mins is not None:
            w += self.mins.float().repeat_interleave(G, dim=1)
        return w

    @classmethod
    def int8(cls, w: torch.Tensor, group_size: int = 32) -> "Packed":
        """Quantize a float matrix to int8 in groups (for formats without a lossless kernel)."""
        from muse.quant import QuantLinear

        if w.shape[1] % group_size:
            group_size = w.shape[1]
        q = QuantLinear.from_float(w, 8, group_size)
        return cls(8, q.qweight, q.scales, None)

    def rows(self, index: torch.Tensor) -> "Packed":
        pick = lambda t: None if t is None else t.index_select(0, index)  # noqa: E731
        return Packed(self.bits, pick(self.codes), pick(self.scales), pick(self.mins))


Weight = "torch.Tensor | Packed"


def fuse_rows(parts: list) -> "torch.Tensor | Packed":
    """Stack weights along the output dimension (q;k;v or gate;up) into one matrix.

    Row stacking never changes a quantized row, so packed pieces with the same
    format concatenate losslessly; mixed packed formats meet in int8 (group 32);
    anything mixed with floats stays float.
    """
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, Packed) for p in parts):
        first = parts[0]
        if all(p.bits == first.bits and p.group_size == first.group_size for p in parts):
            cat = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
            return Packed(first.bits, cat([p.codes for p in parts]), cat([p.scales for p in parts]),
                          cat([p.mins for p in parts]))
        return Packed.int8(torch.cat([p.dequantize() for p in parts]))
    return torch.cat([p.dequantize() if isinstance(p, Packed) else p.float() for p in parts])


def _linear_names(model: Transformer) -> list[str]:
    # The embedding may be quantized too: read row-wise, and as the head when tied.
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] + ["wte"]


def build_model(config: ModelConfig, weights: dict[str, "torch.Tensor | Packed"],
                precision: str = "auto", where: str = "The checkpoint") -> tuple[Transformer, dict[str, dict]]:
    """Assemble a Transformer from named weights; return it and its quantization map.

    precision: "auto" keeps packed weights packed (lossless) and floats as fp32;
    "fp32"/"bf16" dequantize everything; "int8"/"int4" quantize every linear layer
    (int8 per channel, int4 in groups of 32).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    with torch.device("meta"):
        model = Transformer(config)
    state: dict[str, torch.Tensor] = {}
    quant: dict[str, dict] = {}
    for name in _linear_names(model):
        w = weights.pop(f"{name}.weight", None)
        if w is None:
            continue
        bias = weights.pop(f"{name}.bias", None)
        bias = None if bias is None else bias.float()
        layer = _quantized(w, bias, precision)
        if layer is None:
            state[f"{name}.weight"] = w.dequantize() if isinstance(w, Packed) else w.float()
            if bias is not None:
                state[f"{name}.bias"] = bias
            continue
        _set_module(model, name, layer)
        quant[name] = {"bits": layer.bits, "group_size": layer.group_size}
    for name, w in weights.items():
        state[name] = w.dequantize() if isinstance(w, Packed) else w.float()
    _load(model, state, where)
    if precision == "bf16":
        model.to(torch.bfloat16)
    return model, quant


def _quantized(w, bias, precision: str):
    """The QuantLinear a weight becomes at this precision, or None to keep it float."""
    from muse.quant import QuantLinear

    if precision in ("fp32", "bf16"):
        return None
    if precision == "auto":
        if not isinstance(w, Packed):
            return None
        return QuantLinear.from_codes(w.codes, w.scales, w.mins, w.bits, bias=bias)
    dense = w.dequantize() if isinstance(w, Packed) else w.float()
    bits, group = (8, dense.shape[1]) if precision == "int8" else (4, 32)
    if dense.shape[1] % group:
        group = dense.shape[1]
    return QuantLinear.from_float(dense, bits, group, bias=bias)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _load(model: Transformer, state: dict[str, torch.Tensor], where: str = "The checkpoint") -> None:
    """Load `state` into a meta-device model after checking every name, shape and dtype."""
    from muse.errors import CheckpointError

    current = model.state_dict()
    missing = sorted(k for k, v in current.items() if v.is_meta and k not in state)
    extra = sorted(k for k in state if k not in current)
    wrong = [f"{k} is {list(v.shape)}, expected {list(current[k].shape)}"
             for k, v in sorted(state.items()) if k in current and v.shape != current[k].shape]
    # float parameters may come in any float dtype; quantized codes and scales must be exact
    name = lambda dtype: str(dtype).removeprefix("torch.")  # noqa: E731
    bad_types = [f"{k} is {name(v.dtype)}, expected {name(current[k].dtype)}"
                 for k, v in sorted(state.items()) if k in current and v.dtype != current[k].dtype
                 and not (v.is_floating_point() and current[k].is_floating_point())]
    if missing or extra or wrong or bad_types:
        parts = []
        for label, names in (("missing tensors", missing), ("unexpected tensors", extra), ("wrong shapes", wrong),
                             ("wrong dtypes", bad_types)):
            if names:
                parts.append(f"{label}: {', '.join(names[:8])}{' …' if len(names) > 8 else ''}")
        raise CheckpointError(f"{where} does not match its config: " + "; ".join(parts))
    model.load_state_dict(state, strict=False, assign=True)
    model.reset_rope()
    model.eval()


def assemble(config: ModelConfig, state: dict[str, torch.Tensor], quant: dict[str, dict],
             dtype: torch.dtype = torch.float32, where: str = "The checkpoint") -> Transformer:
    """Rebuild a saved model (Muse format): quantized modules first, then load."""
    from muse.errors import CheckpointError
    from muse.quant import QuantLinear

    with torch.device("meta"):
        model = Transformer(config)
        linear = set(_linear_names(model))
        for name, spec in quant.items():
            if name not in linear:
                raise CheckpointError(f"{where}: its quantization map names {name!r}, which is not a linear "
                                      "layer of this model; the config is corrupt.")
            entry = spec if isinstance(spec, dict) else {}
            bits, group = entry.get("bits"), entry.get("group_size")
            if not (type(bits) is int and type(group) is int):
                raise CheckpointError(f"{where}: the quantization of {name} must give integer bits and "
                                      f"group_size, got {spec!r:.80}.")
            old = model.get_submodule(name)
            in_f, out_f = (old.embedding_dim, old.num_embeddings) if isinstance(old, nn.Embedding) else (
                old.in_features, old.out_features)
            has_bias = getattr(old, "bias", None) is not None
            try:
                layer = QuantLinear(in_f, out_f, bits, group, bias=has_bias)
            except ValueError as e:
                raise CheckpointError(f"{where}: the quantization of {name} is invalid: {e}") from e
            _set_module(model, name, layer)
    _load(model, state, where)
    if dtype != torch.float32:
        model.to(dtype)
    return model
