"""Continuous batching: one thread per model generates for every request at once.

Callers (the server's HTTP handlers) `submit()` a prompt and read `GenerationChunk`s from the
`Stream` they get back; only the scheduler thread touches the model. Between decode steps
requests join and leave the running batch:

- a new request's prompt is prefilled on a `KVCache`, at most `prefill_chunk` tokens per
  step (a long prompt is prefilled over several steps, so the streams already running keep
  going); new prompts that fit the step's budget together are prefilled as one right-padded
  batch (one forward pass instead of one each, which is most of the time-to-first-token
  when many clients arrive at once); the first token comes from the prefill logits;
- its keys and values are then copied into a row of the shared `BatchKVCache`, and every
  decode step feeds each row its last token — idx (rows, 1) — one forward pass for all;
- each row samples with its own settings (temperature, top-k/p, min-p, penalties, seed) and
  turns tokens into text with its own decoder and stop strings (`TokenText`), so a request
  gets exactly the text `stream_generate` would give it (greedy output is identical);
- a finished or cancelled request (a client that went away) leaves at the next step and
  its row is freed at once.

    sched = Scheduler(muse.load())
    for chunk in sched.submit("Once upon a time", SamplingParams(max_new_tokens=20)):
        print(chunk.text, end="")
    sched.close()
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import ctypes
import ctypes.util
import functools
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from muse.api import Model
from muse.cpu import adapt_threads
from muse.errors import MuseError
from muse.generation import (
    GenerationChunk, LogitsProcessors, PromptLookup, SamplingParams, TokenText, fit_prompt, is_greedy,
    drafting, make_sampler, per_second, prompt_lookup, token_logprobs,
)
from muse.model import BatchKVCache, KVCache
from muse.prefix_cache import PrefixCache

_DONE = object()  # end-of-stream marker in a Stream's queue
# Rows that may draft by prompt lookup: drafts are checked in the shared pass, padded to the longest, so
# every row pays for them. Measured with bench/serve.py (greedy chat, prompts that copy little): with
# 16 fed positions shared, 8 streams lost 17 % of their tokens/s; with 8, 4 streams lost 6 %. A lone
# stream (the laptop's usual case) drafts; a batch runs as before.
LOOKUP_MAX_ROWS = 1


class SchedulerBusy(MuseError):
    """Too many requests are already waiting; the client should retry later."""


class SchedulerClosed(MuseError):
    """The scheduler was shut down before the request finished."""


class Stream:
    """The output of one submitted request: iterate it (sync or async) for `GenerationChunk`s.

    The last chunk has a `finish_reason`; an error in generation is raised from the iteration.
    `cancel()` (or leaving an `async for`/`for` early and calling it) frees the request's
    batch row at the scheduler's next step.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self._loop = loop
        self._queue: "asyncio.Queue | queue.Queue" = asyncio.Queue() if loop else queue.Queue()
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def __iter__(self) -> Iterator[GenerationChunk]:
        if self._loop is not None:
            raise TypeError("this Stream was submitted with an event loop: use `async for`")
        while (item := self._queue.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item

    async def __aiter__(self):
        if self._loop is None:
            raise TypeError("this Stream was submitted without an event loop: use `for`")
        while (item := await self._queue.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item


def _deliver(batch: list[tuple[Stream, object]]) -> None:
    """In the event loop: hand each stream its items."""
    for stream, item in batch:
        stream._queue.put_nowait(item)


class _Outbox:
    """What the scheduler thread sends to streams (chunks, exceptions, _DONE), handed to each
    event loop in one call per `flush`: one wakeup of the loop (a self-pipe write and a GIL
    hand-over) per scheduler step instead of one per token of every request in the batch."""

    def __init__(self):
        self._items: list[tuple[Stream, object]] = []

    def put(self, stream: Stream, item) -> None:
        if stream._loop is None:
            stream._queue.put(item)  # a thread reads it: no loop to wake
        else:
            self._items.append((stream, item))

    def flush(self) -> None:
        items, self._items = self._items, []
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, item in items:
            by_loop.setdefault(stream._loop, []).append((stream, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                for stream, _ in batch:
                    stream._cancelled.set()


@dataclass(eq=False)
class _Request:
    ids: list[int]  # the prompt, already fitted to the context window
    params: SamplingParams
    stream: Stream
    text: TokenText
    sampler: object
    procs: LogitsProcessors  # penalties, logit bias, constraint: the same chain as stream_generate's
    prefill: KVCache | None = None
    prefilled: int = 0  # prompt tokens in `prefill` so far
    cached: int = 0  # of them, taken from the prefix cache
    prefill_seconds: float = 0.0
    first_token_at: float = 0.0
    last: int = 0  # the token to feed at the next decode step
    stats: dict = field(default_factory=dict)
    lookup: PromptLookup | None = None  # prompt lookup drafts (stream_generate's), None where they are off
    drafted: int = 0
    accepted: int = 0


@functools.cache
def _openmp_runtime() -> ctypes.CDLL | None:
    """The GNU libgomp torch has loaded (bundled with its Linux wheels, or the system's), or None.

    Only libgomp: its omp_pause_resource_all frees the calling thread's pool alone. LLVM's
    libomp (macOS wheels) pauses the whole runtime, which is not safe while the scheduler
    thread may be inside a parallel region, so there nothing is released."""
    candidates = [str(p) for p in sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))]
    for name in candidates + ["libgomp.so.1"]:
        try:
            # RTLD_NOLOAD: only a copy already in the process (the one torch uses), never a new one
            runtime = ctypes.CDLL(name, mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_LOCAL)
            runtime.omp_pause_resource_all.restype = ctypes.c_int
            return runtime
        except (OSError, AttributeError):
            continue
    return None


def release_openmp_pool() -> None:
    """Free the calling thread's OpenMP thread pool (OpenMP 5's omp_pause_resource_all).

    Why: torch runs parallel ops on a pool that belongs to the calling thread. The model is
    loaded on the main thread, which leaves a pool there; with a second one for the scheduler
    thread, libgomp manages more threads than there are CPUs and cuts its spin-waiting
    short, so every parallel region wakes its workers through the kernel. Measured on 2
    cores: a SmolLM2 decode step 13.3 ms from a second thread vs 10.3 ms with one pool. A
    pool comes back on demand if this thread runs torch again.
    """
    runtime = _openmp_runtime()
    if runtime is not None:
        runtime.omp_pause_resource_all(1)  # omp_pause_soft


@functools.lru_cache(maxsize=1)
def _libc_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def release_heap() -> None:
    """Give freed heap memory back to the system (glibc's malloc_trim), e.g. when a server goes idle.

    Why: a batch's KV cache, prompts and request bodies of changing sizes, allocated from many
    threads, leave glibc's arenas fragmented; without a trim the process keeps its peak size
    long after the work is gone.
    """
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


class Scheduler:
    """Runs a model's requests together (continuous batching) on one background thread.

    max_batch: most requests generating at once (more wait, in order, up to `max_waiting`;
    beyond that `submit` raises `SchedulerBusy`). prefill_chunk: most prompt tokens
    prefilled per step. prefix_cache_tokens: prompt positions whose keys and values are kept
    for later prompts that start the same way (`PrefixCache`; 0 turns it off).
    """

    def __init__(self, model: Model, max_batch: int = 16, prefill_chunk: int = 512, max_waiting: int = 1024,
                 prefix_cache_tokens: int = 2048):
        for name, value in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk),
                            ("max_waiting", max_waiting)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
        self.model = model
        self.max_batch, self.prefill_chunk, self.max_waiting = max_batch, prefill_chunk, max_waiting
        self.steps = 0  # scheduler iterations that did work (tests watch requests leave)
        self._waiting: collections.deque[_Request] = collections.deque()
        self._calls: collections.deque = collections.deque()  # (fn, args, Future): model work between steps
        self._prefilling: list[_Request] = []
        self._rows: list[_Request] = []  # _rows[b] owns row b of the batch cache
        self._cache = BatchKVCache(model.config, model.model.dtype, model.model.device)
        # what a prompt lookup draft costs to check, and how the model's drafts fared (`_drafts`)
        self._cost, self._history = drafting(model.model)
        self.prefix_cache = PrefixCache(model.config, prefix_cache_tokens)
        self._outbox = _Outbox()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"muse-scheduler-{model.name}", daemon=True)
        release_openmp_pool()  # the model's work moves to the scheduler thread: one pool, full-speed spinning
        self._thread.start()

    # -- the callers' side ------------------------------------------------------------

    @property
    def active(self) -> int:
        """Requests being prefilled or decoded (the waiting ones not counted)."""
        return len(self._prefilling) + len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, prompt: "str | list[int]", params: SamplingParams | None = None, *,
               loop: asyncio.AbstractEventLoop | None = None) -> Stream:
        """Queue a prompt (text, or token ids) for generation; returns its `Stream`.

        Bad input fails here, before anything is queued: `ContextLengthError` for a prompt
        that does not fit, `ValueError` for bad settings. Pass the running event loop as
        `loop` to read the stream with `async for`.
        """
        p = params or SamplingParams()
        if p.num_beams > 1:
            raise ValueError("num_beams must be 1 here: beam search is not batched; use Model.generate for it")
        tok = self.model.tokenizer
        if isinstance(prompt, str):
            if tok is None:
                raise ValueError(f"{self.model.name} has no tokenizer; pass token ids instead of text")
            ids = tok.encode(prompt)
        else:
            ids = list(prompt)
        ids, max_new = fit_prompt(ids, self.model.config.block_size, p)
        procs = LogitsProcessors(p, tok, self.model.config.vocab_size, ids, self.model.model.device)
        text = TokenText(tok, p.stop, max_new, p.loop_guard and procs.output is None)  # as stream_generate
        req = _Request(ids, p, Stream(loop), text, make_sampler(p), procs, lookup=prompt_lookup(p, ids, self._history))
        self._enqueue(self._waiting, req, "requests")
        return req.stream

    def call(self, fn, *args) -> concurrent.futures.Future:
        """Run `fn(*args)` on the scheduler thread between two steps; its result (or error) arrives
        in the returned Future.

        For model work that is not a token stream, such as `generation.score` for label
        likelihoods: it runs on the one thread that owns the model, in turn with generation,
        so no lock is needed and running streams pause for one call, not for a queue of them.
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._enqueue(self._calls, (fn, args, future), "calls")
        return future

    def _enqueue(self, queue: collections.deque, item, what: str) -> None:
        """Append to one of the waiting queues and wake the thread; refused once closed or full."""
        with self._wake:
            if self._closed:
                raise SchedulerClosed("the server is shutting down; retry on another instance")
            if len(queue) >= self.max_waiting:
                raise SchedulerBusy(f"{len(queue)} {what} are already waiting for {self.model.name}; "
                                    "retry in a moment")
            queue.append(item)
            self._wake.notify()

    def generate(self, prompt: "str | list[int]", params: SamplingParams | None = None) -> str:
        """The whole completion (blocking), generated in the shared batch."""
        return "".join(c.text for c in self.submit(prompt, params))

    def close(self) -> None:
        """Stop the thread; requests still running end with `SchedulerClosed`."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # -- the scheduler thread ---------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        trimmed = 0
        while True:
            with self._wake:
                if not (self._closed or self._calls or self._waiting or self._prefilling or self._rows) \
                        and self.steps != trimmed:
                    trimmed = self.steps
                    release_heap()  # idle now: the batch's memory goes back to the system
                while not self._closed and not (self._calls or self._waiting or self._prefilling or self._rows):
                    self._wake.wait()
                if self._closed:
                    break
                call = self._calls.popleft() if self._calls else None
                while self._waiting and self.active < self.max_batch:
                    self._prefilling.append(self._waiting.popleft())
            if call is not None:
                self._run_call(*call)
                if not (self._prefilling or self._rows):
                    continue
            try:
                self._step()
            except Exception as e:  # a bug or out of memory: fail what was running, keep serving
                self._fail_all(e)
        self._fail_all(SchedulerClosed("the server shut down before this request finished"))
        with self._wake:
            calls, self._calls = list(self._calls), collections.deque()
        for _, _, future in calls:
            future.set_exception(SchedulerClosed("the server shut down before this call ran"))

    def _run_call(self, fn, args, future: concurrent.futures.Future) -> None:
        if not future.set_running_or_notify_cancel():
            return  # cancelled while waiting
        result = error = None
        try:
            with torch.inference_mode():
                result = fn(*args)
        except BaseException as e:  # the caller's error, delivered to the caller
            error = e
        self._cache.fused_stack = None  # the call may have changed the model's modules: read them again
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def _step(self) -> None:
        adapt_threads()  # this thread's OpenMP count, from the CPUs other programs leave free
        try:
            with torch.inference_mode():  # the cache's tensors are inference tensors: moved rows too
                self._drop_cancelled()
                if self._prefilling:
                    self._prefill_step()
                    self._outbox.flush()  # first tokens out now, not after the decode step
                if self._rows:
                    self._decode_step()
        finally:
            self._outbox.flush()
        self.steps += 1

    def _drop_cancelled(self) -> None:
        self._prefilling = [r for r in self._prefilling if not r.stream.cancelled]
        for b in reversed(range(len(self._rows))):
            if self._rows[b].stream.cancelled:
                self._leave(b)

    def _leave(self, b: int) -> None:
        """Free row b; the last row moves into it (mirrors BatchKVCache.remove)."""
        self._cache.remove(b)
        last = self._rows.pop()
        if b < len(self._rows):
            self._rows[b] = last

    def _prefill_step(self) -> None:
        """Prefill up to `prefill_chunk` prompt tokens, oldest request first."""
        budget = self.prefill_chunk
        group = self._fresh_group(budget)
        if len(group) > 1:
            budget -= self._prefill_together(group)
        while self._prefilling and budget > 0:
            r = self._prefilling[0]
            try:
                budget -= self._prefill(r, budget)
            except Exception as e:  # this request's fault (or its bad luck): only it fails
                if r in self._prefilling:
                    self._prefilling.remove(r)
                self._finish(r, e)

    def _fresh_group(self, budget: int) -> list[_Request]:
        """The oldest requests not yet started whose whole prompts fit `budget` as one padded
        batch (rows × longest prompt tokens)."""
        group: list[_Request] = []
        longest = 0
        for r in self._prefilling:
            longest = max(longest, len(r.ids))
            if r.prefilled or (len(group) + 1) * longest > budget:
                break
            group.append(r)
        return group

    def _prefill_together(self, group: list[_Request]) -> int:
        """Prefill whole prompts in one forward pass, right-padded to the longest: a row's pad
        positions come after its prompt, so causal attention keeps them away from its real
        tokens, and only its first len(ids) positions are copied into the batch cache.
        Returns the tokens used (pads included); 0 if the pass failed, and then each prompt
        is prefilled on its own, where a failure is its own."""
        model = self.model.model
        lengths = [len(r.ids) for r in group]
        hits = [self.prefix_cache.lookup(r.ids) for r in group]
        k = min(n for n, _ in hits)  # every row starts after the prefix all of them have cached
        ids = torch.zeros((len(group), max(lengths) - k), dtype=torch.long)  # (G, T)
        for b, r in enumerate(group):
            ids[b, :lengths[b] - k] = torch.tensor(r.ids[k:])
        cache = KVCache(model.config, len(group), max(lengths), model.dtype, model.device)
        if k:
            for b, (_, prefix) in enumerate(hits):
                prefix.copy_into(cache, b, k)
            cache.advance(k)
        t0 = time.perf_counter()
        try:
            last = torch.tensor(lengths, device=model.device) - k - 1
            logits, _ = model(ids.to(model.device), cache=cache, logits_at=last)  # (G, 1, V)
        except Exception:
            return 0
        seconds = time.perf_counter() - t0
        for b, r in enumerate(group):
            self._prefilling.remove(r)
            r.prefilled, r.cached, r.prefill_seconds = lengths[b], k, seconds
            self.prefix_cache.insert(r.ids, cache, b)
            self._start(r, logits[b:b + 1, -1], lambda b=b: self._cache.add(cache, b, lengths[b]))
        return ids.numel()

    def _start(self, r: _Request, logits: torch.Tensor, join) -> None:
        """r's prompt is in: emit its first token (from logits (1, V)) and `join()` the batch,
        or finish it if that token already ends it."""
        r.stats = dict(prompt_tokens=len(r.ids), cached_tokens=r.cached,
                       prompt_tps=per_second(len(r.ids), r.prefill_seconds))
        r.first_token_at = time.perf_counter()
        try:
            going = self._emit(r, self._sample_one(r, logits), logits)
        except Exception as e:  # this request's sampling failed: only it fails
            self._finish(r, e)
            return
        if going:
            join()
            self._rows.append(r)
        else:
            self._finish(r)

    def _prefill(self, r: _Request, budget: int) -> int:
        """Prefill the next chunk of r's prompt; once it is all in, emit the first token and
        join the batch. Returns the prompt tokens used."""
        model = self.model.model
        if r.prefill is None:
            r.prefill = KVCache(model.config, 1, len(r.ids), model.dtype, model.device)
            r.cached, prefix = self.prefix_cache.lookup(r.ids)
            if r.cached:  # start after the longest prefix an earlier prompt shares with this one
                prefix.copy_into(r.prefill, 0, r.cached)
                r.prefill.advance(r.cached)
                r.prefilled = r.cached
        n = min(budget, len(r.ids) - r.prefilled)
        t0 = time.perf_counter()
        chunk = torch.tensor([r.ids[r.prefilled:r.prefilled + n]], dtype=torch.long, device=model.device)
        logits, _ = model(chunk, cache=r.prefill, last_only=True)  # (1, 1, V)
        r.prefill_seconds += time.perf_counter() - t0
        r.prefilled += n
        if r.prefilled < len(r.ids):
            return n  # the rest of this prompt goes in the next steps
        self._prefilling.remove(r)
        self.prefix_cache.insert(r.ids, r.prefill, 0)
        self._start(r, logits[:, -1], lambda: self._cache.add(r.prefill))
        r.prefill = None  # copied into the batch (or finished): free it
        return n

    def _decode_step(self) -> None:
        """One forward pass for every row: its last token, plus a prompt lookup draft where there is
        room (`_drafts`); then each row samples and emits, keeping drafted tokens it agrees with."""
        model = self.model.model
        drafts = self._drafts()
        width = 1 + max(map(len, drafts))
        feed = [[r.last] + d + [r.last] * (width - 1 - len(d)) for r, d in zip(self._rows, drafts)]  # padded
        idx = torch.tensor(feed, dtype=torch.long, device=model.device)  # (rows, width)
        t = time.perf_counter()
        logits, _ = model(idx, cache=self._cache, last_only=width == 1)  # (rows, width, V); failing fails the batch
        if len(feed) == 1 and self._rows[0].lookup is not None:  # what a draft costs, for `_drafts`
            self._cost.timed(width, time.perf_counter() - t)
        greedy = [b for b, r in enumerate(self._rows)
                  if is_greedy(r.params) and not r.procs.active and r.params.logprobs is None]
        every = len(greedy) == len(self._rows)  # every row greedy: one argmax, no copy
        picks = (logits if every else logits[greedy]).argmax(dim=-1).tolist() if greedy else []  # (greedy, width)
        picked = dict(zip(greedy, picks))
        ended: list[tuple[int, Exception | None]] = []
        keep = list(self._cache.lens)
        for b, (r, d) in enumerate(zip(self._rows, drafts)):
            start = keep[b] - width  # row b's length before this pass
            r.drafted += len(d)
            try:
                for i in range(len(d) + 1):  # row i predicts the token after feed[b][i]
                    row = logits[b:b + 1, i]  # (1, V)
                    tok = picked[b][i] if b in picked else self._sample_one(r, row)
                    hit = i < len(d) and tok == d[i]
                    r.accepted += hit
                    if not self._emit(r, tok, row):
                        ended.append((b, None))
                        break
                    if not hit:
                        break
                keep[b] = start + i + 1  # the fed token and the draft tokens that were right
                if r.lookup is not None:
                    r.lookup.checked(len(d), i)
            except Exception as e:  # one row's sampling failed: only that request fails
                ended.append((b, e))
        if width > 1:
            self._cache.truncate(keep)
        leaving = [(self._rows[b], e) for b, e in ended]
        for b, _ in reversed(ended):  # highest first: the row moved into a hole is never one to drop
            self._leave(b)
        for r, e in leaving:  # end the streams once their rows are free (`active` already counts them out)
            self._finish(r, e)

    def _drafts(self) -> list[list[int]]:
        """A prompt lookup draft per row (empty ones beyond LOOKUP_MAX_ROWS rows)."""
        if len(self._rows) > LOOKUP_MAX_ROWS:
            return [[] for _ in self._rows]
        room = self.model.config.block_size - self._cache.seq_len - 1
        return [r.lookup.draft(r.lookup.size(min(room, r.params.prompt_lookup, r.text.max_new - r.text.n - 1),
                                             self._cost))
                if r.lookup is not None and room > 0 else [] for r in self._rows]

    # -- sampling and output ----------------------------------------------------------

    def _sample_one(self, r: _Request, logits: torch.Tensor) -> int:
        """logits (1, V) for one request → its next token, as stream_generate picks it."""
        return int(r.sampler(r.procs(logits) if r.procs.active else logits))

    def _emit(self, r: _Request, tok: int, logits: torch.Tensor | None = None) -> bool:
        """Send the text for `tok` (sampled from the raw logits (1, V)) to the request's stream;
        False once the request is finished."""
        text, reason = r.text.push(tok)
        n = r.text.n
        tps = per_second(n - 1, time.perf_counter() - r.first_token_at) if n > 1 else 0.0
        k = r.params.logprobs
        lp, top = token_logprobs(logits, tok, k) if k is not None else (None, None)
        self._outbox.put(r.stream, GenerationChunk(text, tok, reason, **r.stats, generation_tokens=n,
                                                   generation_tps=tps, looped=r.text.looped or r.procs.looped,
                                                   logprob=lp, top_logprobs=top, drafted_tokens=r.drafted,
                                                   accepted_tokens=r.accepted))
        if reason:
            return False  # the caller ends the stream
        r.procs.accept(tok)
        r.last = tok
        if r.lookup is not None:
            r.lookup.extend([tok])
        return True

    def _finish(self, r: _Request, error: BaseException | None = None) -> None:
        """End r's stream, with `error` raised to its reader if given."""
        if error is not None:
            self._outbox.put(r.stream, error)
        self._outbox.put(r.stream, _DONE)

    def _fail_all(self, error: BaseException) -> None:
        with self._wake:
            everyone = list(self._waiting) + self._prefilling + self._rows
            self._waiting.clear()
        for r in everyone:
            self._finish(r, error)
        self._outbox.flush()
        self._prefilling, self._rows = [], []
        self._cache = BatchKVCache(self.model.config, self.model.model.dtype, self.model.model.device)
