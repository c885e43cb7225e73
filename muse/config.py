"""Model configuration: one dataclass for every architecture Muse runs.

The GPT-2 family and the Llama/Qwen2 family differ only in a handful of switches
(norm, position encoding, MLP kind, attention heads, biases, tied embeddings), so a
single `ModelConfig` describes both and `muse.model.Transformer` reads the switches.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

ARCHS = ("gpt2", "llama", "qwen2")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
MLPS = ("gelu", "swiglu")

# Upper bounds far above any released model (Llama 3.1 405B: 126 layers, width 16384, 128
# heads; the largest vocabularies ~256k; contexts up to ~10M). A checkpoint beyond them is
# corrupt or hostile, and refusing it early keeps a config from driving huge allocations.
# The context bound is where fp32 stops counting positions exactly (2^24), so RoPE angles
# past it would be wrong anyway.
LIMITS = {
    "vocab_size": 1 << 24,
    "n_layer": 1024,
    "n_head": 4096,
    "n_kv_head": 4096,
    "n_embd": 1 << 20,
    "intermediate_size": 1 << 20,
    "head_dim": 1 << 16,
    "block_size": 1 << 24,
}


@dataclass
class ModelConfig:
    """Shapes and switches of a decoder-only Transformer.

    `arch` names the family a checkpoint came from (and is exported to); the other
    switches default to that family's choices, so `ModelConfig(arch="llama", ...)`
    only needs the sizes.
    """

    arch: str = "llama"
    vocab_size: int = 32000
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # grouped-query attention; None = n_head
    n_embd: int = 768
    intermediate_size: int | None = None  # MLP hidden width; None = 4 * n_embd
    head_dim: int | None = None  # None = n_embd // n_head
    block_size: int = 2048  # context window in tokens
    norm: str | None = None  # "layernorm" | "rmsnorm"
    norm_eps: float | None = None
    pos: str | None = None  # "learned" | "rope"
    rope_theta: float = 10000.0
    mlp: str | None = None  # "gelu" | "swiglu"
    bias: bool | None = None  # biases on every linear and norm (GPT-2)
    qkv_bias: bool | None = None  # biases on q, k, v only (Qwen2)
    tie_embeddings: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        gpt2 = self.arch == "gpt2"
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r:.60}")
        for name in LIMITS:  # before the defaults do arithmetic with them
            if getattr(self, name) is not None:
                check_size(name, getattr(self, name))
        # Family defaults fill only what the caller left as None, so an explicit
        # False or 0 is never swallowed.
        defaults = {
            "norm": "layernorm" if gpt2 else "rmsnorm",
            "norm_eps": 1e-5 if gpt2 else 1e-6,
            "pos": "learned" if gpt2 else "rope",
            "mlp": "gelu" if gpt2 else "swiglu",
            "bias": gpt2,
            "qkv_bias": gpt2 or self.arch == "qwen2",
            "n_kv_head": self.n_head,
            "intermediate_size": 4 * self.n_embd,
        }
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.head_dim is None:
            if self.n_head <= 0 or self.n_embd % self.n_head:
                raise ValueError(
                    f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}), "
                    "or set head_dim explicitly"
                )
            self.head_dim = self.n_embd // self.n_head
        self._validate()

    def _validate(self) -> None:
        for name in LIMITS:
            check_size(name, getattr(self, name))
        for name in ("norm_eps", "rope_theta", "dropout"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r:.60}")
        for name in ("bias", "qkv_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r:.60}")
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})"
            )
        for name, allowed in (("norm", NORMS), ("pos", POSITIONS), ("mlp", MLPS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r:.60}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rope, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")

    # -- construction -------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named preset (see `PRESETS`), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ValueError(f"a model config must be a mapping of fields, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(data) - fields))
        if unknown:
            raise ValueError(f"unknown model config field(s): {', '.join(unknown)[:200]}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- derived ------------------------------------------------------------------

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count computed from shapes (matches `Transformer.num_params`)."""
        d, hd, L = self.n_embd, self.head_dim, self.n_layer
        qkv_out = (self.n_head + 2 * self.n_kv_head) * hd
        attn = d * qkv_out + self.n_head * hd * d
        attn += qkv_out if self.qkv_bias else 0
        attn += d if self.bias else 0
        width = 2 if self.mlp == "swiglu" else 1
        mlp = d * self.intermediate_size * width + self.intermediate_size * d
        mlp += (self.intermediate_size * width + d) if self.bias else 0
        norm = d * (2 if self.norm == "layernorm" else 1)
        total = L * (attn + mlp + 2 * norm) + norm
        emb = self.vocab_size * d + (self.block_size * d if self.pos == "learned" else 0)
        if not self.tie_embeddings:
            emb += self.vocab_size * d
        return total + (emb if include_embeddings else 0)


def check_size(name: str, value: Any) -> None:
    """Raise ValueError unless `value` is an int in [1, LIMITS[name]]."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r:.60}")
    if value > LIMITS[name]:
        raise ValueError(f"{name} is {value:,}, above the {LIMITS[name]:,} Muse supports")


PRESETS: dict[str, dict[str, Any]] = {
    # nanoGPT's shakespeare_char shapes (GPU config and its CPU variant).
    "shakespeare-char": dict(arch="gpt2", vocab_size=65, n_layer=6, n_head=6, n_embd=384,
                             block_size=256, dropout=0.2, bias=False, qkv_bias=False),
    "shakespeare-char-cpu": dict(arch="gpt2", vocab_size=65, n_layer=4, n_head=4, n_embd=128,
                                 block_size=64, bias=False, qkv_bias=False),
    "gpt2": dict(arch="gpt2", vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-medium": dict(arch="gpt2", vocab_size=50257, n_layer=24, n_head=16, n_embd=1024,
                        block_size=1024),
    "llama-100m": dict(arch="llama", vocab_size=32000, n_layer=12, n_head=12, n_kv_head=4,
                       n_embd=768, intermediate_size=2048, block_size=1024),
    "smollm2-135m": dict(arch="llama", vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3,
                         n_embd=576, intermediate_size=1536, block_size=8192, rope_theta=100000.0,
                         norm_eps=1e-5),
    "qwen2.5-0.5b": dict(arch="qwen2", vocab_size=151936, n_layer=24, n_head=14, n_kv_head=2,
                         n_embd=896, intermediate_size=4864, block_size=32768,
                         rope_theta=1000000.0),
    # A few-hundred-kilobyte model for tests and smoke runs.
    "tiny": dict(arch="llama", vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                 intermediate_size=128, block_size=128),
}
