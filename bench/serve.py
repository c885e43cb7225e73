"""Server benchmark: aggregate tokens/s and latency of concurrent streams against `muse serve`.

    .venv/bin/python bench/serve.py                         # 1, 4, 8 and 16 streams, default model
    .venv/bin/python bench/serve.py --streams 1 8 --tokens 32 --temperature 0.7 --json out.json

It starts the server itself (a subprocess: uvicorn on a free loopback port, the default model,
continuous batching up to --max-batch rows), warms it up, then for each concurrency C runs C
clients at once; each streams --rounds chat completions one after another (different
prompts, --tokens tokens at most, usage from the final chunk), so C requests are always in
flight. The client is a separate process from the server, so the two do not share a GIL.

Columns
  streams        concurrent clients (requests in flight)
  requests       completions measured at that level
  tokens         completion tokens they generated (from the API's usage)
  tok/s          aggregate: all completion tokens / wall time of the level
  per stream     tok/s / streams: what one client sees
  x 1 stream     aggregate tok/s relative to the 1-stream level (the batching gain)
  tok/CPU-s      completion tokens per CPU-second the server process used: the batching gain
                 as work saved, which other load on the machine disturbs less than wall time
                 (the client's own CPU time is printed per level as it runs: it shares the machine)
  TTFT p50/p90/p99    ms from sending a request to its first text
  total p50/p90/p99   s from sending a request to its last event
A machine shared with other work gives noisy numbers: the load average before and after
each level is printed with the table, and --repeat N reports the fastest of N runs per level.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from muse.checkpoints.weights import PRECISIONS  # noqa: E402  (after the path is set)
from muse.quant import ISAS  # noqa: E402

TOPICS = ["the sea", "a lighthouse keeper", "a robot who learns to paint", "the first snow of winter",
          "a library at night", "a lost umbrella", "two rival bakers", "a comet", "an old map", "a quiet village",
          "the last train home", "a garden on the moon", "a clockmaker", "a storm at sea", "a friendly dragon",
          "a city of bridges"]


def serve_worker(max_batch: int, prefix_cache: int, precision: str) -> None:
    """In the server subprocess: serve the default model until stdin closes; print the port first."""
    import muse
    from muse.server import ServerThread, create_app

    model = muse.load(precision=precision)
    with ServerThread(create_app({"default": model}, embedder=None, max_batch=max_batch,
                                   prefix_cache_tokens=prefix_cache)) as server:
        print(server.port, flush=True)
        sys.stdin.read()  # the benchmark closes our stdin when it is done


async def one_request(client, i: int, tokens: int, temperature: float) -> dict:
    body = {"model": "default", "max_tokens": tokens, "temperature": temperature, "seed": i, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}."}]}
    t0 = time.perf_counter()
    ttft, usage = None, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if ttft is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
            if event.get("usage"):  # the final chunk (stream_options.include_usage)
                usage = event["usage"]
    total = time.perf_counter() - t0
    return {"ttft": ttft if ttft is not None else total, "total": total, "tokens": usage["completion_tokens"]}


async def run_level(url: str, streams: int, rounds: int, tokens: int, temperature: float) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def client_loop(c: int) -> list[dict]:
            return [await one_request(client, c * rounds + k, tokens, temperature) for k in range(rounds)]

        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(c) for c in range(streams)))
        wall = time.perf_counter() - t0
    results = [r for rs in per_client for r in rs]
    return {"streams": streams, "requests": len(results), "tokens": sum(r["tokens"] for r in results),
            "wall_s": wall, "tok_s": sum(r["tokens"] for r in results) / wall,
            "ttft_ms": percentiles([r["ttft"] * 1000 for r in results]),
            "total_s": percentiles([r["total"] for r in results])}


def percentiles(xs: list[float]) -> dict:
    """p50, p90, p99 (linear interpolation between the measured values)."""
    if len(xs) == 1:
        return {"p50": xs[0], "p90": xs[0], "p99": xs[0]}
    q = statistics.quantiles(xs, n=100, method="inclusive")
    return {"p50": q[49], "p90": q[89], "p99": q[98]}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc), or None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def start_server(max_batch: int, prefix_cache: int = 2048, precision: str = "auto") -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve-worker", "--max-batch", str(max_batch),
                             "--prefix-cache", str(prefix_cache), "--precision", precision],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stdout.readline().strip()
    if not line.isdigit():
        proc.kill()
        raise SystemExit(f"the server did not start (it printed {line!r}); run it alone to see why")
    return proc, f"http://127.0.0.1:{line}"


def print_table(rows: list[dict], header: str) -> None:
    base = rows[0]["tok_s"] if rows and rows[0]["streams"] == 1 else None
    cols = ["streams", "requests", "tokens", "tok/s", "per stream", "x 1 stream", "tok/CPU-s", "TTFT p50/p90/p99 ms",
            "total p50/p90/p99 s", "load avg"]
    table = [cols]
    for r in rows:
        t, s = r["ttft_ms"], r["total_s"]
        table.append([str(r["streams"]), str(r["requests"]), str(r["tokens"]), f"{r['tok_s']:.1f}",
                      f"{r['tok_s'] / r['streams']:.1f}", f"{r['tok_s'] / base:.2f}" if base else "-",
                      f"{r['tokens'] / r['server_cpu_s']:.1f}" if r.get("server_cpu_s") else "-",
                      f"{t['p50']:.0f} / {t['p90']:.0f} / {t['p99']:.0f}",
                      f"{s['p50']:.2f} / {s['p90']:.2f} / {s['p99']:.2f}",
                      f"{r['load'][0]:.1f} → {r['load'][1]:.1f}"])
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    print(header)
    for row in table:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16], help="concurrency levels")
    ap.add_argument("--tokens", type=int, default=64, help="max_tokens of every request")
    ap.add_argument("--rounds", type=int, default=2, help="requests each client makes, one after another")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    ap.add_argument("--prefix-cache", type=int, default=2048, help="the server's --prefix-cache (0 = off)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each level this many times and report the fastest (the least disturbed on a shared "
                         "machine)")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS, help="the server's --precision")
    ap.add_argument("--isa", default=None, choices=ISAS,
                    help="force Muse's kernels onto this instruction set (sets MUSE_CPU); default: the CPU's best")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--serve-worker", action="store_true", help=argparse.SUPPRESS)  # internal
    args = ap.parse_args(argv)
    if args.isa:
        os.environ["MUSE_CPU"] = args.isa  # the server subprocess inherits it
    if args.serve_worker:
        return serve_worker(args.max_batch, args.prefix_cache, args.precision)
    proc, url = start_server(args.max_batch, args.prefix_cache, args.precision)
    try:
        asyncio.run(run_level(url, 2, 1, 8, args.temperature))  # warm-up: kernels, allocator, first requests
        rows = []
        for c in args.streams:
            runs = []
            for _ in range(args.repeat):
                before, cpu, own = os.getloadavg()[0], cpu_seconds(proc.pid), time.process_time()
                runs.append(asyncio.run(run_level(url, c, args.rounds, args.tokens, args.temperature)))
                runs[-1]["client_cpu_s"] = time.process_time() - own
                runs[-1]["load"] = (before, os.getloadavg()[0])
                cpu_after = cpu_seconds(proc.pid)
                runs[-1]["server_cpu_s"] = cpu_after - cpu if cpu is not None and cpu_after is not None else None
                r = runs[-1]
                print(f"  {c} streams: {r['tok_s']:.1f} tok/s, wall {r['wall_s']:.2f} s, CPU s: server "
                      f"{r['server_cpu_s'] or 0:.2f}, client {r['client_cpu_s']:.2f}", flush=True, file=sys.stderr)
            rows.append(max(runs, key=lambda r: r["tok_s"]))
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    isa = args.isa or os.environ.get("MUSE_CPU") or "the CPU's best"
    print_table(rows, f"muse serve, SmolLM2-135M-Instruct (default model), precision {args.precision}, kernels {isa}, "
                      f"{os.cpu_count()} CPUs, max_tokens "
                      f"{args.tokens}, temperature {args.temperature}, {args.rounds} requests per stream, prefix "
                      f"cache {args.prefix_cache or 'off'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
