"""Quantized linear layers vs torch, at decode (M=1) and prefill (M=128) sizes.

    .venv/bin/python bench/matvec.py                # 2 threads, all shapes, M=1 and M=128
    .venv/bin/python bench/matvec.py --threads 1 --m 1 4 --shapes 576x1536

Shapes are (out, in): SmolLM2-135M (576x576, 1536x576, 576x1536 and its tied lm_head
49152x576) and Qwen2.5-0.5B's MLP (4864x896, 896x4864). Each method rotates over enough
copies of its weights (> --cold-mb MB in all, above the L3 cache) that every call streams
its weights from DRAM, as decoding does. Methods are timed round-robin, so that load
from other processes falls on all alike; p10 is the 10th percentile, the time without
such interference. GB/s (from the median) counts the weight bytes (codes + scales + mins)
a call must read; "x fp32" is the median speedup over fp32 F.linear at the same M.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from muse import quant  # noqa: E402
from muse.quant import QuantLinear  # noqa: E402

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576), (4864, 896), (896, 4864)]


def measure(runs: dict, budget_s: float, min_rounds: int) -> dict:
    """{name: (median µs, p10 µs)} for callables run(i), interleaved round-robin so that
    load from other processes falls on all methods alike."""
    times = {name: [] for name in runs}
    for run in runs.values():  # warm-up: build, first touch, thread pool
        for i in range(3):
            run(i)
    start, i = time.perf_counter(), 0
    while i < min_rounds or (time.perf_counter() - start < budget_s * len(runs) and i < 20000):
        for name, run in runs.items():
            for j in range(4):
                t = time.perf_counter()
                run(4 * i + j)
                times[name].append(time.perf_counter() - t)
        i += 1
    return {n: (statistics.median(t) * 1e6, statistics.quantiles(t, n=10)[0] * 1e6) for n, t in times.items()}


def methods(N: int, K: int):
    """(name, weight bytes read per call, prepare(W) -> state, run(state, x) -> y)."""

    def muse(bits, G):
        return lambda W: QuantLinear.from_float(W, bits, G), lambda q, x: q(x)

    def int8pack(W):
        q = QuantLinear.from_float(W, 8, K)
        return q.qweight, q.scales.float().view(-1)

    yield "fp32 F.linear", 4 * N * K, lambda W: W, lambda W, x: F.linear(x, W)
    yield "bf16 F.linear", 2 * N * K, lambda W: W.bfloat16(), lambda W, x: F.linear(x.bfloat16(), W)
    yield "torch int8pack_mm", N * K + 4 * N, int8pack, lambda s, x: torch._weight_int8pack_mm(x, *s)
    yield ("muse int8 per-ch", N * K + 2 * N, *muse(8, K))
    yield ("muse int8 g32", N * K + 2 * N * K // 32, *muse(8, 32))
    yield ("muse int4 g32", N * K // 2 + 4 * N * K // 32, *muse(4, 32))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 128], help="rows of x (default 1 128)")
    ap.add_argument("--shapes", nargs="+", default=None, help="OUTxIN, e.g. 576x1536 (default: all)")
    ap.add_argument("--cold-mb", type=float, default=96, help="weight MB rotated over per method (> L3)")
    ap.add_argument("--budget", type=float, default=0.3, help="seconds per method and M (default 0.3)")
    ap.add_argument("--min-rounds", type=int, default=5, help="rounds of 4 calls per method, at least")
    ap.add_argument("--methods", nargs="+", default=None, help="substrings of method names to run")
    ap.add_argument("--tile", type=int, default=None, help="override quant.PREFILL_TILE_N")
    ap.add_argument("--prefill-min-m", type=int, default=None, help="use dequantize-tile + at::mm from this M on (off by default)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.tile is not None:
        quant.PREFILL_TILE_N = args.tile
    if args.prefill_min_m is not None:
        quant.PREFILL_MIN_M = args.prefill_min_m
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes] if args.shapes else SHAPES
    kernels = quant.kernels_available()
    torch.manual_seed(0)

    rows = []
    with torch.inference_mode():
        for N, K in shapes:
            W = torch.randn(N, K) * 0.02
            prepared = {}
            for name, nbytes, prepare, run in methods(N, K):
                if args.methods and not any(s in name for s in args.methods):
                    continue
                try:
                    state = prepare(W)
                    run(state, torch.randn(1, K))
                except RuntimeError as e:  # e.g. an op this torch build lacks
                    print(f"skipping {name}: {e}", file=sys.stderr)
                    continue
                # independent copies, more than --cold-mb in all: each call reads from DRAM
                n = max(2, math.ceil(args.cold_mb * 2**20 / nbytes))
                prepared[name] = (nbytes, run, [state] + [copy.deepcopy(state) for _ in range(n - 1)])
            for M in args.m:
                x = torch.randn(M, K)
                runs = {
                    name: (lambda i, r=run, s=states: r(s[i % len(s)], x))
                    for name, (_, run, states) in prepared.items()
                    if not (name == "torch int8pack_mm" and M > 16)  # ~30x slower than fp32 there
                }
                for name, (med, p10) in measure(runs, args.budget, args.min_rounds).items():
                    rows.append((f"{N}x{K}", M, name, med, p10, prepared[name][0] / med / 1e3))
            del prepared

    base = {(r[0], r[1]): r[3] for r in rows if r[2] == "fp32 F.linear"}
    header = ["W (out x in)", "M", "method", "median µs", "p10 µs", "weight GB/s", "x fp32"]
    table = [
        [shape, str(M), name, f"{us:,.1f}", f"{p10:,.1f}", f"{gbs:.1f}",
         f"{base[(shape, M)] / us:.2f}" if (shape, M) in base else "-"]
        for shape, M, name, us, p10, gbs in sorted(rows, key=lambda r: (r[1], SHAPES.index(tuple(map(int, r[0].split("x"))))
                                                                 if tuple(map(int, r[0].split("x"))) in SHAPES else 0))
    ]
    title = (f"torch {torch.__version__}, {args.threads} threads, muse kernels: "
             f"{'on, ' + str(quant._ext.vector_lanes()) + ' lanes' if kernels else 'OFF (PyTorch fallback)'}")
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title)
        for i, h in enumerate(header):
            t.add_column(h, justify="left" if i in (0, 2) else "right")
        prev = None
        for r in table:
            if prev is not None and (r[0], r[1]) != prev:
                t.add_section()
            prev = (r[0], r[1])
            t.add_row(*r)
        Console(width=max(100, Console().width)).print(t)
    except ImportError:
        print(title)
        widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(header)]
        for r in [header] + table:
            print("  ".join(c.ljust(w) if i in (0, 2) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


if __name__ == "__main__":
    main()
