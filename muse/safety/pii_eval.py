"""Precision and recall of a PII finder on the labelled sets, zh and en, per kind.

    from muse.safety.pii import find_pii
    from muse.safety.pii_eval import evaluate, load_split
    table = evaluate(find_pii, load_split("test"))
    table["zh", "phone"].exact.recall, table["all", "all"].chars.f1

Sets (muse/safety_data/pii_{dev,test}.jsonl, one {"lang", "text", "spans": [{"kind", "start", "end",
"text"}]} a line, written by hand): `dev` holds the issue's examples and what the patterns are tuned on;
`test` was written before the detector changed and is not tuned on (bench/pii.py reports both).

Two ways of counting: `exact`, a finding counts only with the gold span and kind exactly; `chars`, each
character of the text counts (a finding one character too short still gets most of its credit).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "safety_data"
SPLITS = ("dev", "test")
LANGS = ("zh", "en")


def load_split(split: str) -> list[dict]:
    """The labelled items of `split` (dev or test); each span's "text" is checked against the item's text."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    items = []
    path = DATA / f"pii_{split}.jsonl"
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        for s in item["spans"]:
            if item["text"][s["start"]:s["end"]] != s["text"]:
                raise ValueError(f"{path}:{n}: span {s} does not match the text")
        items.append(item)
    return items


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


@dataclass
class Score:
    exact: Counts = field(default_factory=Counts)   # spans
    chars: Counts = field(default_factory=Counts)   # characters
    gold: int = 0                                   # gold spans


def _add(score: Score, gold: set, pred: set) -> None:
    score.gold += len(gold)
    score.exact.tp += len(gold & pred)
    score.exact.fp += len(pred - gold)
    score.exact.fn += len(gold - pred)
    g = {(i, k) for k, a, b in gold for i in range(a, b)}
    p = {(i, k) for k, a, b in pred for i in range(a, b)}
    score.chars.tp += len(g & p)
    score.chars.fp += len(p - g)
    score.chars.fn += len(g - p)


def evaluate(find, items: list[dict], kinds=("email", "phone", "id", "card", "ip")) -> dict[tuple[str, str], Score]:
    """Scores keyed by (lang, kind), lang in zh/en/all and kind in `kinds`/all. `find(text)` returns objects
    with .kind, .start and .end (find_pii's Entity)."""
    table = {(lang, kind): Score() for lang in (*LANGS, "all") for kind in (*kinds, "all")}
    for item in items:
        gold = {(s["kind"], s["start"], s["end"]) for s in item["spans"]}
        pred = {(e.kind, e.start, e.end) for e in find(item["text"])}
        for lang in (item["lang"], "all"):
            _add(table[lang, "all"], gold, pred)
            for kind in kinds:
                _add(table[lang, kind], {g for g in gold if g[0] == kind}, {p for p in pred if p[0] == kind})
    return table


def errors(find, items: list[dict]) -> list[tuple[str, list, list]]:
    """(text, missed gold spans, wrong findings) for every item the finder does not get exactly right; spans
    as (kind, start, end, the text they cover)."""
    out = []
    for item in items:
        text = item["text"]
        gold = {(s["kind"], s["start"], s["end"]) for s in item["spans"]}
        pred = {(e.kind, e.start, e.end) for e in find(text)}
        if gold != pred:
            out.append((text, *([(k, a, b, text[a:b]) for k, a, b in sorted(x)] for x in (gold - pred, pred - gold))))
    return out
