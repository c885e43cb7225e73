"""Classification and sentiment by likelihood, batch files, and the classify/sentiment commands."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

import muse
from muse.api import Model
from muse.apps import analysis
from muse.apps.analysis import AnalysisInputError, classify, classify_file, sentiment
from muse.apps.language import FAMILIES, LanguageError

# Labels of 1, 2 and 3+ tokens, so padding and the per-token mean both matter.
LABELS = ["sports", "science fiction", "business news"]
TEXT = "The striker scored twice in the second half and the fans sang until midnight."


def _reference_scores(model, text, labels, style, mean=True):
    """Brute force: each label appended to the prompt, the whole text run through Model.logits, the
    label's log-probabilities gathered from its log_softmax (the mean, or the total)."""
    prompt, conts = analysis.render(model, text, labels, "classify", "en", style)
    scores = {}
    for label, cont in zip(labels, conts):
        prefix = model.tokenizer.encode(prompt, add_special_tokens=style == "plain")
        full = model.tokenizer.encode(prompt + cont, add_special_tokens=style == "plain")
        assert full[:len(prefix)] == prefix
        logp = torch.log_softmax(model.logits(full), dim=-1)  # (T, V)
        ids = full[len(prefix):]
        total = sum(logp[len(prefix) - 1 + j, t].item() for j, t in enumerate(ids))
        scores[label] = total / len(ids) if mean else total
    return scores


def _softmax(scores):
    exp = {k: math.exp(v - max(scores.values())) for k, v in scores.items()}
    return {k: e / sum(exp.values()) for k, e in exp.items()}


@pytest.mark.parametrize("style", analysis.STYLES)
def test_probabilities_match_a_full_forward_pass(default_model, style):
    # generation.score (one prefill, the labels batched on a copied KV cache) against one whole
    # forward pass per label: the mean log-probability per token, as _mean_logprobs gave it.
    expected = _reference_scores(default_model, TEXT, LABELS, style)
    probs = classify(default_model, TEXT, LABELS, calibrate=False, style=style, method="likelihood")
    assert list(probs) == LABELS and math.isclose(sum(probs.values()), 1.0, abs_tol=1e-6)
    torch.testing.assert_close(torch.tensor(list(probs.values())),
                               torch.tensor(list(_softmax(expected).values())), atol=1e-4, rtol=0)


def test_calibration_divides_by_the_content_free_probabilities(default_model):
    raw = classify(default_model, TEXT, LABELS, calibrate=False, method="likelihood")
    prior = [classify(default_model, cf, LABELS, calibrate=False, method="likelihood") for cf in analysis.CONTENT_FREE]
    ratio = {k: raw[k] / (sum(p[k] for p in prior) / len(prior)) for k in LABELS}
    expected = {k: v / sum(ratio.values()) for k, v in ratio.items()}
    calibrated = classify(default_model, TEXT, LABELS, method="likelihood")
    assert math.isclose(sum(calibrated.values()), 1.0, abs_tol=1e-6)
    for k in LABELS:
        assert calibrated[k] == pytest.approx(expected[k], abs=1e-4)
    assert calibrated != pytest.approx(raw, abs=1e-3)  # calibration changed something


def test_sentiment_of_obvious_english_reviews(default_model):
    good = sentiment(default_model, "Absolutely wonderful! The best meal I have ever had, and the staff were lovely.")
    bad = sentiment(default_model, "Terrible. The food was cold, the waiter was rude and I will never go back.")
    assert good["label"] == "positive" and bad["label"] == "negative"
    for r in (good, bad):
        assert set(r["scores"]) == {"positive", "negative", "neutral"}
        assert math.isclose(sum(r["scores"].values()), 1.0, abs_tol=1e-6)
        assert r["score"] == max(r["scores"].values())


