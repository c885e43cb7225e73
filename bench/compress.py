"""Quantization on the default model: size, memory, decode speed, perplexity and KL vs fp32.

    .venv/bin/python bench/compress.py                       # every variant, 4096 tokens of tinyshakespeare
    .venv/bin/python bench/compress.py --text book.txt --tokens 2048 --variants fp32 int8 int4-g32
    .venv/bin/python bench/compress.py --quick               # smoke test

The model is SmolLM2-135M-Instruct as bundled (a Q4_1 GGUF). "fp32" is that file dequantized
exactly: it is the reference every variant is compared with. int8 / int4 variants are made
from it with `muse.compress.quantize` (embedding / tied head in int8 per row) and loaded from
their saved directories, as a user would. "Q4_1 auto" is the GGUF as shipped (Muse keeps its
blocks packed: int4 g32, the embedding int8 g32).

Columns
  file MB         what the variant loads from: the saved directory's model.safetensors (the
                  GGUF itself for Q4_1 auto, the converted cache for fp32 / bf16)
  weights MB      bytes of the tensors a decode step reads (packed codes, scales, floats)
  peak RSS MB     peak resident memory of a fresh process that loads the variant and decodes
                  (VmHWM, before the evaluation, which loads the fp32 reference too)
  decode tok/s    batch 1, greedy, --new-tokens single-token steps after a 64-token prompt;
                  all variants in ONE process, timed round-robin (--rounds), median: load from
                  other processes on a shared machine then falls on all variants alike (the
                  header says how busy the machine was; --wait-idle waits for a quiet one)
  x fp32          decode speed / fp32's, from those medians
  perplexity      on the first --tokens tokens of the text (sliding windows of 1024, stride 512)
  KL vs fp32      mean over the scored positions of KL(P_fp32 || P_variant), nats
  top-1 = fp32    % of positions where the variant's most likely token is fp32's
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
# name -> (label, how to make it: quantize(bits, group) or a load precision of the bundled GGUF)
VARIANTS = {
    "fp32": ("fp32 (reference)", {"precision": "fp32"}),
    "bf16": ("bf16", {"precision": "bf16"}),
    "int8": ("int8 per channel", {"bits": 8, "group": None}),
    "int4-g32": ("int4 g32", {"bits": 4, "group": 32}),
    "int4-g128": ("int4 g128", {"bits": 4, "group": 128}),
    "q4_1": ("Q4_1 auto (GGUF as shipped)", {"precision": "auto"}),
}
TARGETS = [("int8", "KL", 0.005), ("int4-g32", "KL", 0.05), ("int8", "speed", 2.0)]


@dataclass
class Result:
    variant: str
    label: str
    error: str | None = None
    file_bytes: int | None = None
    weight_bytes: int | None = None
    load_s: float | None = None
    peak_rss_mb: float | None = None
    decode_tps: float | None = None
    decode_runs: list[float] = dataclasses.field(default_factory=list)
    tokens: int | None = None
    perplexity: float | None = None
    kl: float | None = None
    kl_p99: float | None = None
    same_top1: float | None = None
    groups: str | None = None  # the group sizes the quantizer used


# ------------------------------------------------------------------------------------------
# workers (each a fresh process)
# ------------------------------------------------------------------------------------------


def load_variant(name: str, dirs: dict):
    import muse

    how = VARIANTS[name][1]
    if "precision" in how:
        return muse.load(precision=how["precision"])
    return muse.load(dirs[name])


def file_bytes(name: str, m) -> int:
    if name == "q4_1":
        return Path(m.info["path"]).stat().st_size
    root = Path(m.info.get("cache") or m.info["path"])
    return (root / "model.safetensors").stat().st_size


def eval_ids(text_path: str, tokens: int, tokenizer) -> list[int]:
    from muse.eval.perplexity import read_text, start_ids

    ids, _ = start_ids(tokenizer, read_text(Path(text_path)))
    return ids[: tokens + 1]  # ids[0] is the start token: context only


def worker_prepare(spec: dict) -> dict:
    """Convert the GGUF for each precision (so later loads are cached) and save the quantized variants."""
    import muse
    from muse.compress import quantize

    for precision in ("fp32", "bf16", "auto"):
        muse.load(precision=precision)
    fp32 = muse.load(precision="fp32")
    groups = {}
    for name in spec["variants"]:
        how = VARIANTS[name][1]
        if "bits" in how:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # g128 on 576-wide layers: recorded below instead
                q = quantize(fp32, how["bits"], how["group"], out=spec["dirs"][name])
            used = sorted({v["group_size"] for k, v in q.info["quantization"].items() if k != "wte"})
            groups[name] = "/".join(map(str, used))
    return groups


def worker_variant(spec: dict) -> dict:
    """One variant in a fresh process: load, a short decode, peak RSS; then perplexity and KL."""
    import torch

    from generate import peak_rss_mb
    from muse.compress import weight_bytes
    from muse.eval.divergence import kl_divergence
    from muse.eval.perplexity import perplexity

    torch.set_num_threads(spec["threads"])
    name = spec["variant"]
    r = Result(name, VARIANTS[name][0])
    t0 = time.perf_counter()
    m = load_variant(name, spec["dirs"])
    r.load_s = time.perf_counter() - t0
    ids = eval_ids(spec["text"], spec["tokens"], m.tokenizer)
    decode(m, ids[:64], spec["new_tokens"])  # what the speed phase does, once, for its memory
    r.peak_rss_mb = peak_rss_mb()
    r.file_bytes, r.weight_bytes = file_bytes(name, m), weight_bytes(m)
    r.tokens = len(ids) - 1
    if name == "fp32":
        r.perplexity, r.kl, r.kl_p99, r.same_top1 = perplexity(m, ids).perplexity, 0.0, 0.0, 100.0
    else:
        import math

        import muse

        kl = kl_divergence(muse.load(precision="fp32"), m, ids)
        r.perplexity, r.kl, r.kl_p99, r.same_top1 = math.exp(kl.loss_other), kl.mean, kl.p99, kl.same_top1
    return dataclasses.asdict(r)


def decode(m, prompt: list[int], n: int) -> float:
    """tok/s of n greedy single-token steps after prefilling `prompt` (batch 1, KV cache)."""
    import torch

    from muse import KVCache

    net = m.model
    with torch.inference_mode():
        cache = KVCache(net.config, 1, len(prompt) + n + 1, net.dtype, net.device)
        logits, _ = net(torch.tensor([prompt]), cache=cache, last_only=True)
        tok = int(logits[0, -1].argmax())
        t0 = time.perf_counter()
        for _ in range(n):
            logits, _ = net(torch.tensor([[tok]]), cache=cache, last_only=True)
            tok = int(logits[0, -1].argmax())
        return n / (time.perf_counter() - t0)


def worker_speed(spec: dict) -> dict:
    """Every variant in one process, decode runs interleaved round-robin; median tok/s each."""
    import torch

    torch.set_num_threads(spec["threads"])
    models = {name: load_variant(name, spec["dirs"]) for name in spec["variants"]}
    prompt = eval_ids(spec["text"], 64, next(iter(models.values())).tokenizer)[:64]
    for m in models.values():  # warm-up: first touch of the weights, kernel load
        decode(m, prompt[:16], 4)
    runs = {name: [] for name in models}
    for _ in range(spec["rounds"]):
        for name, m in models.items():
            runs[name].append(decode(m, prompt, spec["new_tokens"]))
    return runs


WORKERS = {"prepare": worker_prepare, "variant": worker_variant, "speed": worker_speed}


# ------------------------------------------------------------------------------------------
# the parent
# ------------------------------------------------------------------------------------------


def run_worker(spec: dict, workdir: Path, env: dict, timeout: float):
    tag = spec["phase"] + ("-" + spec["variant"] if "variant" in spec else "")
    spec_path, out_path = workdir / f"{tag}.spec.json", workdir / f"{tag}.out.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path), "--out", str(out_path)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    if proc.returncode != 0 or not out_path.is_file():
        return None, f"exit {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return json.loads(out_path.read_text()), None


def fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def table(results: dict[str, Result]) -> tuple[list[str], list[list[str]]]:
    base = results.get("fp32")
    head = ["variant", "file MB", "weights MB", "peak RSS MB", "decode tok/s", "x fp32", "perplexity",
            "KL vs fp32", "KL p99", "top-1 = fp32"]
    rows = []
    for r in results.values():
        if r.error:
            rows.append([r.label, f"failed: {r.error}"] + [""] * (len(head) - 2))
            continue
        group = VARIANTS[r.variant][1].get("group")
        label = r.label + (f" (groups {r.groups})" if group and r.groups != str(group) else "")
        speedup = r.decode_tps / base.decode_tps if base and base.decode_tps and r.decode_tps else None
        rows.append([label, fmt(r.file_bytes and r.file_bytes / 1e6), fmt(r.weight_bytes and r.weight_bytes / 1e6),
                     fmt(r.peak_rss_mb, ",.0f"), fmt(r.decode_tps), fmt(speedup, ".2f") + "x",
                     fmt(r.perplexity, ".3f"), fmt(r.kl, ".5f"), fmt(r.kl_p99, ".4f"), fmt(r.same_top1, ".1f") + "%"])
    return head, rows


def verdicts(results: dict[str, Result]) -> list[str]:
    lines = []
    for name, what, limit in TARGETS:
        r, base = results.get(name), results.get("fp32")
        if r is None or r.error or base is None or base.error:
            continue
        if what == "KL":
            ok, got = r.kl is not None and r.kl < limit, f"KL {fmt(r.kl, '.5f')} (target < {limit})"
        else:
            ratio = r.decode_tps / base.decode_tps if r.decode_tps and base.decode_tps else None
            ok, got = ratio is not None and ratio >= limit, f"decode {fmt(ratio, '.2f')}x fp32 (target >= {limit}x)"
        lines.append(f"{'PASS' if ok else 'MISS'}  {VARIANTS[name][0]}: {got}")
    return lines


def print_table(header: str, head: list[str], rows: list[list[str]], footer: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=170)
    console.print(header, highlight=False)
    t = Table(title="Quantized variants of the default model", title_justify="left")
    for i, h in enumerate(head):
        t.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        t.add_row(*row)
    console.print(t)
    console.print("\n".join(footer), highlight=False)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="UTF-8 text for perplexity and KL "
                    "(default: the tinyshakespeare corpus next to the repository)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of --text to score (default 4096)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--new-tokens", type=int, default=64, help="decoded tokens per run (default 64)")
    ap.add_argument("--rounds", type=int, default=5, help="decode runs per variant, round-robin (default 5)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 256 tokens, 16 decoded, 1 round")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="S",
                    help="before timing decode, wait up to S seconds for other processes to use < 10%% CPU")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from generate import OtherLoad, wait_idle

    if args.worker:
        spec = json.loads(args.worker.read_text())
        args.out.write_text(json.dumps(WORKERS[spec["phase"]](spec)))
        return
    if not args.text.is_file():
        raise SystemExit(f"No text at {args.text}: pass --text FILE (any UTF-8 text of a few thousand words).")
    if args.quick:
        args.tokens, args.new_tokens, args.rounds = 256, 16, 1
    variants = list(dict.fromkeys(["fp32", *args.variants]))  # fp32 is the reference

    with tempfile.TemporaryDirectory(prefix="muse-bench-compress-") as tmp:
        workdir = Path(tmp)
        env = dict(os.environ, MUSE_HOME=str(workdir / "home"), OMP_NUM_THREADS=str(args.threads),
                   TOKENIZERS_PARALLELISM="false")
        env.pop("MUSE_CACHE", None)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        base = {"variants": variants, "dirs": {n: str(workdir / n) for n in variants}, "threads": args.threads,
                "text": str(args.text), "tokens": args.tokens, "new_tokens": args.new_tokens, "rounds": args.rounds}
        t0, load0 = time.perf_counter(), os.getloadavg()
        print(f"preparing {', '.join(variants)} …", file=sys.stderr)
        groups, error = run_worker({**base, "phase": "prepare"}, workdir, env, args.timeout)
        if error:
            raise SystemExit(f"preparing the variants failed: {error}")
        results = {}
        for name in variants:
            print(f"measuring {name} …", file=sys.stderr)
            out, error = run_worker({**base, "phase": "variant", "variant": name}, workdir, env, args.timeout)
            results[name] = Result(**out) if out else Result(name, VARIANTS[name][0], error=error)
            results[name].groups = groups.get(name)
        ok = [n for n in variants if not results[n].error]
        if args.wait_idle:
            wait_idle(args.wait_idle)
        print(f"timing decode of {', '.join(ok)} (round-robin) …", file=sys.stderr)
        with OtherLoad() as other:
            runs, error = run_worker({**base, "variants": ok, "phase": "speed"}, workdir, env, args.timeout)
        for name, tps in (runs or {}).items():
            results[name].decode_runs, results[name].decode_tps = tps, statistics.median(tps)
        load1 = os.getloadavg()

    import torch

    header = (f"SmolLM2-135M-Instruct · {args.tokens} tokens of {args.text.name} · {args.threads} threads · "
              f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}) · load average "
              f"{load0[0]:.1f} → {load1[0]:.1f} on {os.cpu_count()} CPUs, other processes used {other.pct:.0f}% "
              f"of the CPUs while decode was timed · {time.perf_counter() - t0:.0f} s")
    head, rows = table(results)
    footer = verdicts(results)
    if error:
        footer.append(f"decode timing failed: {error}")
    print_table(header, head, rows, footer)
    if args.json:
        args.json.write_text(json.dumps({"header": header, "results": [dataclasses.asdict(r) for r in results.values()]},
                                        indent=2))


if __name__ == "__main__":
    main()
