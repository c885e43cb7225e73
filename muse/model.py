"""Muse's Transformer: one decoder-only model for the GPT-2 and Llama/Qwen2 families.

Switches in `ModelConfig` pick the norm (LayerNorm / RMSNorm), positions (learned /
RoPE), MLP (GELU / SwiGLU), grouped-query attention, biases and tied embeddings.
`forward(idx, targets=None, cache=None)` serves training (targets → loss) and
inference (a `KVCache` → incremental decoding).

Linear layers are plain `nn.Linear` unless a checkpoint is quantized, in which case
the loader swaps in `muse.quant.QuantLinear` (same call signature). q/k/v are one
fused projection and SwiGLU's gate/up another: fewer, larger matmuls per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from muse.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like the reference implementations, then cast back.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_cache(config: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (block_size, head_dim) in fp32, halves duplicated (HF layout)."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
    t = torch.arange(config.block_size, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., hd) by position; cos/sin broadcast against it. "rotate_half" convention."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Preallocated keys and values for every layer, filled left to right.

    k[layer], v[layer]: (B, n_kv_head, max_len, head_dim). `pos` counts the filled
    positions (the same for every row of the batch). Reused across decode steps so
    no tensor is reallocated per token.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if max_len > config.block_size:
            raise ValueError(f"max_len ({max_len}) exceeds the context window ({config.block_size})")
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.pos = 0

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hd) at `pos`; return all keys/values so far."""
        end = self.pos + k.shape[2]
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (in that order) — beam search reshuffles beams."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]

    def crop(self, length: int) -> None:
        """Forget positions from `length` on (the next write starts there)."""
        self.pos = min(self.pos, length)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        qkv_out = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.qkv = nn.Linear(config.n_embd, qkv_out, bias=config.qkv_bias)
        self.proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, cache: KVCache | None, layer: int, start: int) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv = self.n_head, self.n_kv_head
        qkv = self.qkv(x).view(B, T, nh + 2 * nkv, self.head_dim)  # heads: [q..., k..., v...]
        qk, v = qkv[:, :, : nh + nkv], qkv[:, :, nh + nkv:]
        if rope is not None:
            qk = apply_rope(qk, *rope)  # q and k heads rotated in one pass
        q = qk[:, :, :nh].transpose(1, 2)  # (B, nh, T, hd)
        k = qk[:, :, nh:].transpose(1, 2)  # (B, nkv, T, hd)
        v = v.transpose(1, 2)  # (B, nkv, T, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, start+T, hd)
        if T == 1:
            mask, causal = None, False  # one query sees every cached key
        elif start == 0:
            mask, causal = None, True
        else:
            # Prefill on top of a filled cache: query i sits at position start+i.
            q_pos = torch.arange(start, start + T, device=x.device)[:, None]
            mask, causal = torch.arange(start + T, device=x.device)[None, :] <= q_pos, False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.mlp
        hidden = config.intermediate_size
        if self.kind == "swiglu":
            self.gate_up = nn.Linear(config.n_embd, 2 * hidden, bias=config.bias)  # [gate; up]
            self.down = nn.Linear(hidden, config.n_embd, bias=config.bias)
        else:
            self.fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
            self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.dropout(self.down(F.silu(gate) * up))
        # GPT-2 uses the tanh approximation of GELU ("gelu_new").
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = Attention(config)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope, cache, layer, start):
        x = x + self.attn(self.norm1(x), rope, cache, layer, start)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Decoder-only Transformer. Parameter names are Muse's own checkpoint keys.

    `wte` is an `nn.Embedding`, or a `QuantLinear` read row-wise when the embedding
    is quantized. With tied embeddings there is no `lm_head`: the head reuses `wte`.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.pos == "rope":
            cos, sin = rope_cache(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    # -- weights ------------------------------------------------------------------

    def init_weights(self, seed: int | None = None) -> "Transformer":
        """GPT-2 style initialisation for training from scratch."""
        if seed is not None:
            torch.manual_seed(seed)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02
                if name.endswith(("attn.proj.weight", "mlp.proj.weight", "mlp.down.weight")):
                    std = 0.02 / math.sqrt(2 * self.config.n_layer)  # scaled residual projections
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def reset_rope(self) -> None:
        """Recompute RoPE tables (after building under `torch.device('meta')`)."""
        if self.config.pos == "rope":
            self.rope_cos, self.rope_sin = rope_cache(self.config, device="cpu")

    @property
    def device(self) -> torch.device:
        return self.norm_f.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (quantized layers compute in it too)."""
        return self.norm_f.weight.dtype

    # -- forward ------------------------------------------------------------------

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        if isinstance(self.wte, nn.Embedding):
            return self.wte(idx)
        return self.wte.embedding(idx)  # quantized embedding: dequantize only these rows

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head(x)
        if isinstance(self.wte, nn.Embedding):
            return F.linear(x, self.wte.weight)
        return self.wte(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False):
        """idx (B, T) token ids → (logits, loss).

        logits are (B, T, vocab) — or (B, 1, vocab) with `last_only`, which skips the
        vocabulary projection for every position but the one generation needs.
        targets (B, T) give a cross-entropy loss; -100 marks positions to ignore.
        With a cache, idx continues the cached sequence and the cache advances.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds the context window ({self.config.block_size})"
            )
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the KV cache ({cache.max_len})")
        x = self.embed(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        x = self.drop(x)
        rope = None
        if self.config.pos == "rope":
            # (T, 1, hd): broadcast over the heads of (B, T, heads, hd)
            rope = (self.rope_cos[start:start + T, None], self.rope_sin[start:start + T, None])
        for i, block in enumerate(self.layers):
            x = block(x, rope, cache, i, start)
        if cache is not None:
            cache.pos = start + T
        x = self.norm_f(x)
        if targets is not None:
            logits = self.head(x).float()
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
            return logits, loss
        if last_only:
            x = x[:, -1:, :]  # only the next token's logits are needed at inference
        return self.head(x).float(), None
