"""Training's CPU kernels (muse/ops.py, muse/kernels/train_cpu.cpp) against PyTorch's own
GELU and attention, values and gradients, on every instruction set built here."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from muse import ops, quant
from muse.config import ModelConfig
from muse.model import KVCache, Transformer
from tests.helpers import isas_to_test, spy_on_kernels

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler: the kernels cannot be built here")


@pytest.fixture(scope="module", params=isas_to_test())
def isa_module(request):
    module = quant.kernels(request.param)
    assert module.isa() == request.param
    return module


@pytest.mark.parametrize("n", [1, 7, 16, 1000, 40_003])  # vector tails, one and several threads' worth
def test_gelu_equals_pytorchs_tanh_gelu(isa_module, n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen) * 4
    x[: min(n, 4)] = torch.tensor([-100.0, 100.0, 0.0, -3.0])[: min(n, 4)]  # saturated ends, zero
    grad = torch.randn(n, generator=gen)
    ref = x.clone().requires_grad_()
    F.gelu(ref, approximate="tanh").backward(grad)
    (y,) = isa_module.gelu_forward(x)
    y2, derivative = isa_module.gelu_forward(x, True)
    torch.testing.assert_close(y, F.gelu(x, approximate="tanh"), rtol=2e-6, atol=2e-6)
    assert torch.equal(y2, y)
    torch.testing.assert_close(grad * derivative, ref.grad, rtol=2e-5, atol=2e-5)


def reference_attention(qkv: torch.Tensor, nh: int, nkv: int, grad: torch.Tensor):
    """PyTorch's causal SDPA over the same heads: the output (B, T, nh, D) and d qkv."""
    x = qkv.clone().requires_grad_()
    q, k, v = (t.transpose(1, 2) for t in (x[:, :, :nh], x[:, :, nh:nh + nkv], x[:, :, nh + nkv:]))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=nh != nkv).transpose(1, 2)
    out.backward(grad)
    return out.detach(), x.grad


@pytest.mark.parametrize("B,T,nh,nkv,D", [(2, 1, 2, 2, 16), (3, 19, 4, 2, 20), (1, 64, 4, 4, 32),
                                          (2, 37, 6, 1, 64), (1, 130, 2, 2, 48), (1, 9, 3, 3, 80)])
def test_attention_equals_pytorchs_causal_attention(isa_module, B, T, nh, nkv, D):
    gen = torch.Generator().manual_seed(T * 10 + D)
    qkv = torch.randn(B, T, nh + 2 * nkv, D, generator=gen) * 2
    grad = torch.randn(B, T, nh, D, generator=gen)
    scale = D ** -0.5
    out, lse = isa_module.attention_forward(qkv, nh, nkv, scale)
    ref_out, ref_grad = reference_attention(qkv, nh, nkv, grad)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    got = isa_module.attention_backward(grad, qkv, nh, nkv, out, lse, scale)
    torch.testing.assert_close(got, ref_grad, rtol=1e-4, atol=1e-4)


def test_attention_reads_strided_heads(isa_module):
    """model.py hands over a view (RoPE'd heads concatenated, or a slice of a wider tensor)."""
    wide = torch.randn(2, 11, 10, 24)
    qkv = wide[:, :, 1:9]  # 4 query heads, 2 key, 2 value heads; rows 240 floats apart
    grad = torch.randn(2, 11, 4, 24)
    out, lse = isa_module.attention_forward(qkv, 4, 2, 24 ** -0.5)
    ref_out, ref_grad = reference_attention(qkv.contiguous(), 4, 2, grad)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(isa_module.attention_backward(grad, qkv, 4, 2, out, lse, 24 ** -0.5), ref_grad,
                               rtol=1e-4, atol=1e-4)


def test_attention_rejects_a_wrong_head_split(isa_module):
    with pytest.raises(RuntimeError, match="n_head query heads"):
        isa_module.attention_forward(torch.randn(1, 4, 5, 8), 2, 2, 1.0)


@pytest.fixture
def spy(monkeypatch):
    return spy_on_kernels(monkeypatch)


MODELS = {  # GPT-2 blocks (tanh GELU, MHA) and Llama blocks (RoPE, GQA, SwiGLU)
    "gpt2": dict(arch="gpt2", n_head=4, n_embd=64),
    "llama-gqa": dict(arch="llama", n_head=4, n_kv_head=2, n_embd=64, intermediate_size=96),
}


def loss_and_grads(model, x, y):
    model.zero_grad()
    _, loss = model(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(MODELS))
def test_training_step_equals_the_pytorch_reference(spy, monkeypatch, name):
    model = Transformer(ModelConfig(vocab_size=70, n_layer=2, block_size=64, dropout=0.0, **MODELS[name]))
    model.init_weights(3).train()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 70, (3, 29), generator=gen), torch.randint(0, 70, (3, 29), generator=gen)
    loss, grads = loss_and_grads(model, x, y)
    assert spy.counts["attention_backward"] == 2
    assert spy.counts["gelu_forward"] == (2 if name == "gpt2" else 0)
    monkeypatch.setenv("MUSE_NO_FUSED", "1")
    ref_loss, ref_grads = loss_and_grads(model, x, y)
    assert spy.counts["attention_forward"] == 2  # not called again with the kernels off
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_what_the_kernels_do_not_take_runs_pytorch(spy):
    config = ModelConfig(vocab_size=70, n_layer=1, block_size=300, n_head=2, n_embd=32, dropout=0.1)
    model = Transformer(config).init_weights(0).train()
    model(torch.randint(0, 70, (1, 20)))  # attention dropout in training: SDPA's
    assert spy.counts["attention_forward"] == 0
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, 70, (1, ops.ATTENTION_MAX_T + 1)))  # longer than the kernel is measured for
        assert spy.counts["attention_forward"] == 0
        model(torch.randint(0, 70, (1, 5)), cache=KVCache(config, 1, 8))  # generation: the KV cache path
        assert spy.counts["attention_forward"] == 0
        model(torch.randint(0, 70, (1, 20)))  # scoring a text: the kernel
    assert spy.counts["attention_forward"] == 1


def test_bf16_autocast_training_widens_to_the_kernels(spy):
    model = Transformer(ModelConfig(vocab_size=70, n_layer=1, block_size=64, n_head=2, n_embd=32, dropout=0.0))
    model.init_weights(0).train()
    x = torch.randint(0, 70, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(x, x)
    loss.backward()
    assert spy.counts["attention_backward"] == 1
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
