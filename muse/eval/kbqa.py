"""Scoring knowledge-base QA, ALCE-style: answers, refusals and citations.

    docs, questions = load("muse/eval/data/heldout/kbqa_en_dev.jsonl")
    scores = score(questions, [Prediction(text, found, cited_titles), ...])

* answer accuracy: answerable questions (`answers` non-empty) whose reply is not a refusal and
  contains an acceptable answer string (case-insensitive, whitespace folded);
* refusal accuracy: unanswerable questions (`answers: []`) answered with a refusal — `found` False
  when the method says so, else the reply read by `muse.apps.grounding.refuses`;
* citation precision: of the passages cited in replies to answerable questions, the share from the
  gold source document; citation recall: of the answerable questions answered (not refused), the share
  whose citations include the gold source. None for a method that does not cite (raw prompting).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from muse.apps.grounding import refuses


@dataclass
class Prediction:
    text: str
    found: bool | None = None       # None: decide from the text
    cited: list[str] | None = None  # titles of the cited documents; None when the method does not cite


def load(path: "str | Path") -> tuple[list[dict], list[dict]]:
    """(documents {"document", "text"}, questions {"question", "answers", "source", …}) of a kbqa file."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if "document" in r], [r for r in rows if "question" in r]


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def refused(p: Prediction) -> bool:
    return (not p.found) if p.found is not None else refuses(p.text)


def correct(q: dict, p: Prediction) -> bool:
    """Whether the prediction is right for the question (an answer, or a refusal when there is none)."""
    if not q["answers"]:
        return refused(p)
    return not refused(p) and any(_normal(a) in _normal(p.text) for a in q["answers"])


def score(questions: list[dict], predictions: list[Prediction]) -> dict:
    """Answer and refusal accuracy, overall accuracy, citation precision and recall (see the module)."""
    if len(questions) != len(predictions):
        raise ValueError(f"{len(questions)} questions but {len(predictions)} predictions")
    answerable = [(q, p) for q, p in zip(questions, predictions) if q["answers"]]
    unanswerable = [(q, p) for q, p in zip(questions, predictions) if not q["answers"]]
    cites = [(q, p) for q, p in answerable if p.cited is not None and not refused(p)]
    all_cited = [t == q["source"] for q, p in cites for t in p.cited]
    ratio = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {
        "answer_accuracy": ratio([correct(q, p) for q, p in answerable]),
        "refusal_accuracy": ratio([correct(q, p) for q, p in unanswerable]),
        "accuracy": ratio([correct(q, p) for q, p in zip(questions, predictions)]),
        "citation_precision": ratio(all_cited) if any(p.cited is not None for _, p in answerable) else None,
        "citation_recall": ratio([q["source"] in p.cited for q, p in cites]) if cites else None,
        "inline_citation": ratio([bool(re.search(r"\[\d+\]", p.text)) for q, p in cites]) if cites else None,
        "n_answerable": len(answerable), "n_unanswerable": len(unanswerable),
    }
