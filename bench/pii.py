"""PII redaction: precision, recall and F1 per kind and language, before and after, on the labelled sets.

    .venv/bin/python bench/pii.py                      # dev and test, this tree vs the detector at BASELINE
    .venv/bin/python bench/pii.py --before HEAD         # vs the last commit instead
    .venv/bin/python bench/pii.py --errors dev          # what the current detector gets wrong on dev
    .venv/bin/python bench/pii.py --sweep               # precision/recall at other thresholds
    .venv/bin/python bench/pii.py --noise               # how often random numbers of each shape are flagged

Data: muse/safety_data/pii_{dev,test}.jsonl (muse.safety.pii_eval). `dev` is what the patterns were tuned on;
`test` was written and committed before the detector changed, and is not tuned on. `exact`: a finding counts
with exactly the gold span and kind; `chars`: per character of the text. "before" is muse/safety/pii.py as it
was at --before (git show), loaded as its own module; "after" is the working tree's.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BASELINE = "cef1230"   # the last commit that changed muse/safety/pii.py before the issue-12 hardening

from muse.safety.pii import KINDS, find_pii  # noqa: E402
from muse.safety.pii_eval import LANGS, SPLITS, errors, evaluate, load_split  # noqa: E402


def load_before(rev: str):
    """muse/safety/pii.py at `rev`, imported as a separate module (None when git cannot show it)."""
    try:
        src = subprocess.run(["git", "show", f"{rev}:muse/safety/pii.py"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        print(f"(no 'before' column: git show {rev}:muse/safety/pii.py failed: {e})", file=sys.stderr)
        return None
    path = Path(tempfile.mkdtemp()) / "pii_before.py"
    path.write_text(src, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("pii_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def prf(c) -> str:
    return f"{c.precision:5.2f} {c.recall:5.2f} {c.f1:5.2f}"


def table(split: str, before) -> None:
    items = load_split(split)
    after = evaluate(find_pii, items)
    old = evaluate(before.find_pii, items) if before else None
    n = {lang: sum(it["lang"] == lang for it in items) for lang in LANGS}
    print(f"\n## {split}: {len(items)} texts (zh {n['zh']}, en {n['en']})")
    head = "  P     R     F1 "
    cols = ["exact before", "exact after", "chars before", "chars after"] if old else ["exact", "chars"]
    print(f"{'lang':4} {'kind':5} {'gold':>4} | " + " | ".join(f"{c:^17}" for c in cols))
    print(f"{'':4} {'':5} {'':>4} | " + " | ".join(head for _ in cols))
    for lang in (*LANGS, "all"):
        for kind in (*KINDS, "all"):
            s = after[lang, kind]
            if kind != "all" and not s.gold and not s.exact.fp and not (old and old[lang, kind].exact.fp):
                continue
            cells = ([prf(old[lang, kind].exact), prf(s.exact), prf(old[lang, kind].chars), prf(s.chars)] if old
                     else [prf(s.exact), prf(s.chars)])
            print(f"{lang:4} {kind:5} {s.gold:4} | " + " | ".join(cells))


def sweep(split: str) -> None:
    items = load_split(split)
    print(f"\n## threshold sweep on {split} (all kinds, both languages, exact spans)")
    for t in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        s = evaluate(lambda text: find_pii(text, threshold=t), items)["all", "all"].exact
        print(f"  threshold {t:.1f}: P {s.precision:.3f}  R {s.recall:.3f}  F1 {s.f1:.3f}  (fp {s.fp}, fn {s.fn})")


NOISE = {  # shape: a function of a random generator giving one random string of that shape
    "11 digits starting 1[3-9]": lambda r: f"1{r.randint(3, 9)}" + "".join(r.choices("0123456789", k=9)),
    "16 digits starting 4/5/6": lambda r: r.choice("456") + "".join(r.choices("0123456789", k=15)),
    "16 digits in fours": lambda r: " ".join("".join(r.choices("0123456789", k=4)) for _ in range(4)),
    "15 digits": lambda r: "".join(r.choices("0123456789", k=15)),
    "18 digits": lambda r: "".join(r.choices("0123456789", k=18)),
    "a.b.c.d, each 0-255": lambda r: ".".join(str(r.randint(0, 255)) for _ in range(4)),
    "decimal d.dddddd": lambda r: f"{r.uniform(-180, 180):.6f}",
    "+d.ddde-dd": lambda r: f"+{r.uniform(1, 10):.3f}e-{r.randint(1, 40)}",
    "lat, long pair": lambda r: f"{r.uniform(-90, 90):.6f}, {r.uniform(-180, 180):.6f}",
    "ddd.ddd.dddd": lambda r: ".".join("".join(r.choices("0123456789", k=k)) for k in (3, 3, 4)),
}


def noise(n: int = 2000) -> None:
    """What fraction of random strings of each shape, alone in a sentence with no context words, is flagged.
    Some are flagged by design (an 11-digit 13x… number is a mobile's shape; a Luhn-valid 16-digit 4… is a
    card's): the figure says how often a random number of that shape passes the checks."""
    import random

    rng = random.Random(0)
    print(f"\n## random numbers, no context words ({n} of each): share flagged, by kind")
    for shape, make in NOISE.items():
        kinds: dict[str, int] = {}
        for _ in range(n):
            for e in find_pii(f"the value is {make(rng)} today"):
                kinds[e.kind] = kinds.get(e.kind, 0) + 1
        flagged = ", ".join(f"{k} {v / n:.1%}" for k, v in sorted(kinds.items())) or "none"
        print(f"  {shape:28} {flagged}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default=BASELINE, help=f"git revision of the 'before' detector (default {BASELINE}); "
                                                       "'none' for no comparison")
    ap.add_argument("--split", choices=(*SPLITS, "both"), default="both")
    ap.add_argument("--errors", choices=SPLITS, help="list the current detector's misses and false alarms")
    ap.add_argument("--sweep", action="store_true", help="precision/recall at thresholds 0.2-0.9")
    ap.add_argument("--noise", action="store_true", help="share of random numbers of each shape that is flagged")
    args = ap.parse_args()
    before = None if args.before == "none" else load_before(args.before)
    if before:
        print(f"before: muse/safety/pii.py at {args.before}; after: the working tree")
    for split in (SPLITS if args.split == "both" else (args.split,)):
        table(split, before)
        if args.sweep:
            sweep(split)
    if args.noise:
        noise()
    if args.errors:
        print(f"\n## errors on {args.errors}")
        for text, missed, wrong in errors(find_pii, load_split(args.errors)):
            print(f"- {text!r}\n    missed: {missed}\n    wrong:  {wrong}")


if __name__ == "__main__":
    main()