def test_bad_labels_and_languages(default_model):
    with pytest.raises(ValueError, match="at least 2 labels"):
        classify(default_model, TEXT, ["sports"])
    with pytest.raises(ValueError, match="'Sports' is given twice"):
        classify(default_model, TEXT, ["sports", "business", "Sports"])
    with pytest.raises(ValueError, match="must not be empty"):
        classify(default_model, TEXT, "sports,,business")
    with pytest.raises(ValueError, match="task must be one of"):
        classify(default_model, TEXT, LABELS, task="summarize")
    with pytest.raises(LanguageError, match="qwen2.5-0.5b"):
        sentiment(default_model, "这家餐厅的菜太难吃了，服务员态度也很差。")
    assert analysis.check_labels("体育，财经, 科技") == ["体育", "财经", "科技"]


# -- constrained generation ----------------------------------------------------------

TEXTS = [TEXT, "Shares fell after the bank reported lower profits.", "", "!!! ??? 12345"]


@pytest.mark.parametrize("labels", [LABELS, ["sport", "sports", "sports news"], ["是", "否"]])
def test_constrained_answer_is_always_one_of_the_labels(tiny, labels):
    # A random model would write anything; under Constraint.choice its greedy reply is exactly one
    # label, even where labels are prefixes of each other or need byte-level tokens.
    for text in TEXTS:
        if labels == ["是", "否"]:
            m = Model(tiny.model, tiny.tokenizer, {"name": "qwen2.5-0.5b"})  # may read Chinese
        else:
            m = tiny
        probs = classify(m, text, labels, method="constrained")
        chosen = analysis.top_label(probs, "constrained")
        assert chosen == next(iter(probs)) and chosen == analysis.choose(m, text, labels)
        assert sorted(probs) == sorted(labels) and math.isclose(sum(probs.values()), 1.0, abs_tol=1e-6)


def test_constrained_probabilities_are_each_labels_likelihood_as_the_reply(default_model):
    probs = classify(default_model, TEXT, LABELS, method="constrained")
    assert next(iter(probs)) in LABELS
    # Independently: Model.score of each label after the chat prompt, renormalised over the labels.
    prompt = default_model.chat_prompt(analysis.messages(TEXT, LABELS))
    totals = default_model.score(default_model.tokenizer.encode(prompt, add_special_tokens=False), LABELS)
    expected = _softmax(dict(zip(LABELS, totals)))
    assert probs == pytest.approx(expected, abs=1e-4)
    assert _reference_scores(default_model, TEXT, LABELS, "chat", mean=False) == pytest.approx(
        dict(zip(LABELS, totals)), abs=1e-3)
    with pytest.raises(ValueError, match="method must be one of auto, likelihood, constrained"):
        classify(default_model, TEXT, LABELS, method="vote")


def test_raw_prompt_baseline_reads_the_first_label_named(default_model, monkeypatch):
    replies = iter(["I think it is Business news, or sports.", "sports news", "No idea."])
    monkeypatch.setattr(Model, "chat", lambda self, messages, params=None, **kw: next(replies))
    labels = ["sports", "business news", "sports news"]
    assert [analysis.classify_raw(default_model, TEXT, labels) for _ in range(3)] == [
        "business news", "sports news", None]


def test_chinese_sentiment_on_the_bilingual_model(qwen):
    good = sentiment(qwen, "这家餐厅的菜好吃极了，服务也很周到，下次还来！")
    bad = sentiment(qwen, "质量太差了，用了两天就坏了，客服也不理人，非常失望。")
    # scored with 积极/消极/中性, reported under the English names
    assert bad["label"] == "negative"
    assert good["scores"]["positive"] > bad["scores"]["positive"]
    assert good["scores"]["negative"] < bad["scores"]["negative"]
    assert math.isclose(sum(good["scores"].values()), 1.0, abs_tol=1e-6)


def test_constrained_chinese_labels_on_the_bilingual_model(qwen):
    labels = ["体育", "财经", "科技"]
    probs = classify(qwen, "主队在下半场连进两球，以三比一战胜了联赛领头羊。", labels, method="constrained")
    assert next(iter(probs)) in labels and sorted(probs) == sorted(labels)
    bad = sentiment(qwen, "质量太差了，用了两天就坏了，客服也不理人，非常失望。", method="constrained")
    assert bad["label"] in ("positive", "negative", "neutral") and bad["label"] == next(iter(bad["scores"]))


