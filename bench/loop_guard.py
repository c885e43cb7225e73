"""The loop guard on real text: how often a near-loop would be called on text that does not loop,
and how many real answers of the default model loop, with the guard on and off.

    .venv/bin/python bench/loop_guard.py                     # both parts, the default model
    .venv/bin/python bench/loop_guard.py --model qwen2.5-0.5b --skip-corpora

Part 1 (false alarms): each corpus is cut into 256-token slices (an answer's length) and fed token by
token to the guard (`TokenText` with the loop guard, which holds both the exact-repeat check and the
near-loop `Echo`); a slice that trips it is a false alarm. Corpora: Tiny Shakespeare
(../shared/data, else the `shakespeare` package), README + docs, Muse's own code, the eval JSONL data.
Part 2 (real loops): everyday prompts answered greedy and with the model's recommended sampling
(seed 1), 256 tokens at most, with the guard on and off: how many answers the guard ends, and how
many tokens run to the 256-token cap.
"""

from __future__ import annotations

import argparse
import glob
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = ["Write a poem about the sea", "Once upon a time", "Tell me a story about a dragon.",
           "Describe your ideal day.", "What is the meaning of life?", "Write an ad for a coffee shop.",
           "List ten fruits.", "Explain photosynthesis to a child.", "Write a short essay about friendship.",
           "Give me tips for learning English.", "Write a poem about autumn leaves.", "Why is the sky blue?",
           "Write a letter to your future self.", "What are the benefits of exercise?", "Describe a busy market."]
SLICE = 256


def corpora() -> dict[str, str]:
    shared = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
    if shared.is_file():
        plays = shared.read_text(encoding="utf-8")
    else:
        from tests.helpers import shakespeare_text

        plays = shakespeare_text(1_000_000)
    read = lambda pattern: "\n".join(Path(f).read_text(encoding="utf-8")  # noqa: E731
                                     for f in sorted(glob.glob(str(ROOT / pattern), recursive=True)))
    return {"Tiny Shakespeare (300k chars)": plays[:300_000], "README + docs": read("README.md") + read("docs/*.md"),
            "Muse's code": read("muse/**/*.py"), "eval JSONL": read("muse/eval/data/**/*.jsonl")}


def false_alarms(tokenizer) -> None:
    from muse.generation import TokenText

    print(f"\nPart 1: false alarms on text that does not loop ({SLICE}-token slices)\n")
    print("| corpus | slices | tripped the guard |\n|---|---|---|")
    for name, text in corpora().items():
        ids = tokenizer.encode(text, add_special_tokens=False)
        slices = [ids[s:s + SLICE] for s in range(0, len(ids) - SLICE, SLICE)]
        tripped = 0
        for piece in slices:
            guard = TokenText(None, [], SLICE + 1, loop_guard=True)
            tripped += any(guard.push(t)[1] for t in piece)
        print(f"| {name} | {len(slices):,} | {tripped} |")


def real_loops(model) -> None:
    print(f"\nPart 2: {model.name} answering {len(PROMPTS)} prompts, ≤ {SLICE} tokens\n")
    print("| sampling | guard | answers ended by the guard | answers at the cap | median tokens |\n|---|---|---|---|---|")
    for label, temp in (("greedy", 0.0), ("recommended (seed 1)", None)):
        for guard in (False, True):
            ended, capped, lengths = 0, 0, []
            for p in PROMPTS:
                kw = {"max_new_tokens": SLICE, "seed": 1, "loop_guard": guard}
                if temp is not None:
                    kw["temperature"] = temp
                last = list(model.stream_chat([{"role": "user", "content": p}], **kw))[-1]
                ended += last.looped
                capped += last.finish_reason == "length"
                lengths.append(last.generation_tokens)
            print(f"| {label} | {'on' if guard else 'off'} | {ended} | {capped} | {statistics.median(lengths):.0f} |",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--skip-corpora", action="store_true")
    ap.add_argument("--skip-answers", action="store_true")
    args = ap.parse_args()
    import muse

    m = muse.load(args.model)
    print(f"model {m.name}; recommended sampling {m.recommended or 'none'}")
    if not args.skip_corpora:
        false_alarms(m.tokenizer)
    if not args.skip_answers:
        real_loops(m)


if __name__ == "__main__":
    main()
