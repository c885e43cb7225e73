"""Summaries: each method of Muse's summarizer vs the plain one-prompt baseline, scored with ROUGE.

    .venv/bin/python bench/summarize.py                 # dev split; English on the default model, Chinese on qwen
    .venv/bin/python bench/summarize.py --lang en --model qwen2.5-0.5b --limit 10
    .venv/bin/python bench/summarize.py --split test     # reporting only: never tune on it

Data: muse/eval/data/heldout/summarize_{en,zh}_{dev,test}.jsonl ({"text", "summary"}, written by hand).
Every method gets the target `muse eval` gives (muse.eval.suites.target_length of the reference).
Rows: `raw` (summarize_raw: one prompt), `extractive` (the sentence selection alone, no model),
`sentences` (selection + each sentence rewritten + checks), `whole` (one prompt for the whole text,
kept when faithful, trimmed; else sentences). summarize.DEFAULT_METHODS records the best dev row.
ROUGE F1 × 100 via muse.eval.metrics.rouge (Chinese split into characters). Greedy, so figures repeat.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "muse" / "eval" / "data" / "heldout"
MODELS = {"en": None, "zh": "qwen2.5-0.5b"}  # None: the default model


def load(lang: str, split: str, limit: int | None) -> list[dict]:
    lines = (DATA / f"summarize_{lang}_{split}.jsonl").read_text(encoding="utf-8").splitlines()
    items = [json.loads(line) for line in lines if line.strip()]
    return items[:limit] if limit else items


def run(lang: str, split: str, limit: int | None, model_name: str | None, only=None) -> list[tuple]:
    import muse
    from muse.apps.summarize import extract, measure, summarize, summarize_raw
    from muse.eval.metrics import rouge
    from muse.eval.suites import target_length

    model = muse.load(model_name or MODELS[lang])
    items = load(lang, split, limit)
    refs = [it["summary"] for it in items]
    methods = {
        "raw": lambda it, n: summarize_raw(model, it["text"], n),
        "extractive": lambda it, n: extract(it["text"], n, lang),
        "sentences": lambda it, n: summarize(model, it["text"], n, method="sentences"),
        "whole": lambda it, n: summarize(model, it["text"], n, method="whole"),
    }
    rows = []
    for name, fn in methods.items():
        if only and name not in only:
            continue
        start = time.perf_counter()
        outs = [fn(it, target_length(it["summary"])) for it in items]
        seconds = (time.perf_counter() - start) / len(items)
        scores = rouge(outs, refs)
        over = sum(measure(o, lang) > measure(r, lang) for o, r in zip(outs, refs))
        size = sum(measure(o, lang) for o in outs) / len(outs)
        rows.append((lang, model.name, name, len(items), *(100 * scores[k] for k in ("rouge1", "rouge2", "rougeL")),
                     size, over, seconds))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lang", choices=["en", "zh", "both"], default="both")
    ap.add_argument("--limit", type=int, default=None, help="Only the first N items of each set.")
    ap.add_argument("--split", choices=["dev", "test"], default="dev")
    ap.add_argument("--model", default=None, help="Default: the default model for English, qwen2.5-0.5b for Chinese.")
    ap.add_argument("--method", action="append", help="only these rows (raw, extractive, sentences, whole)")
    args = ap.parse_args()
    rows = []
    for lang in (["en", "zh"] if args.lang == "both" else [args.lang]):
        rows.extend(run(lang, args.split, args.limit, args.model, args.method))
    head = ("lang", "model", "method", "n", "ROUGE-1", "ROUGE-2", "ROUGE-L", "avg len", "over len", "s/item")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for lang, model, method, n, r1, r2, rl, size, over, sec in rows:
        print(f"| {lang} | {model} | {method} | {n} | {r1:.1f} | {r2:.1f} | {rl:.1f} | {size:.0f} | {over} | {sec:.1f} |")
    print("\navg len: words (en) / characters (zh); over len: outputs longer than their target.")


if __name__ == "__main__":
    main()