def test_readme_examples_on_the_bilingual_model(qwen):
    # the default method ("auto": the table's choice for qwen2.5, found by architecture when loaded by path).
    # "The package arrived on Tuesday." is not asserted neutral: the chosen English method calls it positive.
    assert analysis.family(qwen) == "qwen2.5"
    assert sentiment(qwen, "这家餐厅太棒了")["label"] == "positive"


# -- the method table -----------------------------------------------------------------

class _Unknown:
    info = {"name": "my-finetune"}


def test_the_method_table_picks_by_family_and_language(default_model):
    assert analysis.family(default_model) == "smollm2" and analysis.family(_Unknown()) is None
    for (fam, task, lang), method in analysis.DEFAULT_METHODS.items():
        assert fam in FAMILIES.values() and task in analysis.TASKS and lang in ("en", "zh")
        if fam == "smollm2":
            assert analysis.default_method(default_model, task, lang) == method
    for task in analysis.TASKS:  # a model or language the table does not know gets the fallback
        assert analysis.default_method(_Unknown(), task, "en") == analysis.FALLBACK[task]
        assert analysis.default_method(default_model, task, "fr") == analysis.FALLBACK[task]
    # explicit settings win over the table's
    assert analysis.resolve(default_model, "sentiment", "en", "auto", calibrate=True).calibrate is True
    assert analysis.resolve(default_model, "classify", "en", "likelihood") == analysis.Method(calibrate=True)
    with pytest.raises(ValueError, match="Method.kind"):
        analysis.Method("vote")


def test_auto_runs_the_recorded_method(default_model, monkeypatch):
    calls = []
    monkeypatch.setattr(analysis, "_choose", lambda model, text, labels, *a: calls.append(text) or labels[-1])
    monkeypatch.setitem(analysis.DEFAULT_METHODS, ("smollm2", "sentiment", "en"), analysis.Method("constrained", "chat"))
    r = sentiment(default_model, "The package arrived on Tuesday.")
    assert calls == ["The package arrived on Tuesday."] and r["label"] == "neutral" == next(iter(r["scores"]))
    # a likelihood entry: no generation, and the answer is the first key (the most probable)
    monkeypatch.setitem(analysis.DEFAULT_METHODS, ("smollm2", "classify", "en"), analysis.Method(calibrate=False))
    probs = classify(default_model, TEXT, LABELS)
    assert len(calls) == 1 and analysis.top_label(probs) == max(probs, key=probs.get)
    assert probs == pytest.approx(classify(default_model, TEXT, LABELS, False, method="likelihood"), abs=1e-6)


class _Bilingual:
    """Named as the bundled bilingual model, so its family's table entries apply; it has no weights."""
    info = {"name": "qwen2.5-0.5b"}
    config = None

    def __getattr__(self, name):
        raise AssertionError(f"the embedding method must not run the language model (it used .{name})")


@pytest.mark.skipif(analysis.embedding_model() is None, reason="no embedding model on this platform")
def test_embedding_picks_the_label_nearest_the_text_and_runs_no_language_model():
    m = _Bilingual()
    assert analysis.resolve(m, "classify", "zh").kind == "embedding"
    probs = classify(m, "The striker scored twice in the cup final.", ["business", "sports", "health"])
    assert list(probs)[0] == "sports" and probs["sports"] == max(probs.values())
    assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-6)
    zh = classify(m, "央行宣布下调存款准备金率，股市应声上涨。", ["体育", "财经", "健康"])  # the user's labels, as given
    assert list(zh)[0] == "财经"
    cross = classify(m, "主队在下半场连进两球，以三比一获胜。", ["business", "sports", "health"])
    assert list(cross)[0] == "sports"  # Chinese text, English labels: one multilingual space
    assert sentiment(m, "这家餐厅太棒了", method="embedding")["label"] == "positive"  # the README's example
    bad = sentiment(m, "质量太差了，用了两天就坏了，客服也不理人，非常失望。", method="embedding")
    assert bad["label"] == "negative" and set(bad["scores"]) == {"positive", "negative", "neutral"}
    asked = classify(m, "The striker scored twice in the cup final.", ["business", "sports"], method="embedding")
    assert analysis.top_label(asked, "embedding") == "sports"


