"""GELU and causal attention as autograd functions over Muse's CPU kernels, for training.

Training a small model on a CPU in fp32 spends a third of each step outside the matrix
products, most of it in two PyTorch kernels that are slow at these sizes: the tanh GELU
(a forward and backward pass of its 12 x 64 x 512 activations took 1.1 ms on an AVX2
core pair; `gelu_forward` in muse/kernels/train_cpu.cpp and a multiply by the derivative it
keeps take 0.22-0.27, where recomputing the derivative from x in the backward took 0.37) and
causal attention over short sequences (flash attention, 1.1-1.6 ms forward + backward at
B=12, T=64, 4 heads of 32; `attention_forward`/`attention_backward` 0.55, and they take
the qkv projection as it is, so no transposes, slices or their backward copies). Denormal
floats are the third cost, and `flush_denormals` removes it while training; page faults on
activation buffers malloc handed back to the kernel the fourth (`keep_freed_memory`).
model.py calls `gelu_tanh` and `causal_attention` where `use_kernels` lets them; its
PyTorch calls stay the reference these are tested equal to (values and gradients).

MUSE_NO_FUSED=1 turns them off, with the fused decode step.
"""

from __future__ import annotations

import ctypes
import math
import platform

import torch
import torch.nn.functional as F

from muse import quant

# Longest sequence the attention kernel takes: measured against PyTorch's flash attention
# (2-core Xeon, AVX2 forced, forward + backward, ms): T=64 0.55 vs 1.2, T=128 2.2 vs 3.7,
# T=256 (6 heads of 64) 22-28 vs 33-36, T=512 57-96 vs 87-93 (its whole-head score rows
# outgrow L1 there, where flash tiles).
ATTENTION_MAX_T = 256


def use_kernels(x: torch.Tensor) -> bool:
    """Whether x (an activation) can go through the CPU kernels: fp32 or bf16 on the CPU,
    kernels built and not turned off."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and not quant.env_flag("MUSE_NO_FUSED") and quant.kernels_available())


def flush_denormals(on: bool) -> bool:
    """Treat floats under 1.2e-38 as 0 (x86 FTZ/DAZ) in every thread PyTorch computes on, or
    stop; returns the previous setting. Training turns it on: AdamW's second moments (squares
    of gradients near 1e-20) and the gradients themselves fall into that range as a run goes
    on, and x86 arithmetic on such denormal floats takes ~100x longer (a shakespeare-char-cpu
    step went from 33 to 39 ms between steps 0 and 800 at lr 3e-3; flushed, it stays flat).
    Without the kernels only the calling thread is set (torch.set_flush_denormal)."""
    if quant.kernels_available():
        return quant._ext.flush_denormals(on)
    torch.set_flush_denormal(on)
    return False  # torch cannot say what it was: off, PyTorch's default


# What `keep_freed_memory` sets: freed blocks up to 32 MiB (glibc's own ceiling for its adaptive
# threshold) go back to the heap, and the heap keeps up to 64 MiB free at its top.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed activation buffers for reuse instead of handing them back
    to the kernel; True where it applied (Linux with glibc). Training calls it: every step frees
    and allocates the same megabyte-sized activations and gradients, and with glibc's defaults
    many come back as fresh pages from the kernel, each page zeroed on its first touch: 800-1,150
    page faults and 1.9-2.5 ms of system time per shakespeare-char-cpu step (2-core Xeon),
    against 2 faults and 0.1 ms with this. The setting stays for the process (glibc cannot
    return to its adaptive default); `release_freed_memory` gives what is free back afterwards."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_freed_memory() -> None:
    """Return the heap's free memory to the kernel (glibc's malloc_trim); a no-op elsewhere."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        if not ctx.needs_input_grad[0]:
            return quant._ext.gelu_forward(x)[0]
        y, derivative = quant._ext.gelu_forward(x, True)  # kept instead of x: backward is one multiply
        ctx.save_for_backward(derivative)
        return y

    @staticmethod
    def backward(ctx, grad):
        (derivative,) = ctx.saved_tensors
        return grad * derivative


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU in GPT-2's tanh form, `F.gelu(x, approximate="tanh")`, through the kernels when it can."""
    if x.dtype != torch.float32 or not use_kernels(x):
        return F.gelu(x, approximate="tanh")
    return _Gelu.apply(x.contiguous())


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, n_head: int, n_kv_head: int):
        scale = 1.0 / math.sqrt(qkv.shape[-1])
        out, lse = quant._ext.attention_forward(qkv, n_head, n_kv_head, scale)
        ctx.save_for_backward(qkv, out, lse)
        ctx.heads = (n_head, n_kv_head, scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        qkv, out, lse = ctx.saved_tensors
        n_head, n_kv_head, scale = ctx.heads
        return quant._ext.attention_backward(grad.contiguous(), qkv, n_head, n_kv_head, out, lse, scale), None, None


def attention_applies(qkv: torch.Tensor, dropout: float) -> bool:
    """Whether `causal_attention` takes this: no dropout, at most ATTENTION_MAX_T tokens."""
    return dropout == 0.0 and 1 < qkv.shape[1] <= ATTENTION_MAX_T and use_kernels(qkv)


def causal_attention(qkv: torch.Tensor, n_head: int, n_kv_head: int) -> torch.Tensor:
    """Causal self-attention of qkv (B, T, n_head + 2 n_kv_head, hd) — query heads, key heads,
    value heads — scaled by 1/sqrt(hd): (B, T, n_head, hd), in qkv's dtype. Computed in fp32
    (bf16 inputs are widened, as model.py does for CPU attention under autocast)."""
    dtype = qkv.dtype
    out = _CausalAttention.apply(qkv.float() if dtype != torch.float32 else qkv, n_head, n_kv_head)
    return out.to(dtype)
