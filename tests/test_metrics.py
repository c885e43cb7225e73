"""Metrics against sacrebleu / rouge-score themselves and against hand-worked cases."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import sacrebleu
from rouge_score.rouge_scorer import RougeScorer

from muse.eval.metrics import MixedTokenizer, bleu, chrf, classification_scores, rouge

EN_HYP = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog", "hello world"]
EN_REF = ["the cat sat on a mat", "the quick brown fox jumped over the lazy dog", "hello there world"]
ZH_HYP = ["我爱北京天安门", "今天天气很好，我们去公园散步。", "他是一名老师"]
ZH_REF = ["我爱北京天安门。", "今天天气不错，我们去公园走走吧。", "他是一位医生"]


def test_bleu_hand_worked():
    # Clipped n-gram precisions 5/6, 3/5, 2/4, 1/3, equal lengths (BP = 1): BLEU = (1/12)^(1/4).
    s = bleu(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert s.score == pytest.approx(100 * (1 / 12) ** 0.25, abs=1e-9)
    # Chinese: every character n-gram matches, 4 of 7 characters → brevity penalty exp(1 - 7/4).
    s = bleu(["我爱北京"], ["我爱北京天安门"])
    assert s.score == pytest.approx(100 * math.exp(1 - 7 / 4), abs=1e-9)
    assert "tok:zh" in s.signature


def test_bleu_and_chrf_equal_sacrebleus_own_numbers():
    assert bleu(EN_HYP, EN_REF).score == pytest.approx(sacrebleu.corpus_bleu(EN_HYP, [EN_REF]).score)
    zh = bleu(ZH_HYP, ZH_REF)
    assert zh.score == pytest.approx(sacrebleu.corpus_bleu(ZH_HYP, [ZH_REF], tokenize="zh").score)
    assert zh.score != pytest.approx(sacrebleu.corpus_bleu(ZH_HYP, [ZH_REF]).score)  # the tokenizer matters
    assert "tok:zh" in zh.signature and "tok:13a" in bleu(EN_HYP, EN_REF).signature
    assert "version:" + sacrebleu.__version__ in zh.signature
    assert chrf(ZH_HYP, ZH_REF).score == pytest.approx(sacrebleu.corpus_chrf(ZH_HYP, [ZH_REF]).score)
    assert chrf(EN_HYP, EN_REF).signature.startswith("nrefs:1")
    # Several references per hypothesis.
    refs2 = [[r, h] for r, h in zip(EN_REF, EN_HYP)]
    assert bleu(EN_HYP, refs2).score == pytest.approx(100)
    assert chrf(["abc"], ["abc"]).score == pytest.approx(100) and chrf(["abc"], ["xyz"]).score == 0


def test_rouge_splits_chinese_into_characters():
    # 我 爱 北 京 vs 我 爱 上 海: 2 of 4 unigrams, 1 of 3 bigrams, LCS 2.
    r = rouge(["我爱北京"], ["我爱上海"])
    assert r["rouge1"] == pytest.approx(0.5) and r["rouge2"] == pytest.approx(1 / 3)
    assert r["rougeL"] == pytest.approx(0.5)
    # rouge-score's default tokenizer drops CJK entirely: the reason for the mixed tokenizer.
    assert RougeScorer(["rouge1"]).score("我爱上海", "我爱北京")["rouge1"].fmeasure == 0
    assert MixedTokenizer().tokenize("GPT模型 runs, 很快!") == ["gpt", "模", "型", "run", "很", "快"]


def test_rouge_english_matches_rouge_score_and_averages_pairs():
    ref = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    want = {t: np.mean([ref.score(r, h)[t].fmeasure for h, r in zip(EN_HYP, EN_REF)])
            for t in ("rouge1", "rouge2", "rougeL")}
    assert rouge(EN_HYP, EN_REF) == pytest.approx(want)
    assert rouge(["cats running"], ["cat runs"])["rouge1"] == pytest.approx(1.0)  # Porter stemming
    assert rouge(["cats running"], ["cat runs"], use_stemmer=False)["rouge1"] == 0


def test_classification_hand_worked():
    s = classification_scores(list("aabbc"), list("abbba"))
    assert s["accuracy"] == pytest.approx(3 / 5)
    assert s["per_class"]["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert s["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert s["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert s["macro_precision"] == pytest.approx((0.5 + 2 / 3) / 3)
    assert s["macro_recall"] == pytest.approx(0.5)
    assert s["macro_f1"] == pytest.approx(1.3 / 3)


def test_classification_against_a_confusion_matrix():
    rng = random.Random(0)
    labels = ["正面", "负面", "neutral"]
    y_true = [rng.choice(labels) for _ in range(200)]
    y_pred = [t if rng.random() < 0.6 else rng.choice(labels) for t in y_true]
    # Independent reference: a confusion matrix, precision = diagonal / column sums.
    idx = {c: i for i, c in enumerate(labels)}
    cm = np.zeros((3, 3))
    for t, p in zip(y_true, y_pred):
        cm[idx[t], idx[p]] += 1
    precision, recall = np.diag(cm) / cm.sum(0), np.diag(cm) / cm.sum(1)
    f1 = 2 * precision * recall / (precision + recall)
    s = classification_scores(y_true, y_pred, labels=labels)
    assert s["accuracy"] == pytest.approx(np.trace(cm) / 200)
    assert s["macro_f1"] == pytest.approx(f1.mean())
    assert [s["per_class"][c]["precision"] for c in labels] == pytest.approx(precision.tolist())
    assert [s["per_class"][c]["recall"] for c in labels] == pytest.approx(recall.tolist())


def test_metric_input_errors():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="not single strings"):
        rouge("a b", "a b")
    with pytest.raises(ValueError, match="empty"):
        chrf([], [])
    with pytest.raises(ValueError, match="must pair up"):
        classification_scores(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="same number of references"):
        bleu(["a", "b"], [["a"], ["b", "c"]])
