"""Named-entity extraction: schema-constrained decoding vs the same prompt unconstrained, per model and language.

    .venv/bin/python bench/extract.py                       # test split, every bundled model installed
    .venv/bin/python bench/extract.py --split dev --limit 10 # what prompt changes are measured on
    .venv/bin/python bench/extract.py --models smollm2-135m --langs en --errors

Data: muse/eval/data/ner_{en,zh}_{dev,test}.jsonl (written for Muse; see NER.md there). Prompt changes
are measured on dev; test is not tuned on. Methods, all with the same prompt, greedy decoding and token
budget: "constrained" holds the reply to the schema and each entity's text to a run of the input's
words; "strings" holds it to the schema with any text; "free" has no constraint, and its reply is
parsed as best it can be (a fenced block, else every complete {...} item). "JSON ok": the raw reply
was JSON of the requested shape. Offsets are Muse's in every method (the model gives type and text);
"drop": entities whose text is not in the input. P/R/F1: entity-level, micro-averaged; exact = same
type and span, partial = same type and overlapping span, text = same type and text (offsets ignored).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from muse.apps.entities import MATCHES, Counts, extract_entities, load_ner, match_counts  # noqa: E402


METHODS = {"constrained": dict(constrained=True), "strings": dict(constrained=True, spans=False),
           "free": dict(constrained=False)}


def run(model, items: list[dict], method: str, errors: bool) -> dict:
    totals = {m: Counts() for m in MATCHES}
    valid = dropped = 0
    t0 = time.perf_counter()
    for item in items:
        x = extract_entities(model, item["text"], **METHODS[method])
        valid += x.valid
        dropped += len(x.dropped)
        for m in MATCHES:
            totals[m] = totals[m] + match_counts(item["entities"], x.entities, m)
        if errors and match_counts(item["entities"], x.entities).f1 < 1:
            gold = [(e["type"], e["text"]) for e in item["entities"]]
            got = [(e["type"], e["text"]) for e in x.entities]
            extra = f"\n    dropped {x.dropped}" if x.dropped else ""
            print(f"  {item['text']}\n    gold {gold}\n    got  {got}{extra}", file=sys.stderr)
    return {"n": len(items), "valid": valid, "dropped": dropped, "seconds": time.perf_counter() - t0,
            **{m: totals[m] for m in MATCHES}}


def main() -> None:
    import torch

    import muse
    from muse.apps.language import supports_chinese
    from muse.checkpoints.registry import BUNDLED
    from generate import machine_info

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", default="test", choices=("dev", "test"))
    ap.add_argument("--limit", type=int, default=None, help="first N sentences of each language")
    ap.add_argument("--models", default=None, help="comma-separated (default: every bundled model installed)")
    ap.add_argument("--langs", default="en,zh")
    ap.add_argument("--methods", default="constrained,free",
                    help="constrained (entity texts: runs of the input's words), strings (schema, any text), free")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--errors", action="store_true", help="print the sentences a method gets wrong (stderr)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    machine = machine_info(args.threads)
    print(f"{machine['cpu']}, {machine['logical_cpus']} CPUs, {args.threads} threads, "
          f"load average {machine['loadavg_start'][0]:.2f}; torch {machine['torch']} "
          f"({machine['cpu_capability']}), python {machine['python']}")
    names = args.models.split(",") if args.models else [b.name for b in BUNDLED.values() if b.installed_file()]
    limit = f", first {args.limit} per language" if args.limit else ""
    print(f"NER {args.split} split{limit}; greedy; same prompt both methods\n")
    head = (f"{'model':<14} {'lang':<4} {'method':<11} {'n':>3} {'JSON ok':>7} {'drop':>4} "
            f"{'P':>5} {'R':>5} {'F1':>5} {'F1 part':>7} {'F1 text':>7} {'s/item':>6}")
    print(head)
    print("-" * len(head))
    rows = []
    for name in names:
        model = muse.load(name)
        for lang in args.langs.split(","):
            if lang == "zh" and not supports_chinese(model):
                print(f"{model.name:<14} {lang:<4} {'—':<11} (English-only model: Chinese goes to the bilingual one)")
                continue
            items = load_ner(lang, args.split)[: args.limit]
            for method in args.methods.split(","):
                r = run(model, items, method, args.errors)
                ex = r["exact"]
                print(f"{model.name:<14} {lang:<4} {method:<11} {r['n']:>3} {100 * r['valid'] / r['n']:>6.0f}% "
                      f"{r['dropped']:>4} {ex.precision:>5.2f} {ex.recall:>5.2f} {ex.f1:>5.2f} "
                      f"{r['partial'].f1:>7.2f} {r['text'].f1:>7.2f} {r['seconds'] / r['n']:>6.1f}", flush=True)
                rows.append({"model": model.name, "lang": lang, "method": method, "n": r["n"],
                             "json_valid": r["valid"] / r["n"], "dropped": r["dropped"],
                             **{f"{m}_{k}": getattr(r[m], k) for m in MATCHES for k in ("precision", "recall", "f1")},
                             "seconds_per_item": r["seconds"] / r["n"]})
    print(f"\nload average at the end {__import__('os').getloadavg()[0]:.2f} (a shared machine inflates s/item)")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
