"""Prefix caching: reuse the keys and values of prompts that start like an earlier one.

Chat prompts repeat themselves: every request carries the chat template's system prompt, and
each turn of a conversation re-sends all the turns before it. The scheduler keeps the keys and
values of recent prompts here; a new prompt is prefilled only from where it stops matching
one of them, which is most of the time-to-first-token on a CPU.

    cache = PrefixCache(config, max_tokens=2048)
    k, hit = cache.lookup(ids)            # the longest cached prefix of ids, in whole blocks
    if k:
        hit.copy_into(kv, row=0, length=k)  # kv: a KVCache, then prefill ids[k:] on top
    ...
    cache.insert(ids, kv, row=0)          # after the prompt is in: keep its prefix

Prefixes match in whole blocks of `block` tokens (a hash chained block by block, then the ids
compared, so a hash collision can never give wrong keys) and never include a prompt's last
token, whose logits the request still needs. Entries are evicted least recently used first
once they hold more than `max_tokens` positions in all.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch

from muse.config import ModelConfig
from muse.model import KVCache


# Matching granularity in tokens. Requests that arrive together are prefilled together from the
# prefix all of them have cached, so a coarse block throws away what they share: with blocks of 16,
# 8 chat requests sharing a 30-token system prompt and opening reused 16 tokens each (bench/serve.py).
# A block costs one hash and one index entry.
BLOCK = 4


@dataclass(eq=False)
class Prefix:
    """The keys and values of one prompt's first len(ids) tokens: k[layer], v[layer] (nkv, len, hd)."""

    ids: tuple[int, ...]
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    hashes: list[int]  # the index keys of this entry's block boundaries

    def copy_into(self, cache: KVCache, row: int, length: int) -> None:
        """Write the first `length` positions into row `row` of `cache` (positions 0..length-1)."""
        for dst, src in zip(cache.k + cache.v, self.k + self.v):
            dst[row, :, :length] = src[:, :length]


class PrefixCache:
    """Keys and values of recent prompt prefixes (see the module docstring).

    max_tokens: positions kept in all (memory: max_tokens × n_layer × 2 × n_kv_head × head_dim
    values); 0 turns caching off. block: the matching granularity in tokens.
    """

    def __init__(self, config: ModelConfig, max_tokens: int = 2048, block: int = BLOCK):
        for name, value, low in (("max_tokens", max_tokens, 0), ("block", block, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")
        self.config, self.max_tokens, self.block = config, max_tokens, block
        self._entries: collections.OrderedDict[Prefix, None] = collections.OrderedDict()  # LRU order
        self._index: dict[int, Prefix] = {}  # chained hash of ids[:k] (k a block boundary) → entry
        self.tokens = 0  # positions held

    def _hashes(self, ids: list[int] | tuple[int, ...]) -> list[int]:
        """Chained hashes of ids[:k] for k = block, 2·block, … ≤ len(ids) - 1."""
        out, h, b = [], 0, self.block
        for end in range(b, len(ids), b):  # end ≤ len - 1: the last token is never cached
            h = hash((h, tuple(ids[end - b:end])))
            out.append(h)
        return out

    def lookup(self, ids: list[int]) -> tuple[int, Prefix | None]:
        """(k, entry): the longest cached prefix ids[:k] (k a multiple of block, < len(ids)), or (0, None)."""
        k, entry = self._find(ids, self._hashes(ids))
        if entry is not None:
            self._entries.move_to_end(entry)
        return k, entry

    def _find(self, ids, hashes: list[int]) -> tuple[int, Prefix | None]:
        for i in range(len(hashes) - 1, -1, -1):
            entry = self._index.get(hashes[i])
            k = (i + 1) * self.block
            if entry is not None and len(entry.ids) >= k and entry.ids[:k] == tuple(ids[:k]):
                return k, entry
        return 0, None

    def insert(self, ids: list[int], cache: KVCache, row: int) -> None:
        """Keep the prefix of prompt `ids`, whose keys and values are in row `row` of `cache`."""
        hashes = self._hashes(ids)
        n = len(hashes) * self.block
        if not n or n > self.max_tokens:
            return
        have, entry = self._find(ids, hashes)
        if have == n:
            self._entries.move_to_end(entry)
            return  # already cached
        k = [t[row, :, :n].clone() for t in cache.k]
        v = [t[row, :, :n].clone() for t in cache.v]
        entry = Prefix(tuple(ids[:n]), k, v, hashes)
        while self._entries and self.tokens + n > self.max_tokens:
            self._evict(next(iter(self._entries)))
        self._entries[entry] = None
        self.tokens += n
        for h in hashes:
            self._index[h] = entry  # a newer entry takes over the blocks it shares with older ones

    def _evict(self, entry: Prefix) -> None:
        del self._entries[entry]
        self.tokens -= len(entry.ids)
        for h in entry.hashes:
            if self._index.get(h) is entry:
                # an older entry may share this block: it answers for it again
                other = next((e for e in reversed(self._entries) if h in e.hashes), None)
                if other is None:
                    del self._index[h]
                else:
                    self._index[h] = other

    def clear(self) -> None:
        self._entries.clear()
        self._index.clear()
        self.tokens = 0
