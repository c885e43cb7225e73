"""LoRA: low-rank adapters on a frozen Transformer, saved small and merged back on demand.

A `LoRALinear` wraps one `nn.Linear` W (out, in) and adds a trainable update
`scale * B @ A` with A (rank, in), B (out, rank), scale = alpha / rank. B starts at
zero, so a freshly adapted model computes exactly what its base computes.

Muse fuses q/k/v into one `attn.qkv` Linear and SwiGLU's gate/up into one
`mlp.gate_up` Linear, so an adapter on `qkv` adapts q, k and v together (one A shared
by the three, one B whose rows split into q/k/v) and one on `gate_up` adapts gate
and up together. That is slightly more expressive per rank than separate q/k/v
adapters of the same rank, and costs the same to store.

An adapter directory holds `adapter.safetensors` (only the A/B matrices) and
`adapter_config.json` (rank, alpha, targets, and the base model's name, path, size
and sha256), so it is a few MB for a model of hundreds. This module is the model-level
half (layers and the adapter format); `muse.checkpoints.adapter` finds an adapter's base,
checks it and merges, and `muse.training.finetune` trains adapters.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from muse.errors import CheckpointError
from muse.fileio import disk_full_is_an_error, fsync_tree

# Every Linear inside the blocks (Llama/Qwen2: qkv, proj, gate_up, down; GPT-2: qkv, proj, fc, proj),
# not the embedding or the head. With targets=None those of these a model has are used.
DEFAULT_TARGETS = ("qkv", "proj", "gate_up", "down", "fc")
ADAPTER_FORMAT = "muse-lora"
ADAPTER_VERSION = 1
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"


class LoRALinear(nn.Module):
    """`base(x) + scale * dropout(x) @ A.T @ B.T` with the base Linear frozen.

    The base layer stays a submodule (`.base`), so its parameters keep their values;
    only `lora_a` (rank, in) and `lora_b` (out, rank) are trainable.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        check_hparams(rank, alpha, dropout)
        self.base = base
        base.requires_grad_(False)
        self.rank, self.alpha = rank, float(alpha)
        self.scale = float(alpha) / rank
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        # A like an nn.Linear's default init (as in the LoRA paper's code); B = 0 keeps step 0 exact.
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) → (..., rank) → (..., out): two thin matmuls instead of a full (out, in) update
        update = F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)
        return self.base(x) + update * self.scale

    def delta(self) -> torch.Tensor:
        """The weight update (out, in) this adapter adds to the base."""
        return (self.lora_b @ self.lora_a) * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function (W + scale·B·A)."""
        base = self.base
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(base.weight + self.delta().to(base.weight.dtype))
            if base.bias is not None:
                out.bias.copy_(base.bias)
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def check_hparams(rank, alpha, dropout) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ValueError(f"alpha must be a number > 0, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def target_modules(model: nn.Module, targets: str | Iterable[str] | None = None) -> list[str]:
    """Names of the Linear layers that `targets` (module-name suffixes) select.

    None selects every Linear of the blocks (`DEFAULT_TARGETS` that the model has).

    A target matches a module whose full name equals it or ends with "." + target:
    "qkv" selects every `layers.N.attn.qkv`, "attn.proj" only attention outputs,
    "proj" both attention and (GPT-2) MLP outputs. The head is chosen only by name.
    """
    names = _linear_names(model)
    if targets is None:
        targets = [t for t in DEFAULT_TARGETS if any(n.endswith("." + t) for n in names)]
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"targets must be a non-empty list of module-name suffixes, got {targets!r}")
    names = _linear_names(model)
    quantized = [n for n, m in model.named_modules() if type(m).__name__ == "QuantLinear"]
    chosen, unmatched = [], []
    for t in targets:
        hits = [n for n in names if n == t or n.endswith("." + t)]
        if not hits:
            if any(n == t or n.endswith("." + t) for n in quantized):
                raise ValueError(
                    f"targets: {t!r} names quantized layers, which cannot be trained; load the model "
                    "with precision='fp32' (muse.load(name, precision='fp32')) before applying LoRA"
                )
            unmatched.append(t)
        chosen += hits
    if unmatched:
        suffixes = sorted({n.split(".", 2)[-1] if n.startswith("layers.") else n for n in names})
        raise ValueError(
            f"targets {unmatched} match no Linear layer of this model; available: {', '.join(suffixes)}"
        )
    return list(dict.fromkeys(chosen))


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16, targets: str | Iterable[str] | None = None,
               dropout: float = 0.0) -> list[nn.Parameter]:
    """Freeze `model` and wrap the targeted Linears in `LoRALinear`; return the trainable A/B parameters.

    targets: module-name suffixes (see `target_modules`); None = every Linear of the blocks.

    The model's output is unchanged until the adapters are trained (B = 0).
    """
    check_hparams(rank, alpha, dropout)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("this model already has LoRA adapters; merge_lora(model) first or load a fresh model")
    names = target_modules(model, targets)
    model.requires_grad_(False)
    params: list[nn.Parameter] = []
    for name in names:
        layer = LoRALinear(model.get_submodule(name), rank, alpha, dropout)
        _set_module(model, name, layer)
        params += [layer.lora_a, layer.lora_b]
    return params


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += scale·B·A) and restore plain nn.Linears.

    The merged model computes the same logits (up to float rounding) with no extra cost.
    """
    for name, layer in lora_layers(model).items():
        _set_module(model, name, layer.merged())
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<module>.lora_a": (rank, in), "<module>.lora_b": (out, rank)} for every adapter."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{name}.lora_a"] = layer.lora_a.detach().float().contiguous()
        state[f"{name}.lora_b"] = layer.lora_b.detach().float().contiguous()
    if not state:
        raise ValueError("the model has no LoRA adapters to save; call apply_lora(model, ...) first")
    return state