@pytest.mark.skipif(analysis.embedding_model() is None, reason="no embedding model on this platform")
def test_a_file_of_both_languages_asks_for_the_model_of_each_records_language(tmp_path):
    path = tmp_path / "reviews.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in (
        "Terrible product, it broke after two days.", "这家餐厅太棒了，下次还来！", "I love it, works great.")) + "\n",
        encoding="utf-8")
    asked = []
    n = classify_file(lambda lang: asked.append(lang) or _Bilingual(), path, tmp_path / "out.jsonl",
                      task="sentiment", method="embedding")
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert n == 3 and asked == ["en", "zh", "en"]
    assert [r["label"] for r in rows] == ["negative", "positive", "positive"]


def test_without_an_embedding_model_auto_falls_back_to_likelihood(monkeypatch):
    monkeypatch.setattr(analysis, "embedding_model", lambda: None)
    assert analysis.resolve(_Bilingual(), "classify", "zh") == analysis.LM_FALLBACK["classify"]
    assert analysis.resolve(_Bilingual(), "sentiment", "zh") == analysis.LM_FALLBACK["sentiment"]
    assert analysis.resolve(_Bilingual(), "sentiment", "en") == replace(
        analysis.DEFAULT_METHODS["qwen2.5", "sentiment", "en"], probe=0.0)  # the likelihood part alone
    for task in analysis.TASKS:  # a model the table does not know
        assert analysis.resolve(_Unknown(), task, "en") == analysis.LM_FALLBACK[task]


# -- files --------------------------------------------------------------------------

ROWS = [{"id": "1", "text": "The goalkeeper saved a penalty in the final minute."},
        {"id": "2", "text": "Shares fell after the bank reported lower profits."}]


def _write_csv(path, rows, fields=("id", "text")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(fields))
        w.writeheader()
        w.writerows(rows)


def test_csv_to_jsonl_and_back_keeps_rows_and_adds_results(default_model, tmp_path):
    labels = ["sports", "business"]
    _write_csv(tmp_path / "in.csv", ROWS)
    assert classify_file(default_model, tmp_path / "in.csv", tmp_path / "out.jsonl", labels=labels) == 2
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    for row, res in zip(ROWS, out):
        assert {k: res[k] for k in row} == row  # the input fields, unchanged
        probs = classify(default_model, row["text"], labels)  # both "auto": the table's method
        assert res["label"] == analysis.top_label(probs)
        assert res["p_sports"] == pytest.approx(probs["sports"], abs=1e-5)
        assert res["score"] == pytest.approx(probs[res["label"]], abs=1e-5)

    # JSONL in, CSV out, with a custom text field, for sentiment
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"n": i, "review": r["text"]}) + "\n\n"
                                               for i, r in enumerate(ROWS)))
    assert classify_file(default_model, tmp_path / "in.jsonl", tmp_path / "out.csv", task="sentiment",
                         column="review") == 2
    with open(tmp_path / "out.csv", newline="", encoding="utf-8") as f:
        got = list(csv.DictReader(f))
    assert [r["review"] for r in got] == [r["text"] for r in ROWS] and [r["n"] for r in got] == ["0", "1"]
    assert list(got[0]) == ["n", "review", "label", "score", "p_positive", "p_negative", "p_neutral"]
    expected = sentiment(default_model, ROWS[0]["text"])
    assert got[0]["label"] == expected["label"]
    assert float(got[0]["p_neutral"]) == pytest.approx(expected["scores"]["neutral"], abs=1e-5)


