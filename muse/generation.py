"""Text generation: sampling, streaming, stop strings and beam search.

`stream_generate()` is the primitive: it prefills the prompt into a `KVCache`,
then decodes one token at a time, yielding a `GenerationChunk` (text delta, token,
finish reason, speeds) per step. `generate()` is a loop over it. Samplers are built
once from `SamplingParams`; `temperature == 0` means greedy.
"""

from __future__ import annotations

import collections
import statistics
import threading
import time
import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from muse.cpu import adapt_threads
from muse.errors import ContextLengthError
from muse.model import KVCache, Transformer
from muse.sampling import TRUNCATE_POLICIES, GenerationChunk, SamplingParams  # noqa: F401 (re-exported)


# A step can end within the clock's resolution: a rate divides by at least this, never by 0.
MIN_SECONDS = 1e-9


def per_second(count: int, seconds: float) -> float:
    """count / seconds: the tokens/s in a GenerationChunk's stats, even when no time was measured."""
    return count / max(seconds, MIN_SECONDS)


# -- sampling ---------------------------------------------------------------------

def apply_penalties(logits: torch.Tensor, context: torch.Tensor, generated: torch.Tensor,
                    p: SamplingParams) -> torch.Tensor:
    """logits (B, V); context (B, T) all ids so far; generated (B, G) the output ids."""
    if p.repetition_penalty != 1.0 and context.numel():
        seen = logits.gather(1, context)
        seen = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        logits = logits.scatter(1, context, seen)
    if (p.presence_penalty or p.frequency_penalty) and generated.numel():
        counts = torch.zeros_like(logits).scatter_add_(1, generated, torch.ones_like(generated, dtype=logits.dtype))
        logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def bias_of(logit_bias: dict[int, float] | None, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`logit_bias` as (token ids, values) to `index_add` to logits, or None; ValueError for an id past
    the vocabulary. Sampling (`LogitsProcessors`) and beam search share it."""
    if not logit_bias:
        return None
    bad = [t for t in logit_bias if t >= vocab_size]
    if bad:
        raise ValueError(f"logit_bias names token id {bad[0]}, but the vocabulary has {vocab_size} tokens")
    return (torch.tensor(list(logit_bias), dtype=torch.long),
            torch.tensor(list(logit_bias.values()), dtype=torch.float32))


class LogitsProcessors:
    """One request's logits processors, run on the logits (1, V) before sampling, in this order:
    repetition / presence / frequency penalties → `logit_bias` → the constraint's token mask.

    Built once per request from its `SamplingParams`; `stream_generate` and the server's
    `Scheduler` both run it, so a request picks the same tokens either way. `accept(token)`
    advances the state (the token history, the constraint's parser) after each sampled token.
    """

    def __init__(self, p: SamplingParams, tokenizer, vocab_size: int, prompt: list[int], device=None):
        self.params = p
        self.penalized = bool(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty)
        self.prompt_len = len(prompt)
        self.device = device
        self.history = torch.tensor([prompt], dtype=torch.long, device=device) if self.penalized else None  # (1, T)
        self.bias = bias_of(p.logit_bias, vocab_size)
        self.mask = None
        if p.constraint is not None:
            from muse.constrain import TokenMask

            self.mask = TokenMask(p.constraint, tokenizer, vocab_size)
        # Under a constraint the loop guard lives here, not in TokenText: stopping mid-loop would leave
        # output that does not parse, so a loop switches the mask to finishing it instead.
        self.output: list[int] | None = [] if self.mask is not None and p.loop_guard else None
        self.looped = False

    @property
    def active(self) -> bool:
        """False when the chain would leave every logit as it is (the fast greedy path applies)."""
        return self.penalized or self.bias is not None or self.mask is not None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.penalized:
            logits = apply_penalties(logits, self.history, self.history[:, self.prompt_len:], self.params)
        if self.bias is not None:
            ids, values = self.bias
            logits = logits.float().index_add(1, ids.to(logits.device), values[None].to(logits.device))
        if self.mask is not None:
            logits = self.mask.apply(logits)
        return logits

    def accept(self, token: int) -> None:
        if self.penalized:
            self.history = torch.cat([self.history, torch.tensor([[token]], device=self.device)], dim=1)
        if self.mask is not None:
            self.mask.accept(token)
        if self.output is not None and not self.looped:
            self.output.append(token)
            if len(self.output) >= LOOP_SPAN and loop_tail(self.output)[0]:
                self.looped = True
                self.mask.finish()


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The model's log-probability of `token` and its k most likely (token, logprob), best first,
    from the raw logits (1, V), before any penalty, bias or mask (what OpenAI's API reports)."""
    logp = F.log_softmax(logits[0].float(), dim=-1)  # (V,)
    top = torch.topk(logp, k) if k else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return float(logp[token]), pairs


def is_greedy(p: SamplingParams) -> bool:
    """temperature 0 → argmax. Below 1e-5 too: sampling that cold is argmax anyway, and 1/T would overflow fp32."""
    return p.temperature < 1e-5


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs (B, V) → the nucleus: the most likely tokens until their mass reaches top_p
    (at least one), the rest zeroed. Sorting the whole vocabulary is the slow part of
    sampling, so it looks at the top 64 candidates first and widens only when they hold
    less than top_p of the mass; a token past them can never be in the nucleus."""
    V = probs.size(-1)
    k = min(64, V)
    while True:
        top, order = probs.topk(k, dim=-1)  # (B, k), descending
        mass = top.cumsum(-1)
        if k == V or bool((mass[:, -1] >= top_p).all()):
            break
        k = min(V, 16 * k)
    drop = (mass - top) >= top_p  # the mass before this token already reaches top_p
    drop[:, 0] = False  # the top token always stays (a top_p below fp32's range would drop it)
    return torch.zeros_like(probs).scatter(1, order, top.masked_fill(drop, 0.0))


class Sampler:
    """Picks next ids from logits (B, V) → (B,): argmax when greedy, else a draw from the temperature /
    top-k / top-p / min-p distribution (`probs`) by one uniform number per token (inverse CDF, seeded).
    One number a token, whatever else happens, is what lets a prompt-lookup draft be checked by
    sampling as usual: the same seed gives the same text with drafts or without."""

    def __init__(self, p: SamplingParams):
        self.p = p
        self.greedy = is_greedy(p)
        self.generator = torch.Generator().manual_seed(p.seed) if p.seed is not None and not self.greedy else None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.greedy:
            return logits.argmax(dim=-1)
        probs = self.probs(logits)  # (B, V)
        cdf = probs.cumsum(-1)
        u = torch.rand(probs.size(0), 1, generator=self.generator).to(probs.device)  # (B, 1) in [0, 1)
        ids = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.size(-1) - 1)[:, 0]
        rows = torch.arange(probs.size(0), device=probs.device)
        # u·total rounding up to the total could land on a trailing zero: the likeliest token then
        return torch.where(probs[rows, ids] > 0, ids, probs.argmax(-1))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution (B, V) a draw comes from, normalised."""
        p = self.p
        # shift the top logit to 0 first: a tiny temperature then gives -inf for the rest, never inf - inf
        logits = (logits - logits.amax(dim=-1, keepdim=True)) / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.size(-1))).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = F.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            probs = top_p_filter(probs, p.top_p)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.amax(-1, keepdim=True), 0.0)
        return probs / probs.sum(-1, keepdim=True)