def save_adapter(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write `adapter.safetensors` + `adapter_config.json` into directory `path`, atomically.

    `meta` carries at least rank, alpha, targets and `base` (name/path/sha256/size,
    see `base_fingerprint`); the list of adapted modules is added here.
    """
    from safetensors.torch import save_file

    state = adapter_state(model)
    config = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_VERSION,
        **meta,
        "modules": sorted(lora_layers(model)),
    }
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with disk_full_is_an_error(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            save_file(state, str(tmp / ADAPTER_WEIGHTS))
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            # Keep anything else already in `path` (a training run's state files), replace ours.
            path.mkdir(exist_ok=True)
            fsync_tree(tmp)
            for f in tmp.iterdir():
                os.replace(f, path / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {ADAPTER_CONFIG}; it is not a LoRA adapter directory.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / ADAPTER_CONFIG} is not valid JSON ({e}); the file is corrupt.") from e
    if not isinstance(config, dict) or config.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{path / ADAPTER_CONFIG} is not a Muse LoRA adapter config.")
    if config.get("format_version", 0) > ADAPTER_VERSION:
        raise CheckpointError(f"{path} was written by a newer Muse (adapter format "
                              f"{config['format_version']}); upgrade Muse.")
    for key in ("rank", "alpha", "modules"):
        if key not in config:
            raise CheckpointError(f"{path / ADAPTER_CONFIG} lacks the field {key!r}.")
    return config


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply the adapter saved in `path` to `model` (its base, at fp32 or bf16) in place."""
    from safetensors.torch import load_file

    path = Path(path)
    config = read_adapter_config(path)
    try:
        state = load_file(str(path / ADAPTER_WEIGHTS))
    except FileNotFoundError:
        raise CheckpointError(f"{path / ADAPTER_WEIGHTS} is missing.") from None
    except Exception as e:
        raise CheckpointError(f"{path / ADAPTER_WEIGHTS} is corrupt or truncated ({e}).") from e
    modules = config["modules"]
    present = set(_linear_names(model))
    missing = [m for m in modules if m not in present]
    if missing:
        raise CheckpointError(
            f"the adapter in {path} targets layers this model lacks ({', '.join(missing[:4])}…); "
            "it was trained for a different base model"
        )
    # Exact names, so a target like "proj" picks the same modules it picked at training time.
    apply_lora(model, int(config["rank"]), float(config["alpha"]), targets=modules)
    layers = lora_layers(model)
    for name, layer in layers.items():
        for part in ("lora_a", "lora_b"):
            t = state.get(f"{name}.{part}")
            p = getattr(layer, part)
            if t is None or t.shape != p.shape:
                got = "missing" if t is None else tuple(t.shape)
                raise CheckpointError(
                    f"{path / ADAPTER_WEIGHTS}: {name}.{part} is {got}, expected {tuple(p.shape)}; "
                    "the adapter does not fit this base model"
                )
            with torch.no_grad():
                p.copy_(t.to(p.dtype))
    return model


__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_FORMAT", "ADAPTER_WEIGHTS", "DEFAULT_TARGETS", "LoRALinear", "adapter_state",
    "apply_lora", "check_hparams", "load_adapter", "lora_layers", "merge_lora",
    "read_adapter_config", "save_adapter", "target_modules",
]
