"""The fused decode step (muse/fused.py) against model.py's blocks, the reference."""

from __future__ import annotations

import shutil

import pytest
import torch

from muse import fused, quant
from muse.config import ModelConfig
from muse.model import BatchKVCache, KVCache, Transformer
from muse.quant import quantize_model, set_activation_bits
from tests.helpers import spy_on_kernels

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler: the kernels cannot be built here")

CONFIGS = {
    "llama-gqa": dict(arch="llama", n_head=4, n_kv_head=2, n_embd=64, intermediate_size=96),
    "qwen2-bias": dict(arch="qwen2", n_head=4, n_kv_head=1, n_embd=64, intermediate_size=160, rope_theta=1e6),
    "llama-mha-untied": dict(arch="llama", n_head=2, n_kv_head=2, n_embd=96, intermediate_size=64,
                             tie_embeddings=False, head_dim=48),
}


@pytest.fixture
def spy(monkeypatch):
    return spy_on_kernels(monkeypatch)


def tiny(name: str, bits: int, seed: int = 0) -> Transformer:
    config = ModelConfig(vocab_size=80, n_layer=3, block_size=64, **CONFIGS[name])
    model = Transformer(config).init_weights(seed)
    if config.qkv_bias:  # give the biases values, or a wrong bias path would go unseen
        for block in model.layers:
            torch.nn.init.normal_(block.attn.qkv.bias, std=0.5)
    for block in model.layers:  # norms away from 1, so a skipped weight shows
        torch.nn.init.normal_(block.norm1.weight, 1.0, 0.3)
        torch.nn.init.normal_(block.norm2.weight, 1.0, 0.3)
    quantize_model(model, bits=bits, group_size=32, skip={"lm_head"})
    return model.eval()


def assert_close_after(got, ref, act_bits: int) -> None:
    """fp32: equal up to summation order. int8 activations: a last-bit difference in a layer's
    input can flip one element's rounding (a step of absmax/127 of its block), which the next
    layers carry, so the outputs agree to about 1 % of their scale, not to the last bits
    (test_quant checks the int8 kernel exactly against its reference, layer by layer)."""
    tol = 1e-4 if act_bits == 32 else 2e-2
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item())


def decode_logits(model, prompt: list[int], steps: list[int], monkeypatch, fused_on: bool):
    """Prefill `prompt`, then feed `steps` one at a time; logits (len(steps), V) and the cache."""
    if fused_on:
        monkeypatch.delenv("MUSE_NO_FUSED", raising=False)
    else:
        monkeypatch.setenv("MUSE_NO_FUSED", "1")
    cache = KVCache(model.config, 1, len(prompt) + len(steps))
    rows = []
    with torch.inference_mode():
        model(torch.tensor([prompt]), cache=cache, last_only=True)
        for tok in steps:
            logits, _ = model(torch.tensor([[tok]]), cache=cache, last_only=True)
            rows.append(logits[0, -1])
    return torch.stack(rows), cache


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("bits, act_bits", [(4, 32), (8, 32), (4, 8)])
def test_fused_decode_equals_the_reference_blocks(spy, monkeypatch, name, bits, act_bits):
    model = tiny(name, bits)
    set_activation_bits(model, act_bits)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 80, (9,), generator=gen).tolist()
    steps = torch.randint(0, 80, (12,), generator=gen).tolist()
    ref, ref_cache = decode_logits(model, prompt, steps, monkeypatch, fused_on=False)
    assert spy.counts["decode_layer"] == 0
    got, cache = decode_logits(model, prompt, steps, monkeypatch, fused_on=True)
    assert spy.counts["decode_layer"] == (1 + len(steps)) * model.config.n_layer  # the short prompt too
    assert spy.counts["DecodeStack"] == 1  # the blocks' arguments were read once for the whole generation
    assert_close_after(got, ref, act_bits)
    assert cache.pos == ref_cache.pos == len(prompt) + len(steps)
    for a, b in zip(cache.k + cache.v, ref_cache.k + ref_cache.v):
        assert_close_after(a, b, act_bits)


@pytest.mark.parametrize("bits, act_bits", [(4, 32), (4, 8)])
def test_fused_chunks_equal_the_reference_blocks(spy, monkeypatch, bits, act_bits):
    """Drafts being checked (several tokens after a prompt) and a short prompt from position 0."""
    model = tiny("qwen2-bias", bits, seed=5)
    set_activation_bits(model, act_bits)
    gen = torch.Generator().manual_seed(2)
    chunks = [torch.randint(0, 80, (n,), generator=gen).tolist() for n in (7, 1, 5, 9, 2)]

    def run(fused_on: bool):
        monkeypatch.setenv("MUSE_NO_FUSED", "0" if fused_on else "1")
        cache = KVCache(model.config, 1, 32)
        with torch.inference_mode():
            return torch.cat([model(torch.tensor([c]), cache=cache)[0][0] for c in chunks]), cache

    ref, ref_cache = run(False)
    assert spy.counts["decode_layer"] == 0
    got, cache = run(True)
    assert spy.counts["decode_layer"] == len(chunks) * model.config.n_layer
    assert_close_after(got, ref, act_bits)
    for a, b in zip(cache.k + cache.v, ref_cache.k + ref_cache.v):
        assert_close_after(a, b, act_bits)