def make_sampler(p: SamplingParams) -> Sampler:
    """Build once: logits (B, V) float → next ids (B,)."""
    return Sampler(p)


# -- prompts ----------------------------------------------------------------------

def fit_prompt(ids: list[int], block_size: int, p: SamplingParams) -> tuple[list[int], int]:
    """Check the prompt against the context window; return (ids, max_new_tokens)."""
    if not ids:
        raise ValueError("prompt must not be empty")
    room = block_size - len(ids)
    if room < 1:
        if p.truncate != "left":
            raise ContextLengthError(len(ids), block_size)
        keep = max(1, block_size - p.max_new_tokens)
        ids, room = ids[-keep:], block_size - keep
    return ids, min(p.max_new_tokens, room)


class StopMatcher:
    """Holds back text that might start a stop string, so stop strings are never emitted."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0  # longest tail of pending that is a prefix of some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# A loop: the output's tail is one span repeated, at least LOOP_REPEATS times in a row and over at
# least LOOP_SPAN tokens (a 1-token cycle 32 times, a 4-token one 8 times, a ≥ 11-token one 3 times),
# with a period of at most LOOP_MAX_PERIOD tokens. Nothing shorter than LOOP_SPAN can trip it.
LOOP_SPAN, LOOP_REPEATS, LOOP_MAX_PERIOD = 32, 3, 128


def loop_tail(ids: list[int]) -> tuple[int, int]:
    """(period, run) when `ids` ends in a loop, else (0, 0): the shortest repeating span's length,
    and how many tokens at the end the repetition covers (one copy is `ids[len - run:][:period]`)."""
    n = len(ids)
    for p in range(1, min(LOOP_MAX_PERIOD, n // LOOP_REPEATS) + 1):
        need = max(LOOP_REPEATS * p, LOOP_SPAN)
        if need > n or ids[-1] != ids[-1 - p]:
            continue
        if all(ids[i] == ids[i - p] for i in range(n - need + p, n - 1)):
            start = n - need
            while start > 0 and ids[start - 1] == ids[start - 1 + p]:
                start -= 1
            return p, n - start
    return 0, 0


# A near-loop: the output cycles through what it already wrote with small changes, which `loop_tail`
# cannot see (numbered copies of one line, the same sentences with the paragraph breaks moved). A
# token counts as copied when a 4-token run it is part of occurs earlier in the output; a near-loop
# is ≥ 95 % copied tokens over the last 96. On 256-token slices (bench/loop_guard.py) of Tiny
# Shakespeare, README, Muse's code and eval JSONL, 1 of 2,288 reached it (a regex of Unicode classes,
# at its 253rd token); 8 of 30 SmolLM2 answers to everyday prompts did, each one a loop.
ECHO_GRAM, ECHO_WINDOW, ECHO_COPIED = 4, 96, 0.95


class Echo:
    """Counts the copied tokens among the last ECHO_WINDOW of a growing output: O(1) a token."""

    def __init__(self):
        self.first: dict[tuple[int, ...], int] = {}  # each 4-token run → where it first started
        self.copied: list[bool] = []
        self.recent = 0  # copied tokens in the window

    def push(self, ids: list[int]) -> bool:
        """`ids` (the output) grew by one token: whether it is now a near-loop."""
        i = len(ids) - 1
        copied = self.copied
        copied.append(False)
        if i >= ECHO_WINDOW and copied[i - ECHO_WINDOW]:
            self.recent -= 1  # that token left the window
        start = i - ECHO_GRAM + 1
        if start >= 0 and self.first.setdefault(tuple(ids[start:]), start) < start:
            for k in range(max(start, i - ECHO_WINDOW + 1), i + 1):
                if not copied[k]:
                    copied[k] = True
                    self.recent += 1
        return i + 1 >= ECHO_WINDOW and self.recent >= ECHO_COPIED * ECHO_WINDOW


def near_loop(ids: list[int]) -> bool:
    """Whether `ids` ends in a near-loop (what `Echo` tracks token by token), computed afresh: for beam
    search, whose beams are reordered every step."""
    echo, grown, hit = Echo(), [], False
    for t in ids:
        grown.append(t)
        hit = echo.push(grown)
    return hit


class TokenText:
    """Turns sampled tokens, one at a time, into the text a stream emits and its finish reason.

    UTF-8-safe incremental decoding, stop strings held back and never emitted, EOS, the loop
    guard and the `max_new` limit: the per-token rules shared by `stream_generate` and the
    server's batching scheduler, so both emit exactly the same text.
    """

    def __init__(self, tokenizer, stop: list[str], max_new: int, loop_guard: bool = False):
        self.eos = tokenizer.eos_ids if tokenizer is not None else set()
        self.decoder = tokenizer.stream_decoder() if tokenizer is not None else None
        self.stops = StopMatcher(stop)
        self.max_new = max_new
        self.n = 0  # tokens pushed so far
        self.ids: list[int] | None = [] if loop_guard else None  # the output so far, for the loop guard
        self.echo = Echo() if loop_guard else None
        self.looped = False  # the loop guard ended it

    def push(self, tok: int) -> tuple[str, str | None]:
        """(text to emit, finish reason: None | "stop" (EOS, stop string or loop) | "length")."""
        self.n += 1
        decoder, stops = self.decoder, self.stops
        if tok in self.eos:
            tail = stops.push(decoder.flush())[0] if decoder else ""
            return tail + stops.flush(), "stop"
        if self.ids is not None:
            self.ids.append(tok)
            self.looped = self.echo.push(self.ids) | self.loops()  # `|`: Echo must see every token
        safe, hit = stops.push(decoder.push(tok) if decoder else "")
        if hit:
            return safe, "stop"
        if self.n >= self.max_new or self.looped:
            tail, hit = stops.push(decoder.flush() if decoder else "")
            return safe + tail + ("" if hit else stops.flush()), "stop" if hit or self.looped else "length"
        return safe, None

    def loops(self) -> bool:
        """Whether the output just completed its LOOP_REPEATS-th copy of a span (cheap: most
        periods fail on the last token); near-loops are `Echo`'s."""
        return self.n >= LOOP_SPAN and loop_tail(self.ids)[0] > 0


