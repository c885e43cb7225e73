"""Muse's Transformer: one decoder-only model for the GPT-2 and Llama/Qwen2 families.

Switches in `ModelConfig` pick the norm (LayerNorm / RMSNorm), positions (learned /
RoPE), MLP (GELU / SwiGLU), grouped-query attention, biases and tied embeddings.
`forward(idx, targets=None, cache=None)` serves training (targets → loss) and
inference (a `KVCache` → incremental decoding; a `BatchKVCache` → many sequences of
different lengths decoded together, for the server's continuous batching).

Linear layers are plain `nn.Linear` unless a checkpoint is quantized, in which case
the loader swaps in `muse.quant.QuantLinear` (same call signature). q/k/v are one
fused projection and SwiGLU's gate/up another: fewer, larger matmuls per token.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from muse import fused as _fused
from muse import ops
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


# RoPE tables start this long and double, up to block_size, when a longer sequence comes: a
# 128k-context config costs a few MB until it is used that far, not the whole table up front.
ROPE_TABLE_START = 4096


def rope_cache(config: ModelConfig, length: int | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (length, head_dim) in fp32 for positions 0..length-1 (default block_size),
    halves duplicated (HF layout)."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
    t = torch.arange(config.block_size if length is None else length, dtype=torch.float32, device=device)
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
        self.fused_stack = None  # (model, its blocks for the fused decode step): muse/fused.py

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

    @property
    def seq_len(self) -> int:
        return self.pos

    def prepare(self, T: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions (T,) of the next T tokens and their attention mask (None: causal, or one
        query that sees every cached key)."""
        if self.pos + T > self.max_len:
            raise ValueError(f"sequence of {self.pos + T} tokens exceeds the KV cache ({self.max_len})")
        pos = torch.arange(self.pos, self.pos + T, device=device)
        if T == 1 or self.pos == 0:
            return pos, None
        # Prefill on top of a filled cache: query i sits at position pos+i.
        return pos, torch.arange(self.pos + T, device=device)[None, :] <= pos[:, None]

    def advance(self, T: int) -> None:
        self.pos += T

    def truncate(self, pos: int) -> None:
        """Forget every position from `pos` on (a rejected speculative draft's); later tokens overwrite them."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot truncate a cache of {self.pos} positions to {pos}")
        self.pos = pos


class BatchKVCache:
    """Keys and values for continuous batching: every row has its own length.

    k[layer], v[layer]: (row_capacity, n_kv_head, len_capacity, head_dim). Rows [0, rows) are
    in use; row b holds `lengths[b]` positions and its next tokens go there, at those
    positions, attending only to its own keys. Rows join between steps from a prefilled
    single-row `KVCache` (`add`) and leave (`remove`, which moves the last row into the hole
    so the rows in use stay one contiguous view). Capacity grows on demand, up to the
    context window, so memory follows the longest live sequence rather than the worst case.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.config, self.dtype, self.device = config, dtype, device
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._alloc(0, 0)
        self.lens: list[int] = []  # per row, in Python: no device sync to read them
        self.lengths = torch.zeros(0, dtype=torch.long, device=device)  # (rows,)
        self._write: tuple[torch.Tensor, torch.Tensor] | None = None  # set by prepare()
        self.fused_stack = None  # (model, its blocks for the fused decode step): muse/fused.py

    @property
    def rows(self) -> int:
        return len(self.lens)

    @property
    def seq_len(self) -> int:
        return max(self.lens, default=0)

    def _alloc(self, rows: int, length: int) -> None:
        """(Re)allocate to rows × length, keeping what the rows in use hold."""
        c = self.config
        shape = (rows, c.n_kv_head, length, c.head_dim)
        old_k, old_v = self.k, self.v
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.n_layer)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.n_layer)]
        if old_k and self.lens:
            n, L = len(self.lens), max(self.lens)
            for new, old in zip(self.k + self.v, old_k + old_v):
                new[:n, :, :L] = old[:n, :, :L]

    def _reserve(self, rows: int, length: int) -> None:
        if length > self.config.block_size:
            raise ValueError(f"sequence of {length} tokens exceeds the context window ({self.config.block_size})")
        cap_rows, cap_len = self.k[0].shape[0], self.k[0].shape[2]
        if rows > cap_rows or length > cap_len:
            # grow geometrically: a few copies over a long generation, not one per token
            self._alloc(max(rows, 2 * cap_rows) if rows > cap_rows else cap_rows,
                        min(self.config.block_size, max(length, 2 * cap_len)) if length > cap_len else cap_len)

    def add(self, cache: KVCache, src_row: int = 0, length: int | None = None) -> int:
        """Append row `src_row` of a prefilled cache (its first `length` positions, default
        all it holds: a right-padded batch prefill passes each prompt's own length) as a new
        row; returns its row index."""
        n = cache.pos if length is None else length
        if not 0 < n <= cache.pos:
            raise ValueError(f"length must be in [1, {cache.pos}], got {n}")
        row = self.rows
        self._reserve(row + 1, max(self.seq_len, n))
        for dst, src in zip(self.k + self.v, cache.k + cache.v):
            dst[row, :, :n] = src[src_row, :, :n]
        self.lens.append(n)
        self.lengths = torch.tensor(self.lens, dtype=torch.long, device=self.device)
        return row

    def remove(self, row: int) -> None:
        """Drop `row`; the last row moves into its place (callers mirror this swap)."""
        last = self.rows - 1
        if row != last:
            n = self.lens[last]
            for t in self.k + self.v:
                t[row, :, :n] = t[last, :, :n]
            self.lens[row] = n
        self.lens.pop()
        if not self.lens:
            self._alloc(0, 0)  # idle: give the memory back
        self.lengths = torch.tensor(self.lens, dtype=torch.long, device=self.device)

    def prepare(self, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (rows, T) of the next T tokens of every row, and the mask (rows, 1, T, L)
        that lets query i of row b see keys 0..lengths[b]+i."""
        self._reserve(self.rows, self.seq_len + T)
        pos = self.lengths[:, None] + torch.arange(T, device=device)  # (rows, T)
        self._write = (torch.arange(self.rows, device=device)[:, None], pos)  # where update() stores, every layer
        keys = torch.arange(self.seq_len + T, device=device)  # (L,)
        return pos, (keys[None, None, :] <= pos[:, :, None])[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (rows, nkv, T, hd) at each row's own positions; return keys/values (rows, nkv, L, hd)."""
        rows, pos = self._write
        # advanced indices (rows, T) around a slice put those dims first: (rows, T, nkv, hd)
        self.k[layer][rows, :, pos] = k.transpose(1, 2)
        self.v[layer][rows, :, pos] = v.transpose(1, 2)
        end = self.seq_len + k.shape[2]
        return self.k[layer][:self.rows, :, :end], self.v[layer][:self.rows, :, :end]

    def advance(self, T: int) -> None:
        self.lens = [n + T for n in self.lens]
        self.lengths = self.lengths + T

    def truncate(self, lengths: list[int]) -> None:
        """Row b keeps its first lengths[b] positions (the rest held a rejected draft or padding)."""
        if len(lengths) != self.rows or any(not 0 < n <= m for n, m in zip(lengths, self.lens)):
            raise ValueError(f"cannot truncate rows of {self.lens} positions to {lengths}")
        self.lens = list(lengths)
        self.lengths = torch.tensor(self.lens, dtype=torch.long, device=self.device)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        qkv_out = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.qkv = nn.Linear(config.n_embd, qkv_out, bias=config.qkv_bias)
        self.proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, cache: "KVCache | BatchKVCache | None", layer: int,
                mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv = self.n_head, self.n_kv_head
        qkv = self.qkv(x).view(B, T, nh + 2 * nkv, self.head_dim)  # heads: [q..., k..., v...]
        qk, v = qkv[:, :, : nh + nkv], qkv[:, :, nh + nkv:]
        if rope is not None:
            qk = apply_rope(qk, *rope)  # q and k heads rotated in one pass
        if cache is None and mask is None and ops.attention_applies(qkv, self.dropout if self.training else 0.0):
            # Training and scoring on the CPU: the heads as they are, no transposes (muse/ops.py).
            qkv = qkv if rope is None else torch.cat([qk, v], dim=2)
            y = ops.causal_attention(qkv, nh, nkv).reshape(B, T, nh * self.head_dim)
            return self.resid_dropout(self.proj(y))
        q = qk[:, :, :nh].transpose(1, 2)  # (B, nh, T, hd)
        k = qk[:, :, nh:].transpose(1, 2)  # (B, nkv, T, hd)
        v = v.transpose(1, 2)  # (B, nkv, T, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, L, hd): every key so far
        y = self._attend(q, k, v, mask, T)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.proj(y))

    def _attend(self, q, k, v, mask, T: int) -> torch.Tensor:
        """Scaled dot-product attention: q (B, nh, T, hd), k/v (B, nkv, L, hd) → (B, nh, T, hd), in q's dtype."""
        dtype = q.dtype
        fp32 = q.device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.is_grad_enabled()
        if fp32:
            # CPU flash attention's backward in bf16 is ~5x slower than in fp32 (torch 2.13: 2.4 vs
            # 0.5 ms at B=12, T=64, 4 heads of 32), which undid bf16 training's gain on CPUs.
            q, k, v = q.float(), k.float(), v.float()
        with torch.autocast("cpu", enabled=False) if fp32 else contextlib.nullcontext():
            # No mask: causal over the T new tokens, or a single query that sees every cached key.
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_head != self.n_head,
            )
        return y.to(dtype)


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
        return self.dropout(self.proj(ops.gelu_tanh(self.fc(x))))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = Attention(config)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope, cache, layer, mask):
        x = x + self.attn(self.norm1(x), rope, cache, layer, mask)
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
            cos, sin = rope_cache(config, min(config.block_size, ROPE_TABLE_START))
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
            self.rope_cos, self.rope_sin = rope_cache(self.config, min(self.config.block_size, ROPE_TABLE_START),
                                                      device="cpu")

    def _grow_rope(self, length: int) -> None:
        """Extend the RoPE tables to cover positions < length (doubling, at most block_size).

        Computed on the CPU in fp32 like the first table, then moved to the tables' device and
        dtype, so every position gets the same values however far the tables have grown."""
        n = min(self.config.block_size, max(length, 2 * self.rope_cos.shape[0]))
        cos, sin = rope_cache(self.config, n, device="cpu")
        self.rope_cos = cos.to(self.rope_cos.device, self.rope_cos.dtype)
        self.rope_sin = sin.to(self.rope_sin.device, self.rope_sin.dtype)

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
                cache: "KVCache | BatchKVCache | None" = None, last_only: bool = False,
                logits_at: torch.Tensor | None = None):
        """idx (B, T) token ids → (logits, loss).

        logits are (B, T, vocab) — or (B, 1, vocab) with `last_only`, which skips the
        vocabulary projection for every position but the one generation needs, or with
        `logits_at` (B,), the position of row b whose logits row b gets (the last real token
        of each prompt in a right-padded batch).
        targets (B, T) give a cross-entropy loss; -100 marks positions to ignore.
        With a cache, idx continues the cached sequence and the cache advances; with a
        `BatchKVCache`, row b continues row b of the cache at its own length.
        """
        B, T = idx.shape
        end = (cache.seq_len if cache is not None else 0) + T
        if end > self.config.block_size:
            raise ValueError(f"sequence of {end} tokens exceeds the context window ({self.config.block_size})")
        if cache is not None:
            pos, mask = cache.prepare(T, idx.device)  # pos (T,) or (B, T)
        else:
            pos, mask = torch.arange(T, device=idx.device), None
        x = self.embed(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(pos)
        x = self.drop(x)
        if self.config.pos == "rope" and end > self.rope_cos.shape[0]:
            self._grow_rope(end)
        fused = _fused.decode(self, x, cache, pos) if _fused.applies(self, idx, cache) else None
        if fused is not None:  # a few new tokens, quantized: the same blocks in C++ (muse/fused.py)
            x = fused
        else:
            rope = None
            if self.config.pos == "rope":
                # (T, 1, hd) or (B, T, 1, hd): broadcast over the heads of (B, T, heads, hd)
                rope = (self.rope_cos[pos].unsqueeze(-2), self.rope_sin[pos].unsqueeze(-2))
            for i, block in enumerate(self.layers):
                x = block(x, rope, cache, i, mask)
        if cache is not None:
            cache.advance(T)
        x = self.norm_f(x)
        if targets is not None:
            logits = self.head(x).float()
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
            return logits, loss
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at][:, None]  # (B, 1, C)
        elif last_only:
            x = x[:, -1:, :]  # only the next token's logits are needed at inference
        return self.head(x).float(), None
