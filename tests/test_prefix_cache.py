"""Prefix caching: keys and values of earlier prompts reused, exactly, and only when the ids match."""

from __future__ import annotations

import pytest
import torch

from muse.generation import SamplingParams
from muse.model import KVCache
from muse.prefix_cache import BLOCK, PrefixCache
from muse.scheduler import Scheduler


def prefill(model, ids: list[int]) -> KVCache:
    cache = KVCache(model.config, 1, len(ids))
    with torch.inference_mode():
        model(torch.tensor([ids]), cache=cache)
    return cache


def ids_of(n: int, seed: int) -> list[int]:
    return torch.randint(5, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_a_shared_prefix_is_found_in_whole_blocks_and_holds_the_same_keys(tiny):
    model = tiny.model
    a = ids_of(40, 0)
    b = a[:37] + ids_of(10, 1)  # shares 37 tokens with a: two whole blocks of 16
    pc = PrefixCache(model.config, max_tokens=1000, block=16)
    assert pc.lookup(a) == (0, None)
    pc.insert(a, prefill(model, a), 0)
    assert pc.tokens == 32  # (40 - 1) // 16 blocks: never the last token, whose logits are needed
    k, hit = pc.lookup(b)
    assert k == 32
    assert pc.lookup(a[:33])[0] == 32 and pc.lookup(a[:32])[0] == 16  # a prompt's last token is never cached
    assert pc.lookup(ids_of(40, 2))[0] == 0
    # the cached keys/values are those a fresh prefill of b computes for its first 32 positions
    fresh = prefill(model, b)
    into = KVCache(model.config, 1, len(b))
    hit.copy_into(into, 0, k)
    for got, want in zip(into.k + into.v, fresh.k + fresh.v):
        torch.testing.assert_close(got[:, :, :k], want[:, :, :k], rtol=1e-5, atol=1e-6)


def test_a_hash_collision_never_returns_another_prompts_keys(tiny):
    model = tiny.model
    a, b = ids_of(40, 3), ids_of(40, 4)
    pc = PrefixCache(model.config, block=16)
    pc.insert(a, prefill(model, a), 0)
    for h in pc._hashes(b):  # pretend every block hash of b collides with a's entry
        pc._index[h] = pc._index[pc._hashes(a)[0]]
    assert pc.lookup(b) == (0, None)


def test_least_recently_used_prefixes_leave_first_and_shared_blocks_stay_findable(tiny):
    model = tiny.model
    common = ids_of(16, 5)
    a, b, c = (common + ids_of(24, s) for s in (6, 7, 8))  # 40 tokens each: 32 cached, the first block shared
    pc = PrefixCache(model.config, max_tokens=64, block=16)
    pc.insert(a, prefill(model, a), 0)
    pc.insert(b, prefill(model, b), 0)
    assert pc.tokens == 64
    assert pc.lookup(a)[0] == 32  # a is now the most recently used
    pc.insert(c, prefill(model, c), 0)  # over budget: b (least recently used) leaves
    assert pc.tokens == 64
    assert pc.lookup(b)[0] == 16 and pc.lookup(a)[0] == 32 and pc.lookup(c)[0] == 32
    pc.insert(ids_of(40, 9), prefill(model, ids_of(40, 9)), 0)  # evicts a: c still answers for the shared block
    assert pc.lookup(common + ids_of(8, 10))[0] == 16
    with pytest.raises(ValueError, match="max_tokens"):
        PrefixCache(model.config, max_tokens=-1)


def test_the_scheduler_reuses_a_shared_prefix_and_generates_the_same_text(tiny):
    system = "You are a careful assistant. Answer in one short sentence, and never use lists. " * 2
    prompts = [system + "What is the sea?", system + "Name a colour."]
    params = SamplingParams(max_new_tokens=8, temperature=0)
    want = [tiny.generate(p, params) for p in prompts]
    n_system = len(tiny.tokenizer.encode(system))
    sched = Scheduler(tiny)
    try:
        first = list(sched.submit(prompts[0], params))
        second = list(sched.submit(prompts[1], params))
        assert "".join(c.text for c in first) == want[0] and "".join(c.text for c in second) == want[1]
        assert first[-1].cached_tokens == 0
        assert n_system - BLOCK < second[-1].cached_tokens <= n_system  # whole blocks of the shared system prompt
        # arriving together, both start after their shared cached prefix in one padded pass
        with sched._wake:
            streams = [sched.submit(p, params) for p in prompts]
        texts = [list(s) for s in streams]
        assert ["".join(c.text for c in t) for t in texts] == want
        assert all(t[-1].cached_tokens >= second[-1].cached_tokens for t in texts)
    finally:
        sched.close()
    off = Scheduler(tiny, prefix_cache_tokens=0)
    try:
        chunks = [list(off.submit(prompts[0], params)) for _ in range(2)]
        assert chunks[1][-1].cached_tokens == 0 and "".join(c.text for c in chunks[1]) == want[0]
    finally:
        off.close()


def test_the_server_passes_its_prefix_cache_size_on_and_refuses_a_negative_one(tiny):
    from muse.server import create_app

    app = create_app({"tiny": tiny}, embedder=None, prefix_cache_tokens=64)
    sched = app.state.service.scheduler("tiny")
    try:
        assert sched.prefix_cache.max_tokens == 64
    finally:
        app.state.service.close()
    with pytest.raises(ValueError, match="prefix_cache_tokens"):
        create_app({"tiny": tiny}, embedder=None, prefix_cache_tokens=-1)