# -- the generation loop ----------------------------------------------------------

@torch.inference_mode()
def stream_generate(model: Transformer, tokenizer, prompt: "str | list[int]",
                    params: SamplingParams | None = None, **kwargs) -> Iterator[GenerationChunk]:
    """Generate from `prompt` (text, or token ids), yielding chunks as tokens arrive."""
    p = (params or SamplingParams()).replace(**kwargs) if kwargs else (params or SamplingParams())
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids instead of text")
        ids = tokenizer.encode(prompt)
    else:
        ids = list(prompt)
    ids, max_new = fit_prompt(ids, model.config.block_size, p)
    if p.num_beams > 1:
        if p.constraint is not None or p.logprobs is not None:
            raise ValueError("constraint and logprobs need num_beams=1 (beam search does not take them)")
        yield from _stream_beams(model, tokenizer, ids, p, max_new)
        return
    procs = LogitsProcessors(p, tokenizer, model.config.vocab_size, ids, model.device)
    text_of = TokenText(tokenizer, p.stop, max_new, p.loop_guard and procs.output is None)
    sampler = make_sampler(p)
    cache = KVCache(model.config, 1, len(ids) + max_new, model.dtype, model.device)
    cost, history = drafting(model)
    lookup = prompt_lookup(p, ids, history)

    adapt_threads()
    t0 = time.perf_counter()
    logits, _ = model(torch.tensor([ids], dtype=torch.long, device=model.device), cache=cache,
                      last_only=True)  # (1, 1, V)
    t_prefill = time.perf_counter() - t0
    stats = dict(prompt_tokens=len(ids), prompt_tps=per_second(len(ids), t_prefill))
    t1 = time.perf_counter()  # the first token comes from the prefill logits: time the rest
    rows, draft, j = logits[:, -1:, :], [], 0  # rows[:, i] predicts the token after draft[:i] (i ≤ len(draft))
    drafted = accepted = 0
    for n in range(1, max_new + 1):
        raw = rows[:, j, :]  # (1, V)
        logits = procs(raw) if procs.active else raw
        tok = int(sampler(logits))
        hit = j < len(draft) and tok == draft[j]  # the draft was right: the next row is already computed
        accepted += hit
        tps = (n - 1) / (time.perf_counter() - t1) if n > 1 else 0.0
        text, reason = text_of.push(tok)
        lp, top = token_logprobs(raw, tok, p.logprobs) if p.logprobs is not None else (None, None)
        yield GenerationChunk(text, tok, reason, **stats, generation_tokens=n, generation_tps=tps,
                              looped=text_of.looped or procs.looped, logprob=lp, top_logprobs=top,
                              drafted_tokens=drafted, accepted_tokens=accepted)
        if reason:
            return
        procs.accept(tok)
        if hit:
            j += 1
            continue
        feed = [tok]
        if lookup is not None:
            cache.truncate(cache.pos - (len(draft) - j))  # the rejected rest of the draft
            lookup.checked(len(draft), j)
            lookup.extend(draft[:j] + [tok])
            room = min(p.prompt_lookup, max_new - n - 1, cache.max_len - cache.pos - 1)
            draft = lookup.draft(lookup.size(room, cost) if room > 0 else 0)
            drafted += len(draft)
            feed += draft
        adapt_threads()  # a clock read, and every half second a look at the machine's load
        t = time.perf_counter()
        rows, j = _forward(model, feed, cache), 0
        if lookup is not None:
            cost.timed(len(feed), time.perf_counter() - t)


