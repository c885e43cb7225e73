"""Continuous batching: the batched KV cache, and the scheduler against one-at-a-time generation."""

from __future__ import annotations

import threading

import pytest
import torch

from muse.api import Model
from muse.errors import ContextLengthError
from muse.generation import SamplingParams, stream_generate, top_p_filter
from muse.model import BatchKVCache, KVCache
from muse.scheduler import Scheduler, SchedulerBusy, SchedulerClosed, _openmp_runtime, release_openmp_pool
from tests.helpers import ScriptLM, free_passes


def run_all(sched: Scheduler, prompts, params) -> list[str]:
    streams = [sched.submit(p, params) for p in prompts]
    return ["".join(c.text for c in s) for s in streams]


@pytest.fixture(scope="module")
def tok(default_model):
    return default_model.tokenizer


# -- the batched KV cache --------------------------------------------------------------

def test_batch_cache_decodes_rows_of_different_lengths_like_single_rows(tiny):
    """Rows at lengths 3, 9 and 5 decode together; each matches its own single-row decode."""
    model = tiny.model
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 1000, (1, n), generator=g) for n in (4, 10, 6)]
    with torch.inference_mode():
        batch = BatchKVCache(model.config)
        for s in seqs:  # prefill all but the last token of each on its own cache, then join
            c = KVCache(model.config, 1, s.shape[1] - 1)
            model(s[:, :-1], cache=c)
            batch.add(c)
        assert batch.lens == [3, 9, 5]
        got, _ = model(torch.cat([s[:, -1:] for s in seqs]), cache=batch)  # (3, 1, V)
        assert batch.lens == [4, 10, 6]
        for b, s in enumerate(seqs):
            want, _ = model(s)  # the full sequence at once, no cache
            torch.testing.assert_close(got[b, -1], want[0, -1], rtol=1e-4, atol=1e-4)
        # a row leaves: the last row moves into its place and still decodes correctly
        batch.remove(0)
        assert batch.lens == [6, 10]
        nxt = torch.tensor([[7], [8]])
        got, _ = model(nxt, cache=batch)
        for row, s in zip(range(2), (seqs[2], seqs[1])):
            want, _ = model(torch.cat([s, nxt[row:row + 1]], dim=1))
            torch.testing.assert_close(got[row, -1], want[0, -1], rtol=1e-4, atol=1e-4)
        batch.remove(1)
        batch.remove(0)
        assert batch.rows == 0 and batch.k[0].numel() == 0  # idle: memory given back


def test_a_right_padded_batch_prefill_joins_rows_like_single_prefills(tiny):
    """Prompts of 3, 8 and 5 tokens prefilled as one padded (3, 8) batch: logits_at gives each
    prompt's last-token logits, and the rows copied into the batch cache decode as if each
    prompt had been prefilled alone."""
    model = tiny.model
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 1000, (1, n), generator=g) for n in (3, 8, 5)]
    lengths = [s.shape[1] for s in seqs]
    padded = torch.zeros(3, 8, dtype=torch.long)
    for b, s in enumerate(seqs):
        padded[b, :lengths[b]] = s[0]
    with torch.inference_mode():
        cache = KVCache(model.config, 3, 8)
        first, _ = model(padded, cache=cache, logits_at=torch.tensor(lengths) - 1)  # (3, 1, V)
        batch = BatchKVCache(model.config)
        for b, n in enumerate(lengths):
            batch.add(cache, b, n)
        assert batch.lens == lengths
        nxt = torch.tensor([[11], [12], [13]])
        got, _ = model(nxt, cache=batch)
        for b, s in enumerate(seqs):
            alone, _ = model(s)
            torch.testing.assert_close(first[b, 0], alone[0, -1], rtol=1e-4, atol=1e-4)
            want, _ = model(torch.cat([s, nxt[b:b + 1]], dim=1))
            torch.testing.assert_close(got[b, -1], want[0, -1], rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="length"):
            batch.add(cache, 0, 9)  # more positions than the prefill holds


