"""Checks the held-out evaluation data in muse/eval/data/heldout/.

Pure Python, no model: every file must exist, parse, carry the required
fields, have enough dev/test items, and keep dev and test disjoint.
"""

import json
from pathlib import Path

import pytest

HELDOUT = Path(__file__).parent.parent / "muse/eval/data/heldout"

LANGS = ("en", "zh")
SPLITS = ("dev", "test")
MIN_ITEMS = {"dev": 20, "test": 30}
CLASSIFY_LABELS = ["sports", "business", "technology", "health", "politics", "entertainment"]
SENTIMENT_LABELS = {"positive", "negative", "neutral"}
WRITER_ACTIONS = {"rewrite", "polish", "shorten", "expand", "titles", "outline"}
WRITER_TONES = {"formal", "casual", None}

# task -> list of file stems (without _dev/_test)
TASKS = {
    "summarize": [f"summarize_{lang}" for lang in LANGS],
    "translate": ["translate_en_zh", "translate_zh_en"],
    "sentiment": [f"sentiment_{lang}" for lang in LANGS],
    "classify": [f"classify_{lang}" for lang in LANGS],
    "kbqa": [f"kbqa_{lang}" for lang in LANGS],
    "writer": [f"writer_{lang}" for lang in LANGS],
}
# the key that identifies an item (used for duplicate and dev/test overlap checks)
KEY = {
    "summarize": "text",
    "translate": "source",
    "sentiment": "text",
    "classify": "text",
    "kbqa": "question",
    "writer": "text",
}

EXPECTED_FILES = sorted(
    f"{stem}_{split}.jsonl" for stems in TASKS.values() for stem in stems for split in SPLITS
)
CASES = [(task, stem) for task, stems in TASKS.items() for stem in stems]


def load(name):
    path = HELDOUT / name
    assert path.is_file(), f"missing held-out file: {name}"
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            assert line.strip(), f"{name}:{n}: empty line"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:  # pragma: no cover - failure path
                pytest.fail(f"{name}:{n}: invalid JSON: {e}")
            assert isinstance(row, dict), f"{name}:{n}: not a JSON object"
            rows.append(row)
    return rows


def nonempty_str(v):
    return isinstance(v, str) and v.strip() != ""


def check_summarize(name, rows):
    for n, r in enumerate(rows, 1):
        assert set(r) == {"text", "summary"}, f"{name}:{n}: fields {sorted(r)}"
        assert nonempty_str(r["text"]) and nonempty_str(r["summary"]), f"{name}:{n}"
        assert len(r["summary"]) < len(r["text"]) / 2, f"{name}:{n}: summary too long"
    return rows


def check_translate(name, rows):
    for n, r in enumerate(rows, 1):
        assert set(r) == {"source", "reference"}, f"{name}:{n}: fields {sorted(r)}"
        assert nonempty_str(r["source"]) and nonempty_str(r["reference"]), f"{name}:{n}"
    return rows


def check_sentiment(name, rows):
    for n, r in enumerate(rows, 1):
        assert set(r) == {"text", "label"}, f"{name}:{n}: fields {sorted(r)}"
        assert nonempty_str(r["text"]), f"{name}:{n}"
        assert r["label"] in SENTIMENT_LABELS, f"{name}:{n}: bad label {r['label']!r}"
    return rows


def check_classify(name, rows):
    for n, r in enumerate(rows, 1):
        assert set(r) == {"text", "label", "labels"}, f"{name}:{n}: fields {sorted(r)}"
        assert nonempty_str(r["text"]), f"{name}:{n}"
        assert sorted(r["labels"]) == sorted(CLASSIFY_LABELS), f"{name}:{n}: labels"
        assert r["label"] in CLASSIFY_LABELS, f"{name}:{n}: bad label {r['label']!r}"
    return rows