def _forward(model: Transformer, tokens: list[int], cache: KVCache) -> torch.Tensor:
    """Logits (1, T, V) for T tokens that continue the cached sequence (T = 1: the last only)."""
    x = torch.tensor([tokens], dtype=torch.long, device=model.device)  # (1, T)
    return model(x, cache=cache, last_only=len(tokens) == 1)[0]


# -- prompt lookup ------------------------------------------------------------------

LOOKUP_NGRAM = (3, 2)  # the longest and shortest tail n-gram looked up
# What a draft is worth is learned as a generation goes (`PromptLookup.size`): before any draft was
# checked, its first token is taken to be accepted with probability PRIOR_ACCEPT, an evidence worth
# PRIOR_WEIGHT drafts; the counts fade by ACCEPT_DECAY a pass.
PRIOR_ACCEPT, PRIOR_WEIGHT, ACCEPT_DECAY = 0.5, 2.0, 0.97
HISTORY_DECAY = 0.98  # the model's earlier drafts (`DraftHistory`): about the last 50 count
# A pass of w tokens is taken to cost 1 + PRIOR_SLOPE × (w - 1) passes of one until `PassCost` has
# timed some: optimistic on purpose, so that the first drafts are tried, and timed. Measured inside
# the apps (2-core Zen 4, AVX2 kernels, contexts of a few hundred tokens), w = 9 cost 2.8-3.1 passes
# on SmolLM2 and 3.7-4.3 on Qwen2.5-0.5B; on a GPU next to nothing.
PRIOR_SLOPE = 0.05
COST_SAMPLES = 15  # the passes of each kind a cost is the median of: one slow pass changes nothing