def test_prompts_arriving_together_are_prefilled_in_one_pass(default_model, monkeypatch):
    net = default_model.model
    shapes: list[tuple[int, int]] = []
    forward = net.forward

    def recording(idx, *args, **kwargs):
        shapes.append(tuple(idx.shape))
        return forward(idx, *args, **kwargs)

    monkeypatch.setattr(net, "forward", recording)
    prompts = ["Hi", "Write one sentence about the sea.", "List three colours:", "2 + 2 ="]
    params = SamplingParams(max_new_tokens=5, temperature=0)
    want = [default_model.generate(p, params) for p in prompts]
    shapes.clear()
    sched = Scheduler(default_model)
    try:
        with sched._wake:  # the scheduler thread waits until all four are queued
            streams = [sched.submit(p, params) for p in prompts]
        assert ["".join(c.text for c in s) for s in streams] == want
    finally:
        sched.close()
    longest = max(len(default_model.tokenizer.encode(p)) for p in prompts)
    assert shapes[0] == (4, longest)  # one padded prefill for all four
    assert all(b <= 4 and t == 1 for b, t in shapes[1:])  # then decode steps only


# -- sampling at the edges (found by fuzzing the server) --------------------------------

def test_top_p_filter_keeps_exactly_the_nucleus_a_full_sort_keeps():
    g = torch.Generator().manual_seed(0)
    for sharpness in (0.3, 1.0, 3.0):  # peaked to flat: the nucleus is 1 to thousands of tokens
        probs = torch.softmax(torch.randn(3, 5000, generator=g) / sharpness, dim=-1)
        for top_p in (5e-324, 0.1, 0.5, 0.9, 0.999):
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
            drop[:, 0] = False
            want = probs.scatter(1, order, sorted_p.masked_fill(drop, 0.0))
            torch.testing.assert_close(top_p_filter(probs, top_p), want, rtol=0, atol=0)


@pytest.mark.parametrize("settings", [dict(temperature=5e-324), dict(temperature=1e-30, top_k=3),
                                      dict(top_p=5e-324), dict(repetition_penalty=0.01, temperature=1e-20),
                                      dict(temperature=2.0, min_p=0.99)])
def test_extreme_valid_settings_sample_real_tokens(tiny, tok, settings):
    chunks = list(stream_generate(tiny.model, tok, "Hi", SamplingParams(max_new_tokens=3, seed=0, **settings)))
    assert chunks[-1].finish_reason and all(0 <= c.token < tok.vocab_size for c in chunks)


# -- the scheduler ---------------------------------------------------------------------

def test_batched_greedy_equals_unbatched_on_the_default_model(default_model):
    prompts = ["The capital of France is", "Once upon a time, in a land far away, there lived a",
               "def fib(n):", "List three colours:"]
    params = SamplingParams(max_new_tokens=6, temperature=0)
    want = [default_model.generate(p, params) for p in prompts]
    sched = Scheduler(default_model)
    try:
        assert run_all(sched, prompts, params) == want
        # they really ran together: one at a time would take a step per token (4 × 6)
        assert sched.steps < 4 * 6
    finally:
        sched.close()