def check_kbqa(name, rows):
    docs, questions = {}, []
    for n, r in enumerate(rows, 1):
        if "document" in r:
            assert set(r) == {"document", "text"}, f"{name}:{n}: fields {sorted(r)}"
            assert not questions, f"{name}:{n}: documents must come before questions"
            assert nonempty_str(r["document"]) and nonempty_str(r["text"]), f"{name}:{n}"
            assert r["document"] not in docs, f"{name}:{n}: duplicate document title"
            docs[r["document"]] = r["text"]
            continue
        assert {"question", "answers", "source"} <= set(r), f"{name}:{n}: fields {sorted(r)}"
        assert set(r) <= {"question", "answers", "source", "cross_lingual"}, f"{name}:{n}"
        assert nonempty_str(r["question"]), f"{name}:{n}"
        assert isinstance(r["answers"], list), f"{name}:{n}"
        assert all(nonempty_str(a) for a in r["answers"]), f"{name}:{n}"
        if r["answers"]:
            assert r["source"] in docs, f"{name}:{n}: unknown source {r['source']!r}"
            text = docs[r["source"]].lower()
            assert any(a.lower() in text for a in r["answers"]), (
                f"{name}:{n}: no answer found in {r['source']!r}"
            )
        else:
            assert r["source"] is None, f"{name}:{n}: unanswerable needs source null"
        if "cross_lingual" in r:
            assert r["cross_lingual"] is True, f"{name}:{n}"
        questions.append(r)
    assert 4 <= len(docs) <= (10 if name.endswith("_dev.jsonl") else 6), f"{name}: {len(docs)} documents"
    unanswerable = sum(1 for q in questions if not q["answers"])
    assert 0.15 <= unanswerable / len(questions) <= 0.45, f"{name}: {unanswerable} unanswerable"
    return questions, docs


def check_writer(name, rows):
    for n, r in enumerate(rows, 1):
        assert set(r) == {"action", "text", "tone", "must_keep"}, f"{name}:{n}: fields {sorted(r)}"
        assert r["action"] in WRITER_ACTIONS, f"{name}:{n}: bad action {r['action']!r}"
        assert r["tone"] in WRITER_TONES, f"{name}:{n}: bad tone {r['tone']!r}"
        assert nonempty_str(r["text"]), f"{name}:{n}"
        assert isinstance(r["must_keep"], list), f"{name}:{n}"
        for s in r["must_keep"]:
            assert nonempty_str(s) and s in r["text"], f"{name}:{n}: must_keep {s!r} not in text"
    return rows


CHECKS = {
    "summarize": check_summarize,
    "translate": check_translate,
    "sentiment": check_sentiment,
    "classify": check_classify,
    "kbqa": check_kbqa,
    "writer": check_writer,
}


def items(task, name):
    out = CHECKS[task](name, load(name))
    return out[0] if task == "kbqa" else out


def test_all_expected_files_exist():
    present = sorted(p.name for p in HELDOUT.glob("*.jsonl"))
    missing = sorted(set(EXPECTED_FILES) - set(present))
    assert not missing, f"missing held-out files: {missing}"
    assert (HELDOUT / "README.md").is_file()


@pytest.mark.parametrize("task,stem", CASES, ids=[s for _, s in CASES])
def test_split_is_valid_and_disjoint(task, stem):
    key = KEY[task]
    seen = {}
    for split in SPLITS:
        name = f"{stem}_{split}.jsonl"
        rows = items(task, name)
        assert len(rows) >= MIN_ITEMS[split], f"{name}: only {len(rows)} items"
        keys = [r[key].strip() for r in rows]
        dups = {k for k in keys if keys.count(k) > 1}
        assert not dups, f"{name}: duplicate items {sorted(dups)[:3]}"
        seen[split] = set(keys)
    overlap = seen["dev"] & seen["test"]
    assert not overlap, f"{stem}: dev and test share {sorted(overlap)[:3]}"


@pytest.mark.parametrize("lang", LANGS)
def test_kbqa_dev_and_test_use_different_documents(lang):
    _, dev_docs = check_kbqa(f"kbqa_{lang}_dev.jsonl", load(f"kbqa_{lang}_dev.jsonl"))
    _, test_docs = check_kbqa(f"kbqa_{lang}_test.jsonl", load(f"kbqa_{lang}_test.jsonl"))
    assert not set(dev_docs) & set(test_docs)
    assert not set(dev_docs.values()) & set(test_docs.values())


@pytest.mark.parametrize("lang", LANGS)
def test_classify_labels_are_all_used(lang):
    for split in SPLITS:
        name = f"classify_{lang}_{split}.jsonl"
        used = {r["label"] for r in check_classify(name, load(name))}
        assert used == set(CLASSIFY_LABELS), f"{name}: labels used {sorted(used)}"


@pytest.mark.parametrize("lang", LANGS)
def test_sentiment_labels_are_all_used(lang):
    for split in SPLITS:
        name = f"sentiment_{lang}_{split}.jsonl"
        used = {r["label"] for r in check_sentiment(name, load(name))}
        assert used == SENTIMENT_LABELS, f"{name}: labels used {sorted(used)}"