def test_fused_decode_greedy_text_equals_the_reference(spy, monkeypatch):
    from muse.generation import stream_generate

    def tokens():
        chunks = stream_generate(model, None, [5, 6, 7], max_new_tokens=24, temperature=0, prompt_lookup=0,
                                 loop_guard=False)
        return [c.token for c in chunks]

    model = tiny("qwen2-bias", 4, seed=3)
    monkeypatch.setenv("MUSE_NO_FUSED", "1")
    ref = tokens()
    monkeypatch.delenv("MUSE_NO_FUSED")
    assert tokens() == ref and len(ref) == 24
    assert spy.counts["decode_layer"] > 0


def test_a_batch_of_rows_at_their_own_lengths_equals_the_reference(spy, monkeypatch):
    """The server's BatchKVCache: rows joined from prompts of different lengths, decoded together
    (one token each, then a two-token step), and a two-row KVCache (beams share positions)."""
    model = tiny("qwen2-bias", 4, seed=7)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 80, (n,), generator=gen).tolist() for n in (5, 11, 2)]
    steps = [torch.randint(0, 80, (3, t), generator=gen) for t in (1, 1, 2, 1)]

    def run(fused_on: bool):
        monkeypatch.setenv("MUSE_NO_FUSED", "0" if fused_on else "1")
        batch = BatchKVCache(model.config)
        out = []
        with torch.inference_mode():
            for p in prompts:
                one = KVCache(model.config, 1, 16)
                model(torch.tensor([p]), cache=one)
                batch.add(one)
            for ids in steps:
                out.append(model(ids, cache=batch)[0].reshape(-1, 80))
            beams = KVCache(model.config, 2, 8)
            model(torch.tensor([[1, 2], [1, 2]]), cache=beams)
            out.append(model(torch.tensor([[3], [4]]), cache=beams)[0].reshape(-1, 80))
        return torch.cat(out), batch

    ref, ref_batch = run(False)
    calls = spy.counts["decode_layer"]  # the prompts (short) took the fused path in both runs
    got, batch = run(True)
    assert spy.counts["decode_layer"] - calls >= (len(steps) + 1) * model.config.n_layer
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert batch.lens == ref_batch.lens
    for a, b in zip(batch.k + batch.v, ref_batch.k + ref_batch.v):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_what_the_fused_path_does_not_take_runs_the_reference(spy):
    model = tiny("llama-gqa", 4)
    with torch.inference_mode():
        cache = KVCache(model.config, 1, 40)  # a long prompt: the tile GEMM's
        model(torch.tensor([list(range(quant.PREFILL_MIN_M))]), cache=cache)
        model(torch.tensor([[1]]))  # no cache
    with torch.no_grad():
        exact = Transformer(model.config).init_weights(0).eval()  # fp32 weights: no QuantLinear
        cache = KVCache(model.config, 1, 8)
        exact(torch.tensor([[1]]), cache=cache)
    cache = KVCache(model.config, 1, 8)
    model(torch.tensor([[1]]), cache=cache)  # autograd on
    assert spy.counts["decode_layer"] == 0


def test_a_cache_keeps_its_stack_until_the_model_or_the_reset_changes_it(spy, monkeypatch):
    """The blocks' arguments live on the KV cache: a swapped-out linear is seen by a new cache, or
    after `fused_stack` is reset (the scheduler resets it after running other work on its model)."""
    model = tiny("llama-gqa", 4)
    other = tiny("llama-gqa", 4, seed=1)
    cache = KVCache(model.config, 1, 8)
    with torch.inference_mode():
        for tok in [1, 2, 3]:
            model(torch.tensor([[tok]]), cache=cache, last_only=True)
    assert spy.counts["DecodeStack"] == 1 and cache.fused_stack[0] is model
    model.layers[0].mlp.down = other.layers[0].mlp.down  # a module replaced, as quantizing or pruning does
    with torch.inference_mode():
        stale, _ = model(torch.tensor([[6]]), cache=cache, last_only=True)
        assert spy.counts["DecodeStack"] == 1  # the same cache: the stack it holds
        cache.fused_stack = None
        cache.truncate(cache.pos - 1)
        fresh, _ = model(torch.tensor([[6]]), cache=cache, last_only=True)
    assert spy.counts["DecodeStack"] == 2
    monkeypatch.setenv("MUSE_NO_FUSED", "1")
    with torch.inference_mode():
        cache.truncate(cache.pos - 1)
        ref, _ = model(torch.tensor([[6]]), cache=cache, last_only=True)
    assert_close_after(fresh, ref, 32)
    assert not torch.allclose(stale, ref, atol=1e-3)  # the held stack still ran the old linear