def prompt_lookup(p: SamplingParams, ids: list[int], history: "DraftHistory | None" = None) -> "PromptLookup | None":
    """The drafter for a request with prompt `ids`, or None where drafts are off: `p.prompt_lookup` 0, or
    a constraint or logprobs, which want every step's own logits. A drafted token is kept only when the
    sampler picks it anyway (`Sampler`), so the text is the one without drafts, greedy or seeded."""
    if p.prompt_lookup and p.constraint is None and p.logprobs is None:
        return PromptLookup(ids, history=history)
    return None


class PassCost:
    """What a forward pass over w new tokens costs, in passes of one token, measured on this model
    (`timed`): the median of the last COST_SAMPLES passes of that width against those of one, so that
    a pass another program slowed does not decide. A width not timed yet costs what the widest timed
    one below it does plus `slope` (the median cost of a token more) for each token more. On a CPU the
    weights are read once a pass whatever w is, so checking 9 tokens costs 3-4 passes of one, not 9;
    how much depends on the model, its precision and the machine, hence the timing."""

    def __init__(self, slope: float = PRIOR_SLOPE):
        self.prior = slope
        self._seconds: dict[int, collections.deque] = {}  # width → the seconds of its last passes
        self._slopes: collections.deque = collections.deque(maxlen=COST_SAMPLES)  # per token more, in passes
        self._lock = threading.Lock()  # one model may generate in several threads (the server's, the API's)

    def timed(self, width: int, seconds: float) -> None:
        """Record a pass of `width` tokens that took `seconds`."""
        with self._lock:
            self._seconds.setdefault(width, collections.deque(maxlen=COST_SAMPLES)).append(seconds)
            if width > 1 and 1 in self._seconds:
                self._slopes.append(max(0.0, seconds / statistics.median(self._seconds[1]) - 1) / (width - 1))

    @property
    def slope(self) -> float:
        with self._lock:
            return statistics.median(self._slopes) if self._slopes else self.prior

    def ratio(self, width: int) -> float:
        """The cost of a pass of `width` tokens, in passes of one."""
        return self.ratios(width)[-1]

    def ratios(self, widest: int) -> list[float]:
        """ratio(w) for w = 1 .. widest, reading the timings once."""
        slope = self.slope
        with self._lock:
            one = self._seconds.get(1)
            base = statistics.median(one) if one else None
            timed = {w: statistics.median(d) / base for w, d in self._seconds.items() if base and w <= widest}
        out, last_w, last = [], 1, 1.0
        for w in range(1, widest + 1):
            if w in timed:
                last_w, last = w, timed[w]
            out.append(last + slope * (w - last_w))
        return out