@pytest.mark.parametrize("name,content,message", [
    ("empty.csv", "", "has no records"),
    ("header.csv", "id,text\n", "has no records"),
    ("nocol.csv", "id,body\n1,hello\n", "line 2 has no 'text' field \\(fields: id, body\\)"),
    ("bad.jsonl", '{"text": "fine"}\n{"text": oops}\n', "bad.jsonl line 2 is not valid JSON"),
    ("list.jsonl", '{"text": "fine"}\n["text"]\n', "line 2 must be a JSON object"),
    ("num.jsonl", '{"text": 42}\n', "line 1: 'text' must be text"),
    ("clash.jsonl", '{"text": "fine", "label": "gold"}\n', "already has the field\\(s\\) label"),
    ("data.txt", "text\nhello\n", "use a .csv or .jsonl file"),
])
def test_bad_batch_files_are_named_and_nothing_is_written(default_model, tmp_path, name, content, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(AnalysisInputError, match=message):
        classify_file(default_model, tmp_path / name, tmp_path / "out.jsonl", labels=["a", "b"])
    assert not (tmp_path / "out.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary file left either


# -- the commands ---------------------------------------------------------------------

def test_classify_command_matches_the_api(default_model, monkeypatch):
    from muse.cli import app

    monkeypatch.setattr(muse, "load", lambda *a, **k: default_model)  # one model: its priors are cached
    r = CliRunner().invoke(app, ["classify", TEXT, "--labels", ",".join(LABELS), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    probs = classify(default_model, TEXT, LABELS, method="likelihood")  # the command's default
    assert out["scores"] == pytest.approx(probs, abs=1e-6) and out["label"] == max(probs, key=probs.get)
    table = CliRunner().invoke(app, ["classify", TEXT, "-l", ",".join(LABELS)])
    assert table.exit_code == 0 and all(label in table.stdout for label in LABELS)


def test_sentiment_command_on_a_file(default_model, tmp_path, monkeypatch):
    from muse.cli import app

    monkeypatch.setattr(muse, "load", lambda *a, **k: default_model)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    r = CliRunner().invoke(app, ["sentiment", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 0, r.output
    out = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [o["label"] for o in out] == [sentiment(default_model, row["text"], method="likelihood")["label"]
                                         for row in ROWS]


def test_constrained_method_on_files_and_the_command(tiny, tmp_path, monkeypatch):
    from muse.cli import app

    labels = ["sports", "business"]
    _write_csv(tmp_path / "in.csv", ROWS)
    assert classify_file(tiny, tmp_path / "in.csv", tmp_path / "out.jsonl", labels=labels, method="constrained") == 2
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    for row, res in zip(ROWS, out):
        probs = classify(tiny, row["text"], labels, method="constrained")
        assert res["label"] == next(iter(probs)) and res["p_business"] == pytest.approx(probs["business"], abs=1e-5)

    monkeypatch.setattr(muse, "load", lambda *a, **k: tiny)
    r = CliRunner().invoke(app, ["classify", TEXT, "-l", ",".join(LABELS), "--method", "constrained", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["label"] == analysis.choose(tiny, TEXT, LABELS)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    r = CliRunner().invoke(app, ["sentiment", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o.jsonl"),
                                 "--method", "constrained"])
    assert r.exit_code == 0, r.output
    got = [json.loads(line)["label"] for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert got == [sentiment(tiny, row["text"], method="constrained")["label"] for row in ROWS]


@pytest.mark.parametrize("args,message", [
    (["classify", "hello", "--labels", "only"], "at least 2 labels"),
    (["classify", "hello", "--labels", "a,b,a"], "'a' is given twice"),
    (["classify", "--labels", "a,b"], "give the TEXT to score"),
    (["classify", "hi", "-i", "x.csv", "-o", "y.csv", "--labels", "a,b"], "either TEXT or --input"),
    (["sentiment", "-i", "x.csv"], "--input needs --output"),
    (["sentiment", "fine", "--method", "vote"], "method must be one of auto, likelihood, constrained"),
    (["sentiment", "-i", "missing.csv", "-o", "y.csv"], "missing.csv does not exist"),
])
def test_commands_report_bad_input_in_one_line(args, message, tmp_path, monkeypatch):
    from muse.cli import app

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, args)
    assert r.exit_code in (1, 2) and "Traceback" not in r.output
    assert message in r.stderr
