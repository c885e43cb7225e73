"""What to generate: `SamplingParams` and the `GenerationChunk` a stream yields.

Torch-free, so the CLI can build and check parameters without importing the model code;
`muse.generation` re-exports both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

TRUNCATE_POLICIES = (None, "left")


@dataclass
class SamplingParams:
    """How to pick tokens. Every range is checked here, naming the bad parameter."""

    max_new_tokens: int = 256
    temperature: float = 0.2  # 0 → greedy (argmax)
    top_k: int = 0  # 0 → off
    top_p: float = 0.9  # 1 → off
    min_p: float = 0.0  # 0 → off
    repetition_penalty: float = 1.0  # 1 → off (HF/CTRL-style, on prompt + output)
    presence_penalty: float = 0.0  # OpenAI-style, on output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None  # same seed → same text
    stop: list[str] = field(default_factory=list)  # never emitted
    num_beams: int = 1  # > 1 → beam search (deterministic)
    length_penalty: float = 1.0  # beam score = logprob sum / generated_len ** length_penalty
    truncate: str | None = None  # None: a too-long prompt is an error; "left": drop its oldest tokens
    loop_guard: bool = True  # stop once the output repeats itself verbatim (see generation.loop_tail)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "an integer ≥ 1"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "in [0, 100]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer ≥ 0"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("min_p", 0.0 <= self.min_p < 1.0, "in [0, 1)"),
            ("repetition_penalty", 0.01 <= self.repetition_penalty <= 10.0, "in [0.01, 10]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "in [-2, 2]"),
            ("num_beams", isinstance(self.num_beams, int) and 1 <= self.num_beams <= 64, "an integer in [1, 64]"),
            ("length_penalty", -10.0 <= self.length_penalty <= 10.0, "in [-10, 10]"),
            ("seed", self.seed is None or (isinstance(self.seed, int) and self.seed >= 0), "None or an integer ≥ 0"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "a list of non-empty strings"),
            ("truncate", self.truncate in TRUNCATE_POLICIES, f"one of {TRUNCATE_POLICIES}"),
            ("loop_guard", isinstance(self.loop_guard, bool), "True or False"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


@dataclass
class GenerationChunk:
    """One step of a stream: newly completed text and where generation stands."""

    text: str
    token: int | None
    finish_reason: str | None = None  # "stop" (EOS, stop string or loop) | "length" | None
    looped: bool = False  # the loop guard ended it: the output had started repeating itself
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the server's prefix cache
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
