"""Continuous batching: one thread per model generates for every request at once.

Callers (the server's HTTP handlers) `submit()` a prompt and read `GenerationChunk`s from the
`Stream` they get back; only the scheduler thread touches the model. Between decode steps
requests join and leave the running batch:

- a new request's prompt is prefilled on its own single-row `KVCache`, at most
  `prefill_chunk` tokens per step (a long prompt is prefilled over several steps, so the
  streams already running keep going); its first token comes from the prefill logits;
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
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from muse.api import Model
from muse.errors import MuseError
from muse.generation import (
    GenerationChunk, SamplingParams, TokenText, apply_penalties, fit_prompt, is_greedy, make_sampler,
)
from muse.model import BatchKVCache, KVCache

_DONE = object()  # end-of-stream marker in a Stream's queue


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

    def _put(self, item) -> None:
        """Called from the scheduler thread: a chunk, an exception, or _DONE."""
        if self._loop is None:
            self._queue.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
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


@dataclass(eq=False)
class _Request:
    ids: list[int]  # the prompt, already fitted to the context window
    params: SamplingParams
    stream: Stream
    text: TokenText
    sampler: object
    penalized: bool  # repetition / presence / frequency penalty: needs the token history
    history: torch.Tensor  # (1, T) prompt + generated ids (only grown when penalized)
    prefill: KVCache | None = None
    prefilled: int = 0  # prompt tokens in `prefill` so far
    prefill_seconds: float = 0.0
    first_token_at: float = 0.0
    last: int = 0  # the token to feed at the next decode step
    stats: dict = field(default_factory=dict)


class Scheduler:
    """Runs a model's requests together (continuous batching) on one background thread.

    max_batch: most requests generating at once (more wait, in order, up to `max_waiting`;
    beyond that `submit` raises `SchedulerBusy`). prefill_chunk: most prompt tokens
    prefilled per step.
    """

    def __init__(self, model: Model, max_batch: int = 16, prefill_chunk: int = 512, max_waiting: int = 1024):
        for name, value in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk),
                            ("max_waiting", max_waiting)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
        self.model = model
        self.max_batch, self.prefill_chunk, self.max_waiting = max_batch, prefill_chunk, max_waiting
        self.steps = 0  # scheduler iterations that did work (tests watch requests leave)
        self._waiting: collections.deque[_Request] = collections.deque()
        self._prefilling: list[_Request] = []
        self._rows: list[_Request] = []  # _rows[b] owns row b of the batch cache
        self._cache = BatchKVCache(model.config, model.model.dtype, model.model.device)
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"muse-scheduler-{model.name}", daemon=True)
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
        penalized = bool(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty)
        req = _Request(ids, p, Stream(loop), TokenText(tok, p.stop, max_new), make_sampler(p), penalized,
                       torch.tensor([ids], dtype=torch.long))
        with self._wake:
            if self._closed:
                raise SchedulerClosed("the server is shutting down; retry on another instance")
            if len(self._waiting) >= self.max_waiting:
                raise SchedulerBusy(f"{len(self._waiting)} requests are already waiting for {self.model.name}; "
                                    "retry in a moment")
            self._waiting.append(req)
            self._wake.notify()
        return req.stream

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
        while True:
            with self._wake:
                while not self._closed and not (self._waiting or self._prefilling or self._rows):
                    self._wake.wait()
                if self._closed:
                    break
                while self._waiting and self.active < self.max_batch:
                    self._prefilling.append(self._waiting.popleft())
            try:
                self._step()
            except Exception as e:  # a bug or out of memory: fail what was running, keep serving
                self._fail_all(e)
        self._fail_all(SchedulerClosed("the server shut down before this request finished"))

    def _step(self) -> None:
        self._drop_cancelled()
        with torch.inference_mode():
            if self._prefilling:
                self._prefill_step()
            if self._rows:
                self._decode_step()
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
        while self._prefilling and budget > 0:
            r = self._prefilling[0]
            try:
                budget -= self._prefill(r, budget)
            except Exception as e:  # this request's fault (or its bad luck): only it fails
                if r in self._prefilling:
                    self._prefilling.remove(r)
                self._finish(r, e)

    def _prefill(self, r: _Request, budget: int) -> int:
        """Prefill the next chunk of r's prompt; once it is all in, emit the first token and
        join the batch. Returns the prompt tokens used."""
        model = self.model.model
        if r.prefill is None:
            r.prefill = KVCache(model.config, 1, len(r.ids), model.dtype, model.device)
        n = min(budget, len(r.ids) - r.prefilled)
        t0 = time.perf_counter()
        chunk = torch.tensor([r.ids[r.prefilled:r.prefilled + n]], dtype=torch.long, device=model.device)
        logits, _ = model(chunk, cache=r.prefill, last_only=True)  # (1, 1, V)
        r.prefill_seconds += time.perf_counter() - t0
        r.prefilled += n
        if r.prefilled < len(r.ids):
            return n  # the rest of this prompt goes in the next steps
        self._prefilling.remove(r)
        r.stats = dict(prompt_tokens=len(r.ids), prompt_tps=len(r.ids) / max(r.prefill_seconds, 1e-9))
        r.first_token_at = time.perf_counter()
        if self._emit(r, self._sample_one(r, logits[:, -1])):
            self._cache.add(r.prefill)
            self._rows.append(r)
        else:
            self._finish(r)
        r.prefill = None  # copied into the batch (or finished): free it
        return n

    def _decode_step(self) -> None:
        """One token for every row: one forward pass, then each row samples and emits."""
        model = self.model.model
        idx = torch.tensor([[r.last] for r in self._rows], dtype=torch.long, device=model.device)  # (rows, 1)
        logits, _ = model(idx, cache=self._cache, last_only=True)  # (rows, 1, V); failing here fails the batch
        logits = logits[:, -1]
        greedy = [b for b, r in enumerate(self._rows) if is_greedy(r.params) and not r.penalized]
        if len(greedy) == len(self._rows):  # every row greedy: one argmax, no copy
            tokens = dict(enumerate(logits.argmax(dim=-1).tolist()))
        else:
            tokens = dict(zip(greedy, logits[greedy].argmax(dim=-1).tolist())) if greedy else {}
        ended: list[tuple[int, Exception | None]] = []
        for b, r in enumerate(self._rows):
            try:
                tok = tokens[b] if b in tokens else self._sample_one(r, logits[b:b + 1])
                if not self._emit(r, tok):
                    ended.append((b, None))
            except Exception as e:  # one row's sampling failed: only that request fails
                ended.append((b, e))
        leaving = [(self._rows[b], e) for b, e in ended]
        for b, _ in reversed(ended):  # highest first: the row moved into a hole is never one to drop
            self._leave(b)
        for r, e in leaving:  # end the streams once their rows are free (`active` already counts them out)
            self._finish(r, e)

    # -- sampling and output ----------------------------------------------------------

    def _sample_one(self, r: _Request, logits: torch.Tensor) -> int:
        """logits (1, V) for one request → its next token, as stream_generate picks it."""
        if r.penalized:
            logits = apply_penalties(logits, r.history, r.history[:, len(r.ids):], r.params)
        return int(r.sampler(logits))

    def _emit(self, r: _Request, tok: int) -> bool:
        """Send the text for `tok` to the request's stream; False once the request is finished."""
        text, reason = r.text.push(tok)
        n = r.text.n
        tps = (n - 1) / max(time.perf_counter() - r.first_token_at, 1e-9) if n > 1 else 0.0
        r.stream._put(GenerationChunk(text, tok, reason, **r.stats, generation_tokens=n, generation_tps=tps))
        if reason:
            return False  # the caller ends the stream
        if r.penalized:
            r.history = torch.cat([r.history, torch.tensor([[tok]], dtype=torch.long)], dim=1)
        r.last = tok
        return True

    @staticmethod
    def _finish(r: _Request, error: BaseException | None = None) -> None:
        """End r's stream, with `error` raised to its reader if given."""
        if error is not None:
            r.stream._put(error)
        r.stream._put(_DONE)

    def _fail_all(self, error: BaseException) -> None:
        with self._wake:
            everyone = list(self._waiting) + self._prefilling + self._rows
            self._waiting.clear()
        for r in everyone:
            self._finish(r, error)
        self._prefilling, self._rows = [], []
        self._cache = BatchKVCache(self.model.config, self.model.model.dtype, self.model.model.device)
