"""Constrained decoding: output that must parse always parses.

A `Constraint` (JSON schema, any JSON object, regex, a choice of strings, or a Lark grammar) is
compiled by llguidance (Microsoft's Rust engine behind Guidance; MIT, no dependencies) against the
model's own `tokenizer.json`. At every decode step `TokenMask.apply` sets the logit of each token
that cannot continue a valid output to -inf; once the output is complete only EOS is left.

Why llguidance: it reads a Hugging Face `tokenizers` JSON directly (Muse's tokenizer is one, GGUF
ones included), covers all five kinds in one engine (JSON schema, regex, Lark CFG, special tokens),
and computes a mask in ~0.3 ms for SmolLM2's 49k vocabulary without precomputing an index per
schema. outlines-core compiles each schema to a token-level automaton first (seconds for large
schemas, regular languages only: no recursive schemas or CFGs); lm-format-enforcer walks a
character-level parser in Python per token (several ms a step). `bench/constrain.py` measures the
mask's cost against a decode step.
"""

from __future__ import annotations

import json
import threading
import weakref

import numpy as np
import torch

from muse.errors import MuseError
from muse.sampling import JSON_OPTIONS, Constraint


class ConstraintError(MuseError, ValueError):
    """A schema, regex or grammar the engine cannot use, or output that broke its constraint."""


_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_TOKENIZERS_LOCK = threading.Lock()


def ll_tokenizer(tokenizer, vocab_size: int):
    """llguidance's view of a Muse `Tokenizer` (built once per tokenizer: ~0.2 s for 49k tokens).

    vocab_size is the model's logit width, which may exceed the tokenizer's (padded embeddings):
    ids past the tokenizer's have no text and are never allowed."""
    import llguidance

    if tokenizer is None or not hasattr(tokenizer, "backend"):
        raise ConstraintError("constrained output needs a model with a tokenizer")
    with _TOKENIZERS_LOCK:
        cached = _TOKENIZERS.get(tokenizer)
        if cached is None or cached[0] != vocab_size:
            eos = sorted(tokenizer.eos_ids)
            if not eos:
                raise ConstraintError("constrained output needs a tokenizer with an end-of-sequence token")
            ll = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=eos)
            cached = _TOKENIZERS[tokenizer] = (vocab_size, ll)
    return cached[1]


def grammar_of(constraint: Constraint) -> str:
    """The llguidance grammar (its JSON form) for `constraint`."""
    from llguidance import LLMatcher

    kind, value = constraint.kind, constraint.value
    if kind in ("json_schema", "json_object"):
        schema = {"type": "object"} if kind == "json_object" else value
        try:
            return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)  # a schema's own x-guidance wins
        except ValueError as e:
            raise ConstraintError(f"The JSON schema is not usable: {e}") from None
    if kind == "regex":
        return LLMatcher.grammar_from_regex(value)
    if kind == "choice":
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value))
    return LLMatcher.grammar_from_lark(value)


def check(constraint: Constraint, tokenizer=None, vocab_size: int | None = None) -> None:
    """Raise `ConstraintError` naming the problem when the engine cannot use `constraint`."""
    from llguidance import LLMatcher

    ll = ll_tokenizer(tokenizer, vocab_size or tokenizer.vocab_size) if tokenizer is not None else None
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar_of(constraint), ll)
    if is_error:
        raise ConstraintError(f"The {constraint.kind.replace('_', ' ')} constraint is not usable: "
                              f"{messages[0] if messages else 'unknown error'}")


_FINISH: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
CLOSERS = set('"}]')  # tokens made only of these end a string, an object, an array
ATOMS = {'"', "0", "1", "[", "{", "true", "false", "null", ","}  # the shortest starts of a value


def finish_bias(tokenizer, vocab_size: int) -> np.ndarray:
    """(V,) float32: 2 for tokens that only close strings, objects and arrays, 1 for the shortest
    value starts, 0 for the rest. Under the mask, picking by this first (then by logit) completes a
    JSON output in a few tokens from wherever it stands. Built once per tokenizer."""
    with _TOKENIZERS_LOCK:
        cached = _FINISH.get(tokenizer)
        if cached is None or len(cached) != vocab_size:
            texts = tokenizer.backend.decode_batch([[i] for i in range(min(vocab_size, tokenizer.vocab_size))],
                                                   skip_special_tokens=False)
            bias = np.zeros(vocab_size, dtype=np.float32)
            for i, t in enumerate(texts):
                t = t.strip()
                bias[i] = 2.0 if t and set(t) <= CLOSERS else 1.0 if t in ATOMS else 0.0
            cached = _FINISH[tokenizer] = bias
    return cached


class TokenMask:
    """One request's constraint state: which tokens may come next, advanced token by token."""

    def __init__(self, constraint: Constraint, tokenizer, vocab_size: int):
        from llguidance import LLMatcher

        self.constraint = constraint
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.finishing = False  # see finish()
        self.matcher = LLMatcher(ll_tokenizer(tokenizer, vocab_size), grammar_of(constraint), log_level=0)
        if self.matcher.is_error():
            raise ConstraintError(f"The {constraint.kind.replace('_', ' ')} constraint is not usable: "
                                  f"{self.matcher.get_error()}")
        self._words = np.zeros((vocab_size + 31) // 32, dtype=np.uint32)  # (W,) 32 tokens a word

    def allowed(self) -> np.ndarray:
        """(V,) bool: the tokens that keep the output valid (only EOS once it is complete).

        numpy, not torch, on purpose: these are ~50k-element ops, past torch's grain size, so
        torch would wake its OpenMP pool for each one, which on a busy machine costs tens of ms."""
        w = self._words
        self.matcher.unsafe_compute_mask_ptr(w.ctypes.data, w.nbytes)
        self._raise_if_broken()
        # bit j of word i is token 32·i + j; words are little-endian, so bytes in order, bits LSB first
        return np.unpackbits(w.view(np.uint8), bitorder="little")[: self.vocab_size].view(bool)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (1, V) → the same with every token the constraint forbids at -inf."""
        allowed = self.allowed()
        if logits.device.type != "cpu":
            if self.finishing:
                bias = torch.from_numpy(finish_bias(self.tokenizer, self.vocab_size)).to(logits.device)
                logits = logits.float() - logits.float().amax() - 1.0 + 1e4 * bias[None]
            return logits.masked_fill(~torch.from_numpy(allowed).to(logits.device), float("-inf"))
        out = logits.float().numpy().copy()  # (1, V)
        if self.finishing:  # rank by closing power first, the model's preference second
            out = out - out.max() - 1.0 + 1e4 * finish_bias(self.tokenizer, self.vocab_size)[None]
        out[:, ~allowed] = -np.inf
        return torch.from_numpy(out)

    def finish(self) -> None:
        """From now on steer to the nearest valid end: among the allowed tokens prefer those that
        close strings, objects and arrays, then the shortest value starts. Used when the output
        has started looping: a loop inside a JSON string would otherwise run to max_new_tokens
        and leave JSON that does not parse; this closes it in a few tokens instead."""
        self.finishing = True

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)
        self._raise_if_broken()

    @property
    def accepting(self) -> bool:
        """Whether the output so far is complete and valid."""
        return self.matcher.is_accepting()

    def _raise_if_broken(self) -> None:
        if self.matcher.is_error():
            raise ConstraintError(f"constrained decoding failed: {self.matcher.get_error()}")
