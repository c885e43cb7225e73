"""Prompt lookup decoding: the apps with and without it, side by side in one process.

    .venv/bin/python bench/prompt_lookup.py                    # the default model, English
    .venv/bin/python bench/prompt_lookup.py --model qwen2.5-0.5b --runs 3

Greedy generation drafts up to `SamplingParams.prompt_lookup` tokens from the text so far and the
model checks a draft in one forward pass (`muse.generation.PromptLookup`), drafting only as far as
pays for the wider pass (`PassCost`: the pass costs the run measured are printed last). Each task
runs as the app runs it (writer rewrite / polish / summarize, and ask over one document), alternating
lookup off and on `--runs` times; the table gives median wall seconds, the speed-up, whether the
text is the same, and the share of drafted tokens the model accepted. The text is about 400 words,
two summarize dev items (muse/eval/data/heldout/summarize_en_dev.jsonl, or the zh file for Chinese).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import muse
import muse.api
from muse import generation
from muse.sampling import SamplingParams

DATA = Path(__file__).resolve().parent.parent / "muse" / "eval" / "data" / "heldout"
_plain_stream = generation.stream_generate
ON = SamplingParams().prompt_lookup  # the default draft size: "lookup on"
LOOKUP = {"draft": ON, "drafted": 0, "accepted": 0}


def _stream(model, tokenizer, prompt, params=None, **kwargs):
    """stream_generate with prompt lookup set by the bench (the apps pass their own params)."""
    p = (params or SamplingParams()).replace(**kwargs).replace(prompt_lookup=LOOKUP["draft"])
    last = None
    for last in _plain_stream(model, tokenizer, prompt, p):
        yield last
    if last is not None:
        LOOKUP["drafted"] += last.drafted_tokens
        LOOKUP["accepted"] += last.accepted_tokens


def text_of(lang: str, words: int = 400) -> str:
    """About `words` words (English) or 2.5 × that many characters (Chinese) of dev summarize texts."""
    items = [json.loads(line)["text"] for line in (DATA / f"summarize_{lang}_dev.jsonl").open(encoding="utf-8")]
    out, size = [], 0
    for t in items:
        out.append(t)
        size += len(t.split()) if lang == "en" else len(t) / 2.5
        if size >= words:
            break
    return "\n\n".join(out)


def tasks(model, lang: str, folder: Path):
    from muse.apps.kb import KnowledgeBase, ask
    from muse.apps.writer import write
    from muse.store import Store

    text = text_of(lang)
    kb = KnowledgeBase(Store(folder / "kb.db"), embeddings="none")
    kb.add_text("notes", text)
    question = {"en": "When does the new parking garage open and what does it cost?",
                "zh": "立体停车楼什么时候启用，收费多少？"}[lang]
    return {
        "rewrite": lambda: write(model, "rewrite", text),
        "polish": lambda: write(model, "polish", text),
        "summarize": lambda: write(model, "summarize", text, length=60 if lang == "en" else 120),
        "ask": lambda: ask(model, kb, question).text,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="Default: the embedded default model.")
    ap.add_argument("--lang", choices=["en", "zh"], default=None, help="Default: zh for qwen2.5, else en.")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--task", action="append", help="only these (rewrite, polish, summarize, ask)")
    args = ap.parse_args()
    model = muse.load(args.model)
    lang = args.lang or ("zh" if "qwen" in model.name else "en")
    generation.stream_generate = muse.api.stream_generate = _stream
    flags = [f for f in ("avx512f", "avx2", "fma") if f in Path("/proc/cpuinfo").read_text()] \
        if Path("/proc/cpuinfo").exists() else []
    print(f"{model.name} · {lang} · torch threads {torch.get_num_threads()} · {platform.processor() or platform.machine()}"
          f" · CPU flags {' '.join(flags)} · torch ISA {torch.backends.cpu.get_cpu_capability()}")
    print("| task | lookup off s | lookup on s | speed-up | same text | accepted / drafted |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="muse-bench-") as folder:
        for name, run in tasks(model, lang, Path(folder)).items():
            if not args.task or name in args.task:
                measure(name, run, args.runs)
    cost = generation.pass_cost(model.model)  # what the drafts were sized by
    print(f"pass cost as measured, in passes of one token: width 2 {cost.ratio(2):.2f}, 5 {cost.ratio(5):.2f}, "
          f"9 {cost.ratio(9):.2f} (median {cost.slope:.3f} a token more)")


def measure(name: str, run, runs: int) -> None:
    """Print the table row of one task: `runs` runs each with lookup off and on, alternating, after one
    untimed run (a first call pays for imports and warm caches, which would count against "off")."""
    run()
    times, texts, counts = {0: [], ON: []}, {}, (0, 0)
    for _ in range(runs):
        for draft in (0, ON):
            LOOKUP.update(draft=draft, drafted=0, accepted=0)
            t0 = time.perf_counter()
            texts[draft] = run()
            times[draft].append(time.perf_counter() - t0)
            if draft:
                counts = (LOOKUP["accepted"], LOOKUP["drafted"])
    off, on = statistics.median(times[0]), statistics.median(times[ON])
    print(f"| {name} | {off:.2f} | {on:.2f} | {off / on:.2f}× | {'yes' if texts[0] == texts[ON] else 'NO'} | "
          f"{counts[0]} / {counts[1]} |")


if __name__ == "__main__":
    main()
