"""Writer output gates: the share of outputs that pass their checks before and after `checked_write`.

    .venv/bin/python bench/gates.py --split dev                        # en on smollm2-135m, zh on qwen2.5-0.5b
    .venv/bin/python bench/gates.py --split dev --lang en --limit 5 -v

For each item of `muse/eval/data/heldout/writer_{lang}_{split}.jsonl` (action, text, tone):
`muse.apps.writer.checked_write` with the writer's defaults. "before" is its first attempt as
generated (what the unchecked writer returned), checked by `muse.apps.gates.check`; "after" is
what it settles on (repairs and up to ATTEMPTS tries). "refused" counts outputs that still fail:
the CLI and the server save none of them. "kept" is the share of `must_keep` strings found verbatim
(after), a check the gates do not make. Tune on dev only; run test once, to report.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

HELDOUT = Path(__file__).resolve().parent.parent / "muse" / "eval" / "data" / "heldout"
MODELS = {"en": "smollm2-135m", "zh": "qwen2.5-0.5b"}


def run(lang: str, split: str, model_name: str, limit: int | None, max_tokens: int | None, verbose: bool) -> dict:
    import muse
    from muse.apps.gates import summary
    from muse.apps.writer import checked_write, default_params

    items = [json.loads(line) for line in (HELDOUT / f"writer_{lang}_{split}.jsonl").open(encoding="utf-8")]
    items = items[:limit] if limit else items
    model = muse.load(model_name)
    params = default_params(model)
    if max_tokens:
        params = params.replace(max_new_tokens=max_tokens)
    before = after = attempts = kept = keep_total = 0
    gates_before, gates_after = Counter(), Counter()
    t0 = time.time()
    for i, it in enumerate(items):
        tone = it["tone"] if it["action"] in ("rewrite", "expand") else None
        r = checked_write(model, it["action"], it["text"], tone=tone, params=params)
        before += not r.first_problems
        after += r.ok
        attempts += r.attempts
        gates_before.update({p.gate for p in r.first_problems})
        gates_after.update({p.gate for p in r.problems})
        keep_total += len(it["must_keep"])
        kept += sum(k in r.output for k in it["must_keep"])
        if verbose:
            print(f"[{lang} {i:2d} {it['action']:8s}] attempts={r.attempts} first: {summary(r.first_problems) or 'ok'}"
                  f" | final: {summary(r.problems) or 'ok'}\n    {r.output[:160]!r}", flush=True)
    n = len(items)
    return {"lang": lang, "model": model_name, "n": n, "before": before / n, "after": after / n,
            "refused": n - after, "attempts": attempts / n, "kept": kept / max(keep_total, 1),
            "gates_before": dict(gates_before), "gates_after": dict(gates_after), "seconds": time.time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=("dev", "test"), default="dev")
    ap.add_argument("--lang", choices=("en", "zh"), action="append", help="default: both")
    ap.add_argument("--model", help="one model for every language (default: en smollm2-135m, zh qwen2.5-0.5b)")
    ap.add_argument("--limit", type=int, help="the first N items only")
    ap.add_argument("--max-tokens", type=int, help="cap max_new_tokens (default: the writer's)")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = [run(lang, a.split, a.model or MODELS[lang], a.limit, a.max_tokens, a.verbose) for lang in a.lang or ("en", "zh")]
    print(f"\nwriter gates, {a.split} split")
    print("| lang | model | items | pass before | pass after | refused (not saved) | attempts/item | must_keep kept "
          "| failing gates before → after | time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['lang']} | {r['model']} | {r['n']} | {r['before']:.0%} | {r['after']:.0%} | {r['refused']} | "
              f"{r['attempts']:.2f} | {r['kept']:.0%} | {r['gates_before']} → {r['gates_after']} | {r['seconds']:.0f} s |")


if __name__ == "__main__":
    main()
