"""The fused decode step: the next tokens through every block in one C++ call.

A decode step of a small model is mostly overhead: SmolLM2's 30 blocks make some 25 torch
dispatches each around their four matrix products (norms, RoPE, cache writes, attention,
SiLU * up, residuals), and on a 2-core AVX2 CPU that was half of each token's time.
`decode_layer` in muse/kernels/quant_cpu.cpp does the whole block, calling the quantized
kernels directly, and `DecodeStack` runs it over every block with their arguments converted
once per KV cache (a generation, or the server's batch). It applies to what decoding looks
like on the CPU: under 32 new tokens in all (a sequence's next token, a prompt-lookup draft
being checked, the server's batch of next tokens, a short prompt), a KV cache, pre-norm Llama/Qwen2 blocks (RMSNorm, RoPE,
SwiGLU) whose linears are all `QuantLinear`s the kernels take, fp32 activations, no
autograd. Everything else — long prompts, GPT-2, fp32/bf16 weights, training — runs
model.py's blocks, which stay the reference this path is tested equal to.

MUSE_NO_FUSED=1 turns it off (to compare, or to rule it out).
"""

from __future__ import annotations

import torch

from muse import quant
from muse.quant import QuantLinear


def _linear_args(layer) -> tuple | None:
    """A QuantLinear's buffers as decode_layer takes them, or None if it cannot."""
    if type(layer) is not QuantLinear or layer.group_size % 32:
        return None
    b = layer._buffers
    return (b["qweight"], b["scales"], b["mins"], b["bias"], layer.bits, layer.group_size, layer.act_bits)


def _block_args(block) -> tuple | None:
    """(norm1, norm2, eps, qkv, proj, gate_up, down) of a block `applies` let through (RMSNorm,
    SwiGLU by its config), or None if a linear cannot take the kernels."""
    attn, mlp = block.attn, block.mlp
    lins = [_linear_args(m) for m in (attn.qkv, attn.proj, mlp.gate_up, mlp.down)]
    if any(a is None for a in lins):
        return None
    return (block.norm1.weight, block.norm2.weight, block.norm1.eps, *lins)


def applies(model, idx: torch.Tensor, cache) -> bool:
    """Whether `decode` can run this forward; cheap checks first: this runs every token."""
    c = model.config
    return (
        cache is not None
        # rows x new tokens: decode steps, drafts, a batch's next tokens, short prompts; from
        # quant.PREFILL_MIN_M on the tile GEMM serves them better (or 32 if that path is off)
        and idx.numel() < (quant.PREFILL_MIN_M or 32)
        and not model.training
        and not torch.is_grad_enabled()
        and c.pos == "rope" and c.norm == "rmsnorm" and c.mlp == "swiglu"
        and idx.device.type == "cpu"
        and model.dtype == torch.float32
        and cache.k[0].dtype == torch.float32
        and not quant.env_flag("MUSE_NO_FUSED")
        and quant.kernels_available()
    )


def _stack(model, cache):
    """The model's blocks as one `DecodeStack` (None if a block cannot take the kernels), kept on
    the KV cache: a cache serves one generation (or one server's batch), so the blocks' buffers
    are read from the modules once, not every token. A cache used with another model, or whose
    `fused_stack` was reset (the scheduler does after running other work on its model), gets a
    new one."""
    held = getattr(cache, "fused_stack", None)
    if held is not None and held[0] is model:
        return held[1]
    blocks = [_block_args(b) for b in model.layers]
    stack = None if any(a is None for a in blocks) else quant._ext.DecodeStack(blocks)
    cache.fused_stack = (model, stack)
    return stack


def decode(model, x: torch.Tensor, cache, pos: torch.Tensor) -> torch.Tensor | None:
    """x (B, T, C) after every block; `pos` the tokens' positions, (T,) for a KVCache (every
    row at the same ones) or (B, T) for a BatchKVCache (row b at its own), as `cache.prepare`
    gave them. Their keys and values are cached. None (nothing touched) when a block cannot
    take the fused path."""
    stack = _stack(model, cache)
    if stack is None:
        return None
    B, T, C = x.shape
    c = model.config
    where = pos.expand(B, T).reshape(-1).contiguous()  # (B*T,): b-major, as x's rows
    rows = torch.arange(B).repeat_interleave(T)
    cos, sin = model.rope_cos[where], model.rope_sin[where]  # (B*T, hd)
    h = x.reshape(B * T, C).contiguous()
    h = stack.run(h, cos, sin, cache.k, cache.v, rows, where, c.n_head, c.n_kv_head)
    return h.view(B, T, C)
