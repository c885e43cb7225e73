"""The sentiment probe: its fit, its shipped weights, and how `muse.apps.analysis` uses it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from muse.apps import analysis, sentiment_probe as sp
from muse.apps.analysis import classify, sentiment

needs_embedding = pytest.mark.skipif(analysis.embedding_model() is None, reason="no embedding model on this platform")


def _objective_grad(X, y, W, b, l2):
    """Gradient of mean cross-entropy + l2/2 ||W'||² at (W, b) over raw features, where W' is W in the
    standardised space fit() descends in (W' = W * std)."""
    mean, std = X.mean(0), X.std(0) + 1e-8
    Z = (X - mean) / std
    Wz = W.astype(np.float64) * std[:, None]
    logits = Z @ Wz + (b + mean @ W)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = (p - np.eye(3)[y]) / len(y)
    return Z.T @ g + l2 * Wz, g.sum(0)


def test_fit_reaches_the_minimum_a_second_optimizer_finds():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 20))
    y = rng.integers(0, 3, size=90)
    X = centres[y] + 1.5 * rng.normal(size=(90, 20))  # overlapping classes: the penalty matters
    W, b = sp.fit(X, y, l2=0.05)
    gW, gb = _objective_grad(X, y, W, b, 0.05)
    assert np.abs(gW).max() < 1e-4 and np.abs(gb).max() < 1e-4  # first-order optimality
    # the same objective minimised by torch's L-BFGS gives the same probabilities
    mean, std = X.mean(0), X.std(0) + 1e-8
    Z = torch.tensor((X - mean) / std)
    Wt = torch.zeros(20, 3, dtype=torch.float64, requires_grad=True)
    bt = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([Wt, bt], max_iter=500, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        out = torch.nn.functional.cross_entropy(Z @ Wt + bt, torch.tensor(y)) + 0.025 * (Wt ** 2).sum()
        out.backward()
        return out

    opt.step(loss)
    ref = torch.softmax(Z @ Wt + bt, -1).detach().numpy()
    ours = torch.softmax(torch.tensor(X @ W + b, dtype=torch.float64), -1).numpy()
    assert np.abs(ours - ref).max() < 1e-3


def test_the_shipped_weights_were_fitted_on_the_bundled_examples():
    meta = sp.shipped_metadata()
    assert meta["data_sha256"] == sp.data_digest(), (
        "the sentiment examples changed after the probe was fitted: run python -m muse.apps.sentiment_probe")
    assert meta["embedding_model"] == sp.MODEL_NAME and meta["labels"] == ",".join(sp.LABELS)
    items = sp.training_items()
    by_lang = {"en": 0, "zh": 0}
    for it in items:
        assert set(it) == {"text", "label"} and it["label"] in sp.LABELS and it["text"].strip()
        by_lang["zh" if any("\u4e00" <= ch <= "\u9fff" for ch in it["text"]) else "en"] += 1
    assert by_lang["en"] >= 150 and by_lang["zh"] >= 150  # both languages taught
    assert len({it["text"] for it in items}) == len(items)


def test_no_training_example_is_an_eval_item():
    from pathlib import Path
    heldout = Path(analysis.__file__).parent.parent / "eval" / "data" / "heldout"
    evals = {json.loads(line)["text"] for f in heldout.glob("sentiment_*.jsonl")
             for line in f.read_text(encoding="utf-8").splitlines() if line.strip()}
    assert evals and not evals & {it["text"] for it in sp.training_items()}


@needs_embedding
def test_refitting_gives_the_shipped_probe(tmp_path, monkeypatch):
    texts = [it["text"] for it in sp.training_items()]
    shipped = sp.predict(texts)
    report = sp.refit(tmp_path / "probe.safetensors")
    monkeypatch.setattr(sp, "WEIGHTS", tmp_path / "probe.safetensors")
    sp._weights.cache_clear()
    try:
        again = sp.predict(texts)
    finally:
        sp._weights.cache_clear()  # the next reader loads the shipped file again
    assert report["examples"] == len(texts) and report["train_accuracy"] > 0.95
    assert np.abs(again - shipped).max() < 0.02 and (again.argmax(1) == shipped.argmax(1)).all()


class _NoLanguageModel:
    """Named as the bundled bilingual model (its table entries apply); any use of it fails the test."""
    info = {"name": "qwen2.5-0.5b"}
    config = None

    def __getattr__(self, name):
        raise AssertionError(f"the probe must not run the language model (it used .{name})")


@needs_embedding
def test_the_probe_judges_both_languages_without_the_language_model():
    m = _NoLanguageModel()
    cases = {"Absolutely love it, best purchase this year.": "positive",
             "It stopped working after a week and support never replied.": "negative",
             "The shop opens at nine on Saturdays.": "neutral",
             "这家餐厅太棒了": "positive", "快递丢了，客服还推来推去，气死了。": "negative",
             "图书馆周一闭馆。": "neutral"}
    for text, label in cases.items():
        r = sentiment(m, text, method="probe")
        assert r["label"] == label, (text, r)
        assert set(r["scores"]) == set(sp.LABELS) and math.isclose(sum(r["scores"].values()), 1, abs_tol=1e-6)
    zh = classify(m, "图书馆周一闭馆。", ["积极", "消极", "中性"], task="sentiment", method="probe")
    assert next(iter(zh)) == "中性"  # the Chinese labels, answer first
    with pytest.raises(ValueError, match="sentiment only"):
        classify(m, "The striker scored twice.", ["sports", "business"], method="probe")
    with pytest.raises(ValueError, match="positive, negative, neutral only"):
        classify(m, "Great!", ["good", "bad"], task="sentiment", method="probe")


@needs_embedding
def test_auto_mixes_the_probe_into_the_models_likelihood(default_model, monkeypatch):
    text = "Oh great, the update deleted my saved games."
    m = analysis.resolve(default_model, "sentiment", "en")
    assert m.kind == "likelihood" and 0 < m.probe < 1
    alone = sentiment(default_model, text, method="likelihood")["scores"]
    probe = sentiment(default_model, text, method="probe")["scores"]
    mixed = sentiment(default_model, text)["scores"]
    expected = {k: alone[k] ** (1 - m.probe) * probe[k] ** m.probe for k in alone}
    total = sum(expected.values())
    assert mixed == pytest.approx({k: v / total for k, v in expected.items()}, abs=1e-5)
    assert next(iter(mixed)) == max(mixed, key=mixed.get)  # the answer first
    # labels the probe does not know: the table's mix falls back to the likelihood alone, no error
    own = classify(default_model, text, ["happy", "annoyed"], task="sentiment")
    assert own == pytest.approx(classify(default_model, text, ["happy", "annoyed"], task="sentiment",
                                         method="likelihood"), abs=1e-6)
    # without the embedding model, auto is the language model alone
    monkeypatch.setattr(analysis, "embedding_model", lambda: None)
    assert analysis.resolve(default_model, "sentiment", "en").probe == 0
    assert sentiment(default_model, text)["scores"] == pytest.approx(alone, abs=1e-6)


@needs_embedding
def test_chinese_auto_mixes_the_probe_into_the_embedding_without_the_language_model():
    m, text = _NoLanguageModel(), "酒店位置很方便，就是早餐一般。"
    method = analysis.resolve(m, "sentiment", "zh")
    assert method.kind == "embedding" and 0 < method.probe < 1
    near = sentiment(m, text, method="embedding")["scores"]
    probe = sentiment(m, text, method="probe")["scores"]
    expected = {k: near[k] ** (1 - method.probe) * probe[k] ** method.probe for k in near}
    total = sum(expected.values())
    assert sentiment(m, text)["scores"] == pytest.approx({k: v / total for k, v in expected.items()}, abs=1e-5)


def test_a_probe_weight_outside_likelihood_and_embedding_is_refused():
    with pytest.raises(ValueError, match="Method.probe"):
        analysis.Method("constrained", "chat", probe=0.3)
    with pytest.raises(ValueError, match="Method.probe"):
        analysis.Method("probe", probe=0.3)
    with pytest.raises(ValueError, match="Method.probe"):
        analysis.Method("likelihood", probe=1.5)
