"""Sentiment and topic classification: every method of muse.apps.analysis, per model and language.

    .venv/bin/python bench/analysis_methods.py                    # dev sets, both bundled models
    .venv/bin/python bench/analysis_methods.py --model qwen2.5-0.5b --task sentiment --lang zh
    .venv/bin/python bench/analysis_methods.py --split test       # final report only: never tune on it

Data: muse/eval/data/heldout/{sentiment,classify}_{en,zh}_{dev,test}.jsonl. Accuracy × 100 of each
candidate (rows) per model, task and language (columns); the raw rows count a reply that names no
label as wrong. Greedy decoding and likelihoods, so the figures repeat. The table
muse.apps.analysis.DEFAULT_METHODS records the best dev row of each column ("auto" runs it).

Candidates: likelihood on the plain or chat prompt, zero-shot (0) or with the fixed worked examples
(shots; sentiment only, the topic labels are the user's), ± contextual calibration (cal); constrained
choice in the chat (zero-shot or with shots); raw prompting, the same chat answered freely; the label
nearest the text in the embedding model (embedding); the sentiment probe over that embedding (probe).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "muse" / "eval" / "data" / "heldout"
# which languages each bundled model is measured on (the English-only model reads no Chinese)
MODELS = {"smollm2-135m": ("en",), "qwen2.5-0.5b": ("en", "zh")}
SHOTS = {"sentiment": (False, True), "classify": (False,)}


def load(task: str, lang: str, split: str, limit: int | None) -> list[dict]:
    lines = (DATA / f"{task}_{lang}_{split}.jsonl").read_text(encoding="utf-8").splitlines()
    items = [json.loads(line) for line in lines if line.strip()]
    return items[:limit] if limit else items


def candidates(task: str) -> dict[str, tuple]:
    """name → ("likelihood" | "constrained" | "raw", style, calibrate, shots)."""
    out = {}
    for shots in SHOTS[task]:
        tag = "shots" if shots else "0"
        for style in ("plain", "chat"):
            for cal in (False, True):
                out[f"likelihood {style} {tag}{' cal' if cal else ''}"] = ("likelihood", style, cal, shots)
        out[f"likelihood chat {tag} total"] = ("likelihood", "chat", False, shots, True)
        out[f"constrained {tag}"] = ("constrained", "chat", False, shots)
        out[f"raw {tag}"] = ("raw", "chat", False, shots)
    out["embedding"] = ("embedding", "plain", False, False)  # no language model runs
    if task == "sentiment":
        out["probe"] = ("probe", "plain", False, False)  # nor here: muse.apps.sentiment_probe
    return out


def predict(model, task: str, text: str, labels: list[str], spec: tuple, lang: str) -> str | None:
    from muse.apps import analysis as A

    kind, style, cal, shots, total = (*spec, False)[:5]
    if task == "sentiment":
        if kind == "raw":
            return A.sentiment_raw(model, text, shots=shots)
        return A.sentiment(model, text, cal, style, method=kind, shots=shots, total=total)["label"]
    if kind == "raw":
        return A.classify_raw(model, text, labels, shots=shots)
    if kind == "constrained":
        return A.choose(model, text, labels, shots=shots)
    return A.top_label(A.classify(model, text, labels, cal, style=style, method=kind, shots=shots, total=total), kind)


def auto(model, task: str, text: str, labels: list[str]) -> str:
    from muse.apps import analysis as A

    if task == "sentiment":
        return A.sentiment(model, text)["label"]
    return A.top_label(A.classify(model, text, labels))


def run(name: str, task: str, lang: str, split: str, limit: int | None, only_auto: bool,
        pick: list[str] | None = None) -> dict[str, float]:
    import muse

    model = muse.load(name)
    items = load(task, lang, split, limit)
    labels = sorted({it["label"] for it in items}) if task == "sentiment" else items[0]["labels"]
    rows = {"auto (the default)": None} if only_auto else {**candidates(task), "auto (the default)": None}
    if pick:
        rows = {k: v for k, v in rows.items() if k in pick}
    out = {}
    for row, spec in rows.items():
        t = time.perf_counter()
        hits = 0
        for it in items:
            got = auto(model, task, it["text"], labels) if spec is None else predict(
                model, task, it["text"], labels, spec, lang)
            hits += got == it["label"]
        out[row] = 100 * hits / len(items)
        print(f"  {name:13s} {task}-{lang} {row:28s} {out[row]:5.1f}  ({time.perf_counter() - t:.0f}s)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=list(MODELS), action="append")
    ap.add_argument("--task", choices=list(SHOTS), action="append")
    ap.add_argument("--lang", choices=("en", "zh"), action="append")
    ap.add_argument("--split", choices=("dev", "test"), default="dev")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--auto-only", action="store_true", help="only the default (the table's choice)")
    ap.add_argument("--row", action="append", help="only these rows (e.g. 'raw shots')")
    ap.add_argument("--json", type=Path, help="also write the table here")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    table = {}
    for name in a.model or list(MODELS):
        for task in a.task or list(SHOTS):
            for lang in MODELS[name]:
                if a.lang and lang not in a.lang:
                    continue
                table[f"{name} {task}-{lang}"] = run(name, task, lang, a.split, a.limit, a.auto_only, a.row)
    cols = list(table)
    rows = list(dict.fromkeys(r for col in table.values() for r in col))
    print(f"\naccuracy ({a.split}), %\n| method | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{table[c][r]:.1f}" if r in table[c] else "" for c in cols]
        print(f"| {r} | " + " | ".join(cells) + " |")
    if a.json:
        a.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