def test_per_request_sampling_penalties_seeds_and_stops_match_stream_generate(tiny, tok):
    """Each row keeps its own settings: the text equals stream_generate's for that request."""
    cases = [
        ("Hello there", SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.8, seed=1)),
        ("A longer prompt about the sea and the sky", SamplingParams(max_new_tokens=10, temperature=1.3, top_k=50,
                                                                     top_p=1.0, presence_penalty=1.5, seed=7)),
        ("Short", SamplingParams(max_new_tokens=8, temperature=0, repetition_penalty=1.3, frequency_penalty=0.5)),
        ("Numbers", SamplingParams(max_new_tokens=16, temperature=0.7, top_p=1.0, min_p=0.05, seed=3)),
    ]
    want = ["".join(c.text for c in stream_generate(tiny.model, tok, p, params)) for p, params in cases]
    # a stop string taken from the reference text: it must cut there, in the batch too
    stop = want[3][5:8]
    assert stop.strip()
    cases.append(("Numbers", cases[3][1].replace(stop=[stop])))
    want.append("".join(c.text for c in stream_generate(tiny.model, tok, "Numbers", cases[-1][1])))
    assert stop not in want[-1] and len(want[-1]) < len(want[3])
    sched = Scheduler(tiny)
    try:
        streams = [sched.submit(p, params) for p, params in cases]
        assert ["".join(c.text for c in s) for s in streams] == want
    finally:
        sched.close()


def test_requests_join_and_leave_between_decode_steps(tiny):
    sched = Scheduler(tiny)
    greedy = SamplingParams(temperature=0, loop_guard=False)  # the random model repeats itself: run all 60
    try:
        long = sched.submit("A long story", greedy.replace(max_new_tokens=60))
        it = iter(long)
        first = [next(it) for _ in range(5)]  # the long request is decoding now
        short = sched.submit("A short one", greedy.replace(max_new_tokens=4))
        assert "".join(c.text for c in short) == tiny.generate("A short one", greedy.replace(max_new_tokens=4))
        rest = list(it)
        assert sched.active == 0
        text = "".join(c.text for c in first + rest)
        assert text == tiny.generate("A long story", greedy.replace(max_new_tokens=60))
        assert rest[-1].generation_tokens == 60 and rest[-1].finish_reason == "length"
    finally:
        sched.close()


def test_long_prompts_are_prefilled_in_chunks_while_others_keep_decoding(tiny, monkeypatch):
    sched = Scheduler(tiny, prefill_chunk=16)
    log: list[tuple[str, int]] = []  # (which request, scheduler step) for every token emitted
    emit = sched._emit

    def logged(r, tok, logits=None):
        log.append(("long" if len(r.ids) > 100 else "running", sched.steps))
        return emit(r, tok, logits)

    monkeypatch.setattr(sched, "_emit", logged)
    greedy = SamplingParams(temperature=0)
    long_prompt = "word " * 150  # ≈150 tokens: ten prefill steps of 16
    try:
        running = iter(sched.submit("Running", greedy.replace(max_new_tokens=40)))
        next(running)
        at_submit = sched.steps
        long_text = "".join(c.text for c in sched.submit(long_prompt, greedy.replace(max_new_tokens=3)))
        list(running)
        long_first = min(step for who, step in log if who == "long")
        during = [step for who, step in log if who == "running" and at_submit <= step < long_first]
        assert len(during) >= 8  # the running stream got a token on every prefill step
        # chunked prefill gives the same greedy text as a prompt prefilled at once
        assert long_text == tiny.generate(long_prompt, greedy.replace(max_new_tokens=3))
    finally:
        sched.close()


def test_cancel_frees_the_row_at_the_next_step(tiny):
    sched = Scheduler(tiny)
    try:
        stream = sched.submit("Go on and on", SamplingParams(max_new_tokens=400, temperature=0, loop_guard=False))
        it = iter(stream)
        next(it), next(it)
        assert sched.active == 1
        stream.cancel()
        at_cancel = sched.steps
        while sched.active:
            threading.Event().wait(0.001)
        assert sched.steps - at_cancel <= 2 and sched._cache.rows == 0
    finally:
        sched.close()