class DraftHistory:
    """How often the first token of a draft was right in this model's recent generations (fading
    counts): what a new generation's drafts start from. The apps call a model many times in a row
    on the same kind of work (a summary's sentences, a rewrite's paragraphs), and a short generation
    whose passes are dear would never try a draft on a guess of 1 in 2; its own drafts soon outweigh
    this."""

    def __init__(self):
        self.hits = self.tries = 0.0
        self._lock = threading.Lock()

    def record(self, drafted: int, accepted: int) -> None:
        if drafted:
            with self._lock:
                self.hits = HISTORY_DECAY * self.hits + (accepted > 0)
                self.tries = HISTORY_DECAY * self.tries + 1

    @property
    def prior(self) -> float:
        with self._lock:
            return (self.hits + PRIOR_WEIGHT * PRIOR_ACCEPT) / (self.tries + PRIOR_WEIGHT)


_per_model: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[PassCost, DraftHistory]]" = weakref.WeakKeyDictionary()
_per_model_lock = threading.Lock()


def drafting(model: torch.nn.Module) -> "tuple[PassCost, DraftHistory]":
    """The model's `PassCost` and `DraftHistory`, shared by its generations (and the server's) for as
    long as it lives."""
    with _per_model_lock:
        held = _per_model.get(model)
        if held is None:
            held = _per_model[model] = (PassCost(), DraftHistory())
        return held


def pass_cost(model: torch.nn.Module) -> PassCost:
    """The model's `PassCost` (`drafting`)."""
    return drafting(model)[0]


