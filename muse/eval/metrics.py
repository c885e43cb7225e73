"""Text and classification metrics for Chinese and English.

    bleu(hyps, refs)       BLEU via sacrebleu; its `zh` tokenizer when the references are Chinese
    chrf(hyps, refs)       chrF via sacrebleu (character n-grams: no tokenizer needed)
    rouge(hyps, refs)      ROUGE-1/2/L F1 via rouge-score, with a tokenizer that splits Chinese into
                           characters and keeps English words (rouge-score's own scores CJK as 0)
    classification_scores(y_true, y_pred)   accuracy, macro and per-class precision/recall/F1

`refs` is one reference string per hypothesis, or a list of references per hypothesis.
BLEU and chrF are on sacrebleu's 0-100 scale and carry its signature string (which tokenizer,
smoothing, version), so a reported number can be reproduced; ROUGE and the classification
scores are fractions in [0, 1].
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from muse.text import HAN, language

# One CJK character (Han, kana, Hangul syllable), or a run of anything else.
_CJK = HAN + r"\u3040-\u30ff\uac00-\ud7af"
_PIECES = re.compile(f"[{_CJK}]|[^{_CJK}]+")
_CJK_RE = re.compile(f"[{_CJK}]")


@dataclass
class Score:
    """A corpus-level score with sacrebleu's reproducibility signature."""

    score: float
    signature: str
    detail: str  # sacrebleu's one-line summary, e.g. "BLEU = 36.2 70.0/45.1/... (BP = ...)"

    def __float__(self) -> float:
        return self.score


def _check_pairs(hypotheses, references) -> list[list[str]]:
    """References as a list of lists (one list per hypothesis), after checking the shapes."""
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise ValueError("hypotheses and references must be lists of strings, not single strings")
    if len(hypotheses) != len(references):
        raise ValueError(f"got {len(hypotheses)} hypotheses but {len(references)} references: give one "
                         "reference (or one list of references) per hypothesis")
    if not hypotheses:
        raise ValueError("nothing to score: the lists of hypotheses and references are empty")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not r or not all(isinstance(x, str) for x in r) for r in refs) or not all(
            isinstance(h, str) for h in hypotheses):
        raise ValueError("every hypothesis must be a string and every reference a string or non-empty list of strings")
    return refs


def _streams(refs: list[list[str]]) -> list[list[str]]:
    """sacrebleu wants reference streams: streams[k][i] = k-th reference of hypothesis i."""
    most = max(len(r) for r in refs)
    if any(len(r) != most for r in refs):
        raise ValueError("sacrebleu needs the same number of references for every hypothesis")
    return [[r[k] for r in refs] for k in range(most)]


def bleu_tokenizer(references: list[list[str]]) -> str:
    """sacrebleu's `zh` tokenizer for Chinese references, its default `13a` otherwise."""
    return "zh" if language(" ".join(r[0] for r in references)) == "zh" else "13a"


def bleu(hypotheses: Sequence[str], references: Sequence, tokenize: str | None = None) -> Score:
    """Corpus BLEU (0-100). `tokenize`: a sacrebleu tokenizer name; default picks by language."""
    from sacrebleu.metrics import BLEU

    refs = _check_pairs(hypotheses, references)
    metric = BLEU(tokenize=tokenize or bleu_tokenizer(refs))
    s = metric.corpus_score(list(hypotheses), _streams(refs))
    return Score(s.score, str(metric.get_signature()), str(s))


def chrf(hypotheses: Sequence[str], references: Sequence) -> Score:
    """Corpus chrF (0-100): character n-gram F-score, language-neutral."""
    from sacrebleu.metrics import CHRF

    refs = _check_pairs(hypotheses, references)
    metric = CHRF()
    s = metric.corpus_score(list(hypotheses), _streams(refs))
    return Score(s.score, str(metric.get_signature()), str(s))


class MixedTokenizer:
    """rouge-score tokenizer: each CJK character is a token; other text goes through rouge-score's
    own tokenizer (lowercase, alphanumeric words, optional Porter stemming)."""

    def __init__(self, use_stemmer: bool = True):
        from rouge_score.tokenizers import DefaultTokenizer

        self._words = DefaultTokenizer(use_stemmer=use_stemmer)

    def tokenize(self, text: str) -> list[str]:
        out: list[str] = []
        for piece in _PIECES.findall(text):
            out.extend([piece] if _CJK_RE.fullmatch(piece) else self._words.tokenize(piece))
        return out


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(hypotheses: Sequence[str], references: Sequence, use_stemmer: bool = True) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 in [0, 1] over the pairs (with several references, the best one counts)."""
    from rouge_score.rouge_scorer import RougeScorer

    refs = _check_pairs(hypotheses, references)
    scorer = RougeScorer(list(ROUGE_TYPES), tokenizer=MixedTokenizer(use_stemmer))
    totals = Counter()
    for hyp, rs in zip(hypotheses, refs):
        scores = scorer.score_multi(rs, hyp)
        for t in ROUGE_TYPES:
            totals[t] += scores[t].fmeasure
    return {t: totals[t] / len(refs) for t in ROUGE_TYPES}


def classification_scores(y_true: Sequence, y_pred: Sequence, labels: Sequence | None = None) -> dict:
    """Accuracy, macro precision/recall/F1 and per-class scores, all in [0, 1].

    `labels` (default: every label seen in y_true or y_pred, sorted) are the classes averaged
    over; as in scikit-learn, a class never predicted has precision 0, one never true recall 0.
    """
    y_true, y_pred = list(y_true), list(y_pred)
    if len(y_true) != len(y_pred):
        raise ValueError(f"got {len(y_true)} true labels but {len(y_pred)} predictions: they must pair up")
    if not y_true:
        raise ValueError("nothing to score: no labels given")
    labels = sorted(set(y_true) | set(y_pred), key=str) if labels is None else list(labels)
    per_class = {}
    for c in labels:
        tp = sum(t == c and p == c for t, p in zip(y_true, y_pred))
        predicted, actual = sum(p == c for p in y_pred), sum(t == c for t in y_true)
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[c] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    mean = lambda key: sum(s[key] for s in per_class.values()) / len(per_class)  # noqa: E731
    return {
        "accuracy": sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true),
        "macro_precision": mean("precision"),
        "macro_recall": mean("recall"),
        "macro_f1": mean("f1"),
        "per_class": per_class,
    }