def test_cancelling_a_row_before_the_last_leaves_the_others_decoding(tiny):
    """The freed row is filled by moving the last row into it (in place, on inference tensors):
    the requests still running must not notice, let alone fail."""
    sched = Scheduler(tiny)
    greedy = SamplingParams(temperature=0)
    try:
        first = sched.submit("Go on and on", greedy.replace(max_new_tokens=400, loop_guard=False))
        it = iter(first)
        next(it)
        second = iter(sched.submit("Another story", greedy.replace(max_new_tokens=30)))
        head = [next(second)]  # both rows decode; the first request holds row 0
        first.cancel()
        text = "".join(c.text for c in head + list(second))  # raised "inplace update to inference tensor"
        assert text == tiny.generate("Another story", greedy.replace(max_new_tokens=30))
        assert sched.active == 0 and sched._cache.rows == 0
    finally:
        sched.close()


def test_an_idle_scheduler_gives_freed_memory_back(tiny, monkeypatch):
    import muse.scheduler as scheduler_module

    trimmed = threading.Event()
    monkeypatch.setattr(scheduler_module, "release_heap", trimmed.set)
    sched = Scheduler(tiny)
    try:
        assert "".join(c.text for c in sched.submit("Hi", SamplingParams(max_new_tokens=3, temperature=0)))
        assert trimmed.wait(120)  # the thread trims once after the work, before it sleeps
        assert sched._cache.rows == 0 and sched._cache.k[0].numel() == 0
    finally:
        sched.close()
    scheduler_module._libc_malloc_trim.cache_clear()
    assert scheduler_module._libc_malloc_trim() is not None  # glibc on Linux: the real call is there
    monkeypatch.undo()
    scheduler_module.release_heap()


def test_a_failing_request_fails_alone(tiny, monkeypatch):
    """A request whose sampling raises (at its first token, or mid-decode) gets the error; the others go on."""
    import muse.scheduler as scheduler_module

    real = scheduler_module.make_sampler

    def flaky(p):
        if p.seed not in (13, 14):
            return real(p)
        calls = iter(range(100))

        def sample(logits):
            if next(calls) == (0 if p.seed == 13 else 3):
                raise RuntimeError(f"sampler {p.seed} broke")
            return logits.argmax(dim=-1)

        return sample

    monkeypatch.setattr(scheduler_module, "make_sampler", flaky)
    sched = Scheduler(tiny)
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    try:
        good = sched.submit("Fine", greedy)
        bad = [sched.submit("Doomed", SamplingParams(max_new_tokens=12, temperature=0.5, seed=s)) for s in (13, 14)]
        for stream, seed in zip(bad, (13, 14)):
            with pytest.raises(RuntimeError, match=f"sampler {seed} broke"):
                list(stream)
        assert "".join(c.text for c in good) == tiny.generate("Fine", greedy)
        assert "".join(c.text for c in sched.submit("Still fine", greedy)) == tiny.generate("Still fine", greedy)
        assert sched.active == 0
    finally:
        sched.close()


def test_bad_requests_fail_at_submit(tiny):
    sched = Scheduler(tiny)
    try:
        with pytest.raises(ContextLengthError, match="600 tokens.*512 tokens"):
            sched.submit(list(range(100, 700)), SamplingParams(max_new_tokens=4))
        with pytest.raises(ValueError, match="num_beams"):
            sched.submit("Hi", SamplingParams(num_beams=2))
        with pytest.raises(ValueError, match="prompt must not be empty"):
            sched.submit([], SamplingParams())
        assert sched.active == 0 and sched.waiting == 0
    finally:
        sched.close()
    with pytest.raises(ValueError, match="max_batch"):
        Scheduler(tiny, max_batch=0)


def test_a_full_waiting_queue_refuses_more_and_close_ends_streams(tiny):
    sched = Scheduler(tiny, max_waiting=1)
    with sched._wake:  # hold the scheduler between steps: nothing gets admitted
        queued = sched.submit("one", SamplingParams(max_new_tokens=400, temperature=0))
        with pytest.raises(SchedulerBusy, match="already waiting"):
            sched.submit("two", SamplingParams(max_new_tokens=4))
    sched.close()
    with pytest.raises(SchedulerClosed):
        list(queued)
    with pytest.raises(SchedulerClosed):
        sched.submit("three", SamplingParams(max_new_tokens=4))


