"""Translation prompts per direction: Muse's translate vs raw prompting, chrF and numbers kept.

    .venv/bin/python bench/translate_prompts.py                  # dev, both directions, qwen2.5-0.5b
    .venv/bin/python bench/translate_prompts.py --dir en_zh --limit 5 --show
    .venv/bin/python bench/translate_prompts.py --split test     # final report only: never tune on it

Data: muse/eval/data/heldout/translate_{en_zh,zh_en}_{dev,test}.jsonl ({"source", "reference"}).
Rows: `raw` ("Translate into Chinese: <text>" as one chat message, greedy), `muse` (writer.translate as
shipped: writer.checked_write with the translate prompt of writer.ACTIONS, its default beams, its
repairs and retries), `muse greedy` and `+beam4` (num_beams 1 and 4), and the candidate prompts
below put in its place.
chrF (sacrebleu, Chinese output scored per character) and numbers kept: of the numbers written in
digits in the reference (30万 counted as 300000, 3,500 as 3500), the share the output has too.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from muse.text import numbers

DATA = Path(__file__).resolve().parent.parent / "muse" / "eval" / "data" / "heldout"
MODEL = "qwen2.5-0.5b"
TARGET = {"en_zh": "zh", "zh_en": "en"}
RAW = {"zh": "Translate into Chinese: {text}", "en": "Translate into English: {text}"}

# Candidate instructions (the Action's {to} filled in by the writer): name → (for → en, for → zh).
CANDIDATES = {
    "v1 keep numbers": (
        "Translate the text below into {to}, sentence by sentence. Keep every number, time, date and "
        "amount as written, in the same currency (元 is yuan, never dollars; 万 is ten thousand). Keep places "
        "and directions (from where to where) as they are. Add nothing that is not in the text. Reply with "
        "the {to} translation only.",
        "把下面的文字逐句翻译成{to}。数字、时间、日期和金额照原文保留，货币不换算（dollars 译作美元，yuan 译作元）。"
        "地名和方向（从哪里到哪里）照原文，不添加原文没有的内容。只输出译文，不夹外文单词。"),
    # v1 primed the currencies it named (300,000 yuan → 300,000美元): name none, and ask in English
    "v2 plain": (
        "Translate the text below into {to}, sentence by sentence. Keep every number, time and amount "
        "exactly as written, in the same currency. Add nothing that is not in the text. Reply with the "
        "{to} translation only.",
        "Translate the text below into {to}. Keep every number and amount exactly as written; do not convert "
        "them. Add nothing. Reply with the {to} translation only."),
    # the raw prompt's own words, with the app's cleaning, pieces and checks around it
    "v3 raw words": ("Translate this into {to}:", "Translate this into {to}:"),
}


def load(direction: str, split: str, limit: int | None) -> list[dict]:
    lines = (DATA / f"translate_{direction}_{split}.jsonl").read_text(encoding="utf-8").splitlines()
    items = [json.loads(line) for line in lines if line.strip()]
    return items[:limit] if limit else items


def kept(outputs: list[str], refs: list[str]) -> float:
    # The reference's numbers by value (muse.text.numbers: 30万 = 300,000), found in the output in any form.
    want = [set(numbers(r)) for r in refs]
    total = sum(len(w) for w in want)
    hit = sum(len(w & set(numbers(o, generous=True))) for w, o in zip(want, outputs))
    return 100 * hit / total if total else 100.0


def chrf(outputs: list[str], refs: list[str], target: str) -> float:
    from sacrebleu.metrics import CHRF

    if target == "zh":  # characters as the units: chrF on Chinese without spaces scores whole runs
        outputs, refs = [" ".join(o.replace(" ", "")) for o in outputs], [" ".join(r) for r in refs]
    return CHRF().corpus_score(outputs, [refs]).score


def run(direction: str, split: str, limit: int | None, show: bool, rows: list[str] | None) -> dict:
    import dataclasses

    import muse
    from muse.apps import writer
    from muse.sampling import SamplingParams

    model = muse.load(MODEL)
    target = TARGET[direction]
    items = load(direction, split, limit)
    refs = [it["reference"] for it in items]
    shipped = writer.ACTIONS["translate"]
    beam = writer.default_params(model).replace(num_beams=4)
    greedy = writer.default_params(model).replace(num_beams=1)
    raw_params = SamplingParams(temperature=0.0, max_new_tokens=256)

    def app(prompt=None, params=None):
        def go(src):
            if prompt is not None:
                en, zh = prompt
                writer.ACTIONS["translate"] = dataclasses.replace(shipped, en=en, zh=zh)
            try:
                return writer.checked_write(model, "translate", src, to=target, params=params).output
            finally:
                writer.ACTIONS["translate"] = shipped
        return go

    methods = {"raw": lambda src: model.chat([{"role": "user", "content": RAW[target].format(text=src)}], raw_params),
               "muse": app(), "muse greedy": app(params=greedy), "muse +beam4": app(params=beam)}
    for name, prompt in CANDIDATES.items():
        methods[name] = app(prompt)
        methods[f"{name} +beam4"] = app(prompt, beam)
    out = {}
    for name, fn in methods.items():
        if rows and name not in rows:
            continue
        t = time.perf_counter()
        outs = [fn(it["source"]).strip() for it in items]
        out[name] = (chrf(outs, refs, target), kept(outs, refs))
        print(f"  {direction} {name:24s} chrF {out[name][0]:5.1f}  numbers {out[name][1]:5.1f}%  "
              f"({time.perf_counter() - t:.0f}s)", flush=True)
        if show:
            for it, o in zip(items, outs):
                print(f"      {it['source']}\n    → {o}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", choices=list(TARGET), action="append")
    ap.add_argument("--split", choices=("dev", "test"), default="dev")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--row", action="append", help="only these rows (raw, muse, a candidate's name)")
    ap.add_argument("--show", action="store_true", help="print every output")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    table = {d: run(d, a.split, a.limit, a.show, a.row) for d in a.dir or list(TARGET)}
    print(f"\n{a.split}: chrF / numbers kept %\n| method | " + " | ".join(table) + " |")
    print("|---|" + "---|" * len(table))
    for r in dict.fromkeys(r for col in table.values() for r in col):
        print(f"| {r} | " + " | ".join(f"{table[d][r][0]:.1f} / {table[d][r][1]:.0f}" if r in table[d] else ""
                                      for d in table) + " |")


if __name__ == "__main__":
    main()