class PromptLookup:
    """Drafts from the text so far (prompt lookup decoding): the tokens that followed the latest
    earlier occurrence of the text's last n-gram, longest n first. Rewrites,
    summaries, answers from documents and translations copy much of their prompt; the model checks
    a whole draft in one forward pass, which on a CPU costs far less than a pass a token
    (`PassCost` says how much; `size` drafts only as far as that pays)."""

    def __init__(self, ids: list[int], ngram: tuple[int, int] = LOOKUP_NGRAM, history: DraftHistory | None = None):
        self.longest, self.shortest = ngram
        self.history = history  # the model's earlier drafts: where this one's first guess comes from
        self.first = history.prior if history is not None else PRIOR_ACCEPT
        self.ids: list[int] = []
        self.seen: dict[tuple[int, ...], int] = {}  # n-gram → index of its last token, latest occurrence
        # Fading counts, by position in a draft, of the tokens accepted and of those tried (every
        # position up to the first wrong one): a copied passage is accepted whole or not at all, so
        # a token is likelier right when the ones before it were.
        self.hits: list[float] = []
        self.tries: list[float] = []
        self.extend(ids)

    def chances(self, n: int) -> list[float]:
        """For draft tokens 0 .. n-1, the chance that each is accepted when the ones before it were: its
        own counts, shrunk towards the chance of the position before (for the first: the model's
        recent drafts', or PRIOR_ACCEPT)."""
        out, prior = [], self.first
        for i in range(n):
            if i < len(self.hits):
                prior = (self.hits[i] + PRIOR_WEIGHT * prior) / (self.tries[i] + PRIOR_WEIGHT)
            out.append(prior)
        return out

    def checked(self, drafted: int, accepted: int) -> None:
        """Count how the last draft fared: `accepted` of its `drafted` tokens were right."""
        if self.history is not None:
            self.history.record(drafted, accepted)
        tried = min(drafted, accepted + 1)
        while len(self.tries) < tried:
            self.hits.append(0.0)
            self.tries.append(0.0)
        for i in range(tried):
            self.tries[i] += 1
            self.hits[i] += i < accepted

    def size(self, most: int, cost: PassCost) -> int:
        """The draft length, up to `most`, that gives the most tokens per unit of time: k drafted tokens
        yield on average 1 + P(the first is right) + P(the first two are) + … tokens for a pass that
        costs cost.ratio(k + 1); 0 where no draft beats a plain pass. The counts fade a little with
        every call, so a text that stops copying soon drafts short, and one that drafted nothing for
        a while tries again."""
        self.hits = [h * ACCEPT_DECAY for h in self.hits]
        self.tries = [t * ACCEPT_DECAY for t in self.tries]
        if most <= 0:
            return 0
        ratios = cost.ratios(most + 1)  # ratios[k]: a pass of k + 1 tokens
        best, size, gain, chance = 1.0, 0, 1.0, 1.0
        for k, a in enumerate(self.chances(most), 1):
            chance *= a
            gain += chance
            value = gain / ratios[k]
            if value > best:
                best, size = value, k
        return size

    def extend(self, tokens: list[int]) -> None:
        ids, seen = self.ids, self.seen
        for tok in tokens:
            end = len(ids) - 1  # the old tail becomes history: it may be looked up from now on
            for n in range(self.shortest, min(self.longest, end + 1) + 1):
                seen[tuple(ids[end - n + 1:end + 1])] = end
            ids.append(tok)

    def draft(self, k: int) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the tail ([] when none)."""
        if k <= 0:
            return []
        ids = self.ids
        for n in range(min(self.longest, len(ids)), self.shortest - 1, -1):
            end = self.seen.get(tuple(ids[-n:]))
            if end is not None:
                return ids[end + 1:end + 1 + k]
        return []


def generate(model: Transformer, tokenizer, prompt: "str | list[int]",
             params: SamplingParams | None = None, **kwargs) -> str:
    """The whole completion as one string (a loop over `stream_generate`)."""
    return "".join(c.text for c in stream_generate(model, tokenizer, prompt, params, **kwargs))


# -- scoring ----------------------------------------------------------------------

@torch.inference_mode()
def score(model: Transformer, prefix: list[int], continuations: list[list[int]]) -> list[list[float]]:
    """Log-probability of each token of each continuation after `prefix`: one list per continuation.

    The likelihood primitive (label scoring, choice ranking): one forward of the prefix fills a KV
    cache, copied to N rows; the continuations, right-padded to the longest (M tokens), go through
    together. Padding sits after each continuation's real tokens, so the causal mask keeps it away
    from the positions that are scored.
    """
    if not prefix:
        raise ValueError("prefix must not be empty")
    if not continuations or any(not c for c in continuations):
        raise ValueError("continuations must be a non-empty list of non-empty token lists")
    n, m = len(continuations), max(len(c) for c in continuations)
    if len(prefix) + m > model.config.block_size:
        raise ContextLengthError(len(prefix) + m, model.config.block_size)
    dev = model.device
    cache = KVCache(model.config, 1, len(prefix) + m - 1 if m > 1 else len(prefix), model.dtype, dev)
    first, _ = model(torch.tensor([prefix], device=dev), cache=cache, last_only=True)  # (1, 1, V)
    logits = first.expand(n, 1, -1)
    targets = torch.zeros(n, m, dtype=torch.long, device=dev)  # (N, M)
    for i, c in enumerate(continuations):
        targets[i, :len(c)] = torch.tensor(c)
    if m > 1:
        cache.reorder(torch.zeros(n, dtype=torch.long, device=dev))
        rest, _ = model(targets[:, :-1], cache=cache)  # (N, M-1, V)
        logits = torch.cat([logits, rest], dim=1)  # (N, M, V): logits[:, j] predicts targets[:, j]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(2, targets[:, :, None])[:, :, 0].cpu()  # (N, M)
    return [logp[i, :len(c)].tolist() for i, c in enumerate(continuations)]


# -- beam search ------------------------------------------------------------------

# Who watches beam search: called as `watch(step, best)` after each step, with the best open beam's
# generated ids. Beam search decides its text only at the end; a watcher can show it forming.
_beam_watch: ContextVar[Callable[[int, list[int]], None] | None] = ContextVar("muse_beam_watch", default=None)


@contextmanager
def watching_beams(watch: Callable[[int, list[int]], None]) -> Iterator[None]:
    """Within the block, beam search (in this thread) reports each step to `watch(step, best_ids)`."""
    token = _beam_watch.set(watch)
    try:
        yield
    finally:
        _beam_watch.reset(token)


@torch.inference_mode()
def beam_search(model: Transformer, ids: list[int], p: SamplingParams, max_new: int,
                eos: set[int]) -> list[int]:
    """Best continuation of `ids` by beam search; returns generated ids (EOS included if hit).

    Follows transformers' `num_beams` search: keep the best `num_beams` open beams
    among the top 2·num_beams candidates; a candidate that hits EOS (or the length
    limit) joins the finished set with score logprob_sum / len ** length_penalty;
    stop once no open beam can beat the worst finished one.
    """
    nb, lp = p.num_beams, p.length_penalty
    keep = max(2, 1 + len(eos)) * nb
    cache = KVCache(model.config, 1, len(ids) + max_new, model.dtype, model.device)
    logits, _ = model(torch.tensor([ids], device=model.device), cache=cache, last_only=True)
    cache.reorder(torch.zeros(nb, dtype=torch.long))  # every beam starts from the prompt
    logits = logits.expand(nb, -1, -1)
    scores = torch.full((nb,), -1e9)
    scores[0] = 0.0  # identical beams: only the first may expand at step one
    seqs = torch.empty((nb, 0), dtype=torch.long)
    eos_t = torch.tensor(sorted(eos), dtype=torch.long)
    finished: list[tuple[float, list[int]]] = []
    improvable = True
    watch = _beam_watch.get()
    bias = bias_of(p.logit_bias, logits.size(-1))
    for n in range(1, max_new + 1):
        last = logits[:, -1, :].float()  # (nb, V)
        if bias is not None:
            last = last.index_add(1, bias[0], bias[1].expand(nb, -1))
        logp = F.log_softmax(last, dim=-1)
        if p.repetition_penalty != 1.0:
            ctx = torch.cat([torch.tensor([ids] * nb), seqs], dim=1)
            logp = apply_penalties(logp, ctx, seqs, p)
        V = logp.size(-1)
        top, idx = torch.topk((logp + scores[:, None]).view(-1), keep)  # (keep,)
        beam, tok = idx // V, idx % V
        cand = torch.cat([seqs[beam], tok[:, None]], dim=1)  # (keep, n)
        hits = torch.isin(tok, eos_t) | (n == max_new)
        if p.loop_guard and n >= LOOP_SPAN:  # a looping beam finishes (verbatim repeats are cut in _stream_beams)
            hits |= torch.tensor([loop_tail(c)[0] > 0 or (n >= ECHO_WINDOW and near_loop(c)) for c in cand.tolist()])
        if improvable:
            for j in range(nb):  # only the top num_beams candidates may finish
                if hits[j]:
                    finished.append((float(top[j]) / n ** lp, cand[j].tolist()))
            finished = sorted(finished, key=lambda f: -f[0])[:nb]
        if bool(hits.all()):
            break
        open_scores = top.masked_fill(hits, -1e9)
        sel = torch.topk(open_scores, nb).indices
        seqs, scores = cand[sel], open_scores[sel]
        if len(finished) == nb and not float(scores[0]) / n ** lp > finished[-1][0]:
            improvable = False
        if not improvable:
            break
        if watch is not None:
            watch(n, seqs[0].tolist())
        cache.reorder(beam[sel])
        logits, _ = model(seqs[:, -1:], cache=cache, last_only=True)
    return finished[0][1] if finished else seqs[0].tolist()


def _stream_beams(model, tokenizer, ids, p: SamplingParams, max_new: int) -> Iterator[GenerationChunk]:
    """Beam search decides the text only at the end, so it streams as one chunk."""
    eos = tokenizer.eos_ids if tokenizer is not None else set()
    t0 = time.perf_counter()
    out = beam_search(model, ids, p, max_new, eos)
    dt = time.perf_counter() - t0
    hit_eos = bool(out) and out[-1] in eos
    body = out[:-1] if hit_eos else out
    period, run = loop_tail(body) if p.loop_guard and not hit_eos else (0, 0)
    if period:  # keep one whole copy of the repeated span (copies end where the output ends)
        body = out = body[:len(body) - (run // period - 1) * period]
    looped = bool(period) or (p.loop_guard and not hit_eos and near_loop(body))
    text = tokenizer.decode(body) if tokenizer is not None else ""
    stops = StopMatcher(p.stop)
    safe, hit = stops.push(text)
    reason = "stop" if hit_eos or hit or looped else "length"
    yield GenerationChunk(safe + ("" if hit else stops.flush()), out[-1] if out else None, reason,
                          prompt_tokens=len(ids), generation_tokens=len(out), generation_tps=per_second(len(out), dt),
                          looped=looped)
