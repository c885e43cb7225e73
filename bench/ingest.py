"""Ingestion under attack: each hostile file kind through the extractor, with its time and memory.

    .venv/bin/python bench/ingest.py                              # the current extractor
    .venv/bin/python bench/ingest.py --before 5f627f5 --timeout 120  # and the one at that commit

Each case runs in a fresh process (the file is built there, in code: tests/hostile.py),
so one case's memory never shows in another's. The current extractor is warmed with a tiny file
first (a folder add or a server pays the worker's start once); its time is then one `extract_bytes`.
`--before REV` also runs `muse/apps/extract.py` as it was at REV, in its own process under a wall
time of --timeout seconds and an address-space cap of --before-memory GB (so a zip bomb fails there
with MemoryError instead of swapping the machine).

Columns
  case       the hostile (or, for scale, ordinary) file
  size       its bytes on disk
  result     text (characters) or "skipped: why", cut to fit
  s          wall seconds for the one file
  peak RSS   the largest resident memory of the process that parsed it (the worker's VmHWM; for
             --before, the whole process's), "-" when it was killed before it could say, or for plain
             text (read in the calling process)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 1_000_000


def cases() -> dict:
    """name -> (builder of (bytes, kind), description)."""
    from tests import hostile as h

    return {
        "text 1 kB": (lambda: (b"The blue door is at the end of the hall. " * 25, "text"), "ordinary"),
        "html 1 MB": (lambda: (b"<p>A paragraph of <b>ordinary</b> text, with a <a href='x'>link</a>.</p>\n"
                               * 13_000, "html"), "ordinary"),
        "pdf 20 pages": (lambda: (h.many_pages_pdf(20), "pdf"), "ordinary"),
        "docx 200 kB XML": (lambda: (h.docx_with_xml(200_000), "docx"), "ordinary"),
        "html nested 20k": (lambda: (h.nested_html(20_000), "html"), "hostile"),
        "html nested 100k": (lambda: (h.nested_html(100_000), "html"), "hostile"),
        "html 100k unclosed <a": (lambda: (h.unclosed_tags_html(100_000), "html"), "hostile"),
        "html 20 MB of tags": (lambda: (h.slow_html(20), "html"), "hostile"),
        "docx -> 300 MB XML": (lambda: (h.docx_with_xml(300 * MB), "docx"), "hostile"),
        "docx -> 20 MB XML": (lambda: (h.docx_with_xml(20 * MB), "docx"), "hostile"),
        "docx lying headers": (lambda: (h.lying_docx(), "docx"), "hostile"),
        "pdf Flate -> 200 MB": (lambda: (h.flate_bomb_pdf(200 * MB), "pdf"), "hostile"),
        "pdf 60k pages": (lambda: (h.many_pages_pdf(60_000), "pdf"), "hostile"),
        "pdf 60k, /Count 1": (lambda: (h.many_pages_pdf(60_000, count=1), "pdf"), "hostile"),
        "pdf damaged": (lambda: (b"%PDF-1.4\n1 0 obj << /Type /Catalog", "pdf"), "hostile"),
    }


def _bare_muse() -> None:
    """Import muse's modules without muse/__init__.py (which loads torch), as the worker does."""
    import types

    package = types.ModuleType("muse")
    package.__path__ = [str(ROOT / "muse")]
    sys.modules.setdefault("muse", package)


def run_one(name: str, before: str | None) -> dict:
    """In the case's own process: build the file, extract it, report."""
    _bare_muse()
    data, kind = cases()[name][0]()
    if before:
        import importlib.util

        spec = importlib.util.spec_from_file_location("extract_before", before)
        old = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = old  # dataclasses look their module up
        spec.loader.exec_module(old)
        extract, errors, peak = (lambda: old.extract_bytes(data, kind)), (old.ExtractError,), _own_peak
    else:
        from muse.apps.extract import Extractor, ExtractError

        ex = Extractor()
        ex.extract_bytes(b"<p>warm</p>", "html")  # start the worker before the clock
        extract, errors = (lambda: ex.extract_bytes(data, kind)), (ExtractError,)
        peak = (lambda: 0) if kind in ("text", "markdown") else (lambda: ex.peak_rss)  # text: read in process
    t = time.perf_counter()
    try:
        result = f"{len(extract().text):,} chars of text"
    except errors as e:
        result = f"skipped: {e}"
    except MemoryError:
        result = "MemoryError (uncaught)"
    except Exception as e:  # noqa: BLE001 — the old extractor's uncaught errors are what we measure
        result = f"uncaught {type(e).__name__}: {e}"
    return {"size": len(data), "result": result, "seconds": time.perf_counter() - t, "peak_rss": peak()}


def _own_peak() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def measure(name: str, before: str | None, timeout: float, memory_gb: float) -> dict:
    cmd = [sys.executable, __file__, "--one", name] + (["--source", before] if before else [])

    def cap():  # the old extractor can take gigabytes: keep it from swapping a shared machine
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (int(memory_gb * 1e9), resource.RLIM_INFINITY))

    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                           preexec_fn=cap if before else None)
    except subprocess.TimeoutExpired:
        return {"result": f"still running after {timeout:g} s: killed", "seconds": time.perf_counter() - t}
    lines = p.stdout.strip().splitlines()
    if p.returncode or not lines:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"result": f"crashed (exit {p.returncode}): {tail}", "seconds": time.perf_counter() - t}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", metavar="REV", help="also run muse/apps/extract.py as of this git revision")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before a --before case is killed")
    ap.add_argument("--before-memory", type=float, default=4.0, help="address-space cap (GB) for --before cases")
    ap.add_argument("--only", nargs="*", help="case names to run (default: all)")
    ap.add_argument("--json", help="write the rows here too")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--source", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.one:
        print(json.dumps(run_one(args.one, args.source)))
        return

    before_src = None
    if args.before:
        src = subprocess.run(["git", "show", f"{args.before}:muse/apps/extract.py"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        before_src = Path(tempfile.mkdtemp()) / "extract_before.py"
        before_src.write_text(src)
    names = args.only or list(cases())
    print(f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
    header = f"{'case':24} {'size':>9}  {'version':7} {'s':>7} {'peak RSS':>9}  result"
    print(header + "\n" + "-" * len(header), flush=True)
    rows = []
    for name in names:
        for version, src in (("now", None), ("before", before_src)) if before_src else (("now", None),):
            row = {"case": name, "version": version,
                   **measure(name, str(src) if src else None, args.timeout if src else 600, args.before_memory)}
            rows.append(row)
            size = f"{row['size'] / MB:,.2f} MB" if "size" in row else "-"
            rss = f"{row['peak_rss'] / MB:,.0f} MB" if row.get("peak_rss") else "-"
            result = row["result"] if len(row["result"]) <= 110 else row["result"][:107] + "..."
            print(f"{name:24} {size:>9}  {version:7} {row['seconds']:7.2f} {rss:>9}  {result}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at end")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