def test_utf8_split_characters_stream_whole_from_the_batch(tok):
    """Chinese and emoji span several byte-level tokens; batched streams never split them."""
    text = "你好，世界！今天天气很好 👍🏽"
    prompt = tok.encode("Say it:")
    scripted = Model(ScriptLM(tok, len(prompt), text), tok, {"name": "scripted"})
    sched = Scheduler(scripted)
    try:
        streams = [sched.submit(prompt, SamplingParams(max_new_tokens=64)) for _ in range(3)]
        for s in streams:
            chunks = list(s)
            assert "".join(c.text for c in chunks) == text
            assert all("\ufffd" not in c.text for c in chunks)
            assert any(c.text == "" for c in chunks[:-1])  # bytes held back until a character completes
    finally:
        sched.close()


def test_the_openmp_pool_of_the_loading_thread_can_be_released_and_torch_still_works():
    """The scheduler frees the OpenMP pool of the thread that loaded the model (two pools make
    libgomp stop spinning: slower decode steps); torch makes a new pool when it needs one."""
    import sys

    if sys.platform.startswith("linux"):
        assert _openmp_runtime() is not None  # torch's Linux wheels ship libgomp: the release really happens
    a = torch.randn(300, 300, generator=torch.Generator().manual_seed(0))
    want = a @ a
    release_openmp_pool()
    assert torch.equal(a @ a, want)
    release_openmp_pool()  # twice, and with no pool: harmless


def test_prompt_lookup_drafts_in_the_batch_keep_each_streams_text(default_model, monkeypatch):
    """A lone stream drafts from its own text and keeps the tokens it agrees with; in a batch, rows draft
    while they run alone (LOOKUP_MAX_ROWS). Every stream's text is stream_generate's, greedy or seeded."""
    free_passes(monkeypatch)
    text = ("Muse keeps every conversation in one SQLite file on your disk. Muse answers from your own "
            "documents and cites them. Muse never sends a word to the internet.")
    prompts = [default_model.chat_prompt([{"role": "user", "content": f"Repeat exactly:\n\n{text}"}]),
               default_model.chat_prompt([{"role": "user", "content": f"Copy this text:\n\n{text}"}]),
               "Once upon a time"]
    params = [SamplingParams(temperature=0, max_new_tokens=48), SamplingParams(temperature=0.8, seed=4,
                                                                               max_new_tokens=48),
              SamplingParams(temperature=0.7, seed=2, max_new_tokens=24)]
    want = [list(stream_generate(default_model.model, default_model.tokenizer, p, q)) for p, q in zip(prompts, params)]
    sched = Scheduler(default_model)
    try:
        for batch in ([0], [1], [0, 1, 2]):  # alone, greedy and seeded; then three rows together
            streams = [sched.submit(prompts[i], params[i]) for i in batch]
            got = [list(s) for s in streams]
            assert ["".join(c.text for c in g) for g in got] == ["".join(c.text for c in want[i]) for i in batch]
            if len(batch) == 1:  # the greedy copy is mostly drafted; sampled at 0.8, some of it
                last = got[0][-1]
                assert last.accepted_tokens > (10 if batch == [0] else 0) and last.drafted_tokens >= last.accepted_tokens
    finally:
        sched.close()


def test_work_run_between_steps_makes_the_next_decode_step_read_the_model_again(default_model):
    """The fused decode step keeps the model's blocks on the batch cache; `call` may change the
    model (a module swapped), so after one the blocks are read again."""
    sched = Scheduler(default_model)
    try:
        list(sched.submit("Hello", SamplingParams(max_new_tokens=4, temperature=0)))
        held = sched._cache.fused_stack
        assert held is not None and held[0] is default_model.model  # the decode steps took the fused path
        assert sched.call(lambda: sched._cache.fused_stack).result() is held  # still held while the call runs
        assert sched._cache.fused_stack is None
    finally:
        sched.close()
