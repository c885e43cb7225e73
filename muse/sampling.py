"""What to generate: `SamplingParams` and the `GenerationChunk` a stream yields.

Torch-free, so the CLI can build and check parameters without importing the model code;
`muse.generation` re-exports both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

TRUNCATE_POLICIES = (None, "left")
CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_TOP_LOGPROBS = 20  # OpenAI's own limit
MAX_NEW_TOKENS = 32768  # the longest context of any supported model; more could never be generated


@dataclass(frozen=True)
class Range:
    """The allowed values of one numeric sampling option. `SamplingParams` checks against it and the
    server's request schemas take their bounds from it (`bounds()`), so the two cannot disagree."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # (lo, … instead of [lo, …
    hi_open: bool = False
    integer: bool = False

    def ok(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def describe(self) -> str:
        kind = "an integer " if self.integer else ""
        if self.hi is None or self.hi >= 2**53:  # "≥ 0", not "in [0, 9.22337e+18]"
            return f"{kind}{'>' if self.lo_open else '≥'} {self.lo:g}"
        return f"{kind}in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"

    def bounds(self) -> dict[str, float]:
        """As pydantic `Field` keywords: ge/gt/le/lt."""
        out = {}
        if self.lo is not None:
            out["gt" if self.lo_open else "ge"] = self.lo
        if self.hi is not None:
            out["lt" if self.hi_open else "le"] = self.hi
        return out


# The one home of every numeric sampling range.
RANGES = {
    "max_new_tokens": Range(1, MAX_NEW_TOKENS, integer=True),
    "temperature": Range(0.0, 2.0),  # OpenAI's range; above 2 a small model's output is noise
    "top_k": Range(0, integer=True),
    "top_p": Range(0.0, 1.0, lo_open=True),
    "min_p": Range(0.0, 1.0, hi_open=True),
    "repetition_penalty": Range(0.01, 10.0),
    "presence_penalty": Range(-2.0, 2.0),
    "frequency_penalty": Range(-2.0, 2.0),
    "num_beams": Range(1, 64, integer=True),
    "length_penalty": Range(-10.0, 10.0),
    "seed": Range(0, 2**63 - 1, integer=True),
    "logprobs": Range(0, MAX_TOP_LOGPROBS, integer=True),
    "prompt_lookup": Range(0, 64, integer=True),
}
LOGIT_BIAS = Range(-100.0, 100.0)  # each value of logit_bias (OpenAI's range)
# How llguidance compiles JSON schemas (muse.constrain, and tool arguments in muse.tools): whitespace
# between tokens is enough for pretty-printed nesting but bounded, so a model cannot stall in an endless
# run of spaces (llguidance's default is unbounded); unknown schema keywords are errors, not ignored.
JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,40}", "lenient": False}


@dataclass(frozen=True)
class Constraint:
    """What the output must match; `muse.constrain` turns it into a token mask at every step.

    >>> Constraint.json_schema({"type": "object", "properties": {"name": {"type": "string"}}})
    >>> Constraint.choice(["positive", "negative"])
    >>> Constraint.regex(r"\\d{4}-\\d{2}-\\d{2}")
    >>> Constraint.grammar('start: "yes" | "no"')      # a Lark grammar (llguidance's dialect)
    """

    kind: str
    value: object = None

    def __post_init__(self) -> None:
        ok = {
            "json_schema": isinstance(self.value, (dict, bool)),
            "json_object": self.value is None,
            "regex": isinstance(self.value, str) and bool(self.value),
            "choice": isinstance(self.value, (list, tuple)) and bool(self.value)
            and all(isinstance(c, str) and c for c in self.value),
            "grammar": isinstance(self.value, str) and bool(self.value.strip()),
        }
        if self.kind not in ok:
            raise ValueError(f"constraint kind must be one of {CONSTRAINT_KINDS}, got {self.kind!r}")
        if not ok[self.kind]:
            want = {"json_schema": "a JSON schema (a dict)", "json_object": "nothing",
                    "regex": "a non-empty regular expression", "choice": "a non-empty list of non-empty strings",
                    "grammar": "a non-empty Lark grammar"}[self.kind]
            raise ValueError(f"a {self.kind} constraint takes {want}, got {self.value!r}")

    @classmethod
    def json_schema(cls, schema: dict) -> "Constraint":
        return cls("json_schema", schema)

    @classmethod
    def json_object(cls) -> "Constraint":
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> "Constraint":
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: "list[str]") -> "Constraint":
        return cls("choice", tuple(options))

    @classmethod
    def grammar(cls, lark: str) -> "Constraint":
        return cls("grammar", lark)


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
    loop_guard: bool = True  # stop once the output repeats itself (generation.loop_tail) or nearly (generation.Echo)
    constraint: Constraint | None = None  # the output must match it (JSON schema, regex, choice, grammar)
    logit_bias: dict[int, float] | None = None  # token id → added to its logit, in [-100, 100]
    logprobs: int | None = None  # None: off; k ≥ 0: each chunk carries its token's logprob and the top k
    # Draft up to this many tokens from the text so far (prompt lookup) for the model to check in one
    # pass: the same text, greedy or seeded, faster where the output copies its prompt. 0 → off.
    prompt_lookup: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        optional = ("seed", "logprobs")  # None: off
        checks = [(name, (name in optional and getattr(self, name) is None) or rng.ok(getattr(self, name)),
                   ("None or " if name in optional else "") + rng.describe()) for name, rng in RANGES.items()]
        checks += [
            ("stop", all(isinstance(s, str) and s for s in self.stop), "a list of non-empty strings"),
            ("truncate", self.truncate in TRUNCATE_POLICIES, f"one of {TRUNCATE_POLICIES}"),
            ("loop_guard", isinstance(self.loop_guard, bool), "True or False"),
            ("constraint", self.constraint is None or isinstance(self.constraint, Constraint),
             "None or a muse.Constraint"),
            ("logit_bias", self.logit_bias is None or (isinstance(self.logit_bias, dict) and all(
                isinstance(k, int) and k >= 0 and LOGIT_BIAS.ok(v) for k, v in self.logit_bias.items())),
             f"a dict of token id (≥ 0) → bias {LOGIT_BIAS.describe()}"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


# The settings a checkpoint may recommend (its generation_config.json, GGUF `general.sampling.*`
# keys, or its publisher's model card), as `SamplingParams` fields.
RECOMMENDABLE = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def recommendation(values: dict) -> dict:
    """The usable part of a checkpoint's recommended sampling: `RECOMMENDABLE` fields with a
    number in Muse's range (a file may hold anything; what is out of range is left out)."""
    out = {}
    for key in RECOMMENDABLE:
        value = values.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = int(value) if key == "top_k" else float(value)
            if RANGES[key].ok(value):
                out[key] = value
    return out


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
    logprob: float | None = None  # with SamplingParams.logprobs: log-probability of `token` under the model
    top_logprobs: list[tuple[int, float]] | None = None  # the k most likely (token, logprob), best first
    drafted_tokens: int = 0   # prompt lookup so far: tokens drafted from the text and checked by the model
    accepted_tokens: int = 0  # … and those the model agreed with (each one a forward pass saved)
