"""Prefill / decode benchmark: Muse vs transformers vs llama.cpp on one GGUF file.

    .venv/bin/python bench/generate.py                      # everything, 2 threads (a few minutes)
    .venv/bin/python bench/generate.py --quick              # smoke test: few tokens, one run
    .venv/bin/python bench/generate.py --threads 1 --engines muse-auto llama.cpp --json out.json
    .venv/bin/python bench/generate.py --model qwen2.5-0.5b --engines muse-w4a8 llama.cpp

The model is SmolLM2-135M-Instruct (Q4_1 GGUF, bundled with Muse) unless --model names another
bundled model (installed: `muse models install NAME`) or a GGUF file. Every engine runs in
its own subprocess (this script re-invoked with --worker), so peak RSS is per engine, on
the same token ids (Muse's tokenizer) and the same thread count. Muse loads from a
temporary MUSE_HOME: a first subprocess converts the GGUF ("first load"), the benchmark
subprocess then loads the converted cache ("load").

Engines: muse-auto (Q4_1/Q8_0 blocks kept packed, Muse's int4/int8 kernels), muse-fp32,
muse-bf16 (the file dequantized), tf-fp32, tf-bf16 (transformers from the same GGUF),
llama.cpp (llama-cpp-python on the GGUF itself).

Columns
  first load s      Muse only: load that converts the GGUF into the cache (warm page cache)
  load s            Muse: cached load (memory-map); others: their one way of loading
  prefill N tok/s   one forward of an N-token prompt into a fresh KV cache, median of runs
  decode tok/s      batch 1, greedy, --new-tokens single-token forwards after a 128-token
                    prompt (EOS ignored, argmax per step included), median of --runs runs
  x tf fp32 / x llama.cpp   decode speed relative to those engines (with --rounds, the median of
                    the per-round ratios: engines measured back to back, round after round)
  MB/token          weight bytes a decode step reads: Muse auto its packed buffers (codes,
                    scales, mins) plus float params; fp32 4 B/param; bf16 2 B/param;
                    llama.cpp the GGUF's tensor data. KV-cache reads are not counted.
  bound tok/s       measured read bandwidth / MB per token; "% of bound" = decode / bound
  peak RSS MB       peak RSS of the engine's process (imports, load and benchmark; VmHWM)
  other CPU %       CPU time used by *other* processes while the engine's subprocesses ran,
                    as % of all CPUs: on a shared machine, numbers with a high value here
                    are contended (--wait-idle waits for a quiet machine before each engine)
  KL vs fp32        mean over the positions of a fixed text of KL(P_muse_fp32 || P_engine)
                    of the next-token distributions (Muse fp32 = the file dequantized
                    exactly, the reference), in nats
  greedy = tf fp32  whether the engine's greedy tokens for the decode prompt equal
                    transformers fp32's (else the index of the first difference)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENGINES = {  # name -> label
    "muse-auto": "Muse auto (int4/int8)",
    "muse-w4a8": "Muse w4a8 (int8 activations)",
    "muse-fp32": "Muse fp32",
    "muse-bf16": "Muse bf16",
    "tf-fp32": "transformers fp32",
    "tf-bf16": "transformers bf16",
    "llama.cpp": "llama.cpp (the GGUF as is)",
}
REFERENCE_KL = ("muse-fp32", "tf-fp32")  # first one present is the KL reference
REFERENCE_GREEDY = "tf-fp32"

# A fixed passage. The prompts are its first 128 / 512 tokens (repeated to length);
# the KL text is the passage itself.
PASSAGE = (
    "The first lighthouses were fires lit on hilltops to guide ships into harbour. The most "
    "famous, the Pharos of Alexandria, stood for more than a thousand years and gave its name "
    "to the word for lighthouse in several languages. For centuries the light itself changed "
    "little: wood, then coal, then candles and oil lamps, whose weak and smoky flames could be "
    "seen only a few miles out to sea. Two inventions of the late eighteenth and early "
    "nineteenth centuries transformed them. The Argand lamp, with its hollow circular wick and "
    "glass chimney, burned far brighter and cleaner than any lamp before it. Then Augustin "
    "Fresnel, a French engineer, designed a lens built from concentric rings of glass prisms "
    "that bent the light of a single lamp into a narrow, powerful beam. A Fresnel lens could be "
    "seen more than twenty miles away, and its weight was a fraction of that of a solid lens of "
    "the same size. Keepers lived at the lights with their families, trimming wicks, winding "
    "the clockwork that turned the lens, and keeping logs of the weather and passing ships. "
    "Electric lamps arrived at the end of the nineteenth century, and in the twentieth "
    "automation slowly made the keepers unnecessary. Today most lighthouses are run remotely, "
    "their beams backed up by radio beacons and satellite navigation, yet many are still kept "
    "lit, both as aids to sailors and as monuments to the people who tended them through long "
    "winter nights. Some have become museums, others guest houses, and a few, on remote rocks "
    "far from any road, are visited only by the engineers who service their equipment once or "
    "twice a year."
)
DECODE_PROMPT_TOKENS = 128
PREFILL_LENGTHS = (128, 512)


# ------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------


@dataclass
class WorkerSpec:
    """What the parent asks a worker to do (written as JSON next to its result)."""

    engine: str
    phase: str  # "convert" (Muse first load only) | "bench"
    threads: int
    prompts: dict[str, list[int]]  # str(length) -> ids, for prefill
    decode_prompt: list[int]
    new_tokens: int
    runs: int
    prefill_runs: int
    kl_ids: list[int]
    logprobs_path: str  # where the worker saves (T, V) float32 log-probs for the KL text
    gguf: str  # the model file every engine loads


@dataclass
class EngineResult:
    engine: str
    label: str
    error: str | None = None
    first_load_s: float | None = None  # Muse: converting load
    first_load_peak_rss_mb: float | None = None
    load_s: float | None = None
    cached: bool | None = None  # Muse: did "load" really come from the cache
    first_forward_s: float | None = None  # warm-up (includes building/loading kernels)
    prefill_tps: dict[str, float] = field(default_factory=dict)  # str(prompt length) -> tok/s
    decode_tps: float | None = None  # median
    decode_tps_runs: list[float] = field(default_factory=list)
    engine_reported_decode_tps: float | None = None  # llama.cpp's own perf counters
    greedy_tokens: list[int] = field(default_factory=list)
    greedy_stable: bool | None = None  # identical tokens in every decode run
    weight_bytes: int | None = None
    base_rss_mb: float | None = None  # after imports, before load
    peak_rss_mb: float | None = None
    kl_vs_ref: float | None = None
    greedy_vs_ref: str | None = None
    other_cpu_pct: float | None = None  # CPU used by other processes during this engine's run
    busy_decode_tps: float | None = None  # --busy: decode with a busy loop on one CPU
    round_decode_tps: list[float] = field(default_factory=list)  # --rounds: each round's median decode
    round_ratios: dict[str, list[float]] = field(default_factory=dict)  # --rounds: "llama.cpp" -> per-round x


# ------------------------------------------------------------------------------------------
# engines: load(); start(ids, room) -> next greedy token (prefill); step(tok) -> next token;
# logprobs(ids) -> (T, V) float32 numpy; weight_bytes()
# ------------------------------------------------------------------------------------------


class MuseEngine:
    def __init__(self, precision: str, threads: int, gguf: Path):
        self.precision, self.gguf = precision, gguf

    def load(self) -> tuple[float, bool]:
        import muse

        self.m = muse.load(self.gguf, precision=self.precision)
        self.model = self.m.model
        return self.m.info["load_seconds"], bool(self.m.info.get("cached"))

    def start(self, ids: list[int], room: int) -> int:
        import torch
        from muse import KVCache
        from muse.cpu import adapt_threads

        adapt_threads()  # as stream_generate does before a prompt and per token
        with torch.inference_mode():
            self.cache = KVCache(self.model.config, 1, len(ids) + room + 1, self.model.dtype, self.model.device)
            logits, _ = self.model(torch.tensor([ids]), cache=self.cache, last_only=True)  # (1, 1, V)
            return int(logits[0, -1].argmax())

    def step(self, tok: int) -> int:
        import torch
        from muse.cpu import adapt_threads

        adapt_threads()
        with torch.inference_mode():
            logits, _ = self.model(torch.tensor([[tok]]), cache=self.cache, last_only=True)
            return int(logits[0, -1].argmax())

    def logprobs(self, ids: list[int]):
        import torch
        from muse import KVCache

        with torch.inference_mode():
            if self.precision != "w4a8":
                logits, _ = self.model(torch.tensor([ids]))  # (1, T, V)
                return torch.log_softmax(logits[0].float(), -1).numpy()
            # w4a8 rounds activations only on decode-sized inputs (prefill is exact): score
            # the text one token at a time, as decoding computes it
            cache = KVCache(self.model.config, 1, len(ids), self.model.dtype, self.model.device)
            rows = [self.model(torch.tensor([[t]]), cache=cache)[0][0, -1] for t in ids]  # T x (V,)
            return torch.log_softmax(torch.stack(rows).float(), -1).numpy()

    def weight_bytes(self) -> int:
        # state_dict holds the persistent tensors: packed qweight/scales/mins and float
        # params (not the RoPE tables). With tied embeddings wte is also the head.
        tensors = {t.data_ptr(): t for t in self.model.state_dict().values()}
        return sum(t.nbytes for t in tensors.values())


class TransformersEngine:
    def __init__(self, dtype: str, threads: int, gguf: Path):
        self.dtype_name, self.gguf = dtype, gguf

    def load(self) -> tuple[float, bool]:
        import torch
        from transformers import AutoModelForCausalLM

        path = self.gguf
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[self.dtype_name]
        t0 = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        self.model.eval()
        return time.perf_counter() - t0, False

    def _forward(self, ids: list[list[int]], past=None) -> int:
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor(ids), past_key_values=past, use_cache=True, logits_to_keep=1)
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def start(self, ids: list[int], room: int) -> int:
        return self._forward([ids])

    def step(self, tok: int) -> int:
        return self._forward([[tok]], self.past)

    def logprobs(self, ids: list[int]):
        import torch

        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids])).logits[0]  # (T, V)
            return torch.log_softmax(logits.float(), -1).numpy()

    def weight_bytes(self) -> int:
        return sum(p.nbytes for p in self.model.parameters())  # tied weights counted once


class LlamaCppEngine:
    N_CTX = 1024

    def __init__(self, precision: str, threads: int, gguf: Path):
        self.threads, self.gguf = threads, gguf

    def _open(self, n_ctx: int, logits_all: bool = False):
        from llama_cpp import Llama

        return Llama(model_path=str(self.gguf), n_threads=self.threads, n_threads_batch=self.threads,
                     n_ctx=n_ctx, n_batch=512, logits_all=logits_all, verbose=False)

    def load(self) -> tuple[float, bool]:
        import llama_cpp  # noqa: F401  (import time is not load time)

        t0 = time.perf_counter()
        self.llm = self._open(self.N_CTX)
        return time.perf_counter() - t0, False

    def _next(self) -> int:
        import llama_cpp
        import numpy as np

        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)  # the last evaluated position
        return int(np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).argmax())

    def start(self, ids: list[int], room: int) -> int:
        self.llm.reset()  # the next eval drops the KV cache from position 0
        self.llm.eval(ids)
        return self._next()

    def step(self, tok: int) -> int:
        self.llm.eval([tok])
        return self._next()

    def reported_decode_tps(self) -> float | None:
        """llama.cpp's own counter (single-token evals since the last reset)."""
        import llama_cpp

        d = llama_cpp.llama_perf_context(self.llm.ctx)
        return d.n_eval / (d.t_eval_ms / 1e3) if d.n_eval and d.t_eval_ms > 0 else None

    def reset_perf(self) -> None:
        import llama_cpp

        llama_cpp.llama_perf_context_reset(self.llm.ctx)

    def logprobs(self, ids: list[int]):
        import numpy as np

        self.llm.close()  # a second context that keeps every position's logits
        llm = self._open(len(ids) + 16, logits_all=True)
        llm.eval(ids)
        logits = llm.scores[: len(ids)].astype(np.float64)
        llm.close()
        logits -= logits.max(-1, keepdims=True)
        return (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)

    def weight_bytes(self) -> int:
        import gguf

        return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(self.gguf)).tensors)


def make_engine(name: str, threads: int, gguf: Path):
    kind, _, precision = name.partition("-")
    cls = {"muse": MuseEngine, "tf": TransformersEngine, "llama.cpp": LlamaCppEngine}[kind]
    return cls(precision, threads, gguf)


def gguf_path(model: str = "smollm2-135m") -> Path:
    """The GGUF file of a bundled model (its parts joined under MUSE_HOME if need be), or `model`
    itself when it is a .gguf path."""
    from muse.checkpoints.registry import find_bundled, install

    if model.endswith(".gguf"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise SystemExit(f"No such GGUF file: {path}")
        return path.resolve()
    bundled = find_bundled(model)
    if bundled is None:
        raise SystemExit(f"--model must be a bundled model (see `muse models list`) or a .gguf file, not {model!r}")
    try:
        return install(bundled.name, pip_install=False)
    except Exception as e:
        raise SystemExit(f"{bundled.name} is not installed ({e}); run `muse models install {bundled.name}` first")


# ------------------------------------------------------------------------------------------
# measurements (in the worker)
# ------------------------------------------------------------------------------------------


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """This process's peak RSS. Linux: VmHWM, since ru_maxrss survives exec and so can
    report the parent's peak from before the fork."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def time_prefill(engine, ids: list[int], runs: int) -> float:
    """Median tok/s of one forward over `ids` into a fresh cache."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        engine.start(ids, 0)
        times.append(time.perf_counter() - t0)
    return len(ids) / statistics.median(times)


def time_decode(engine, ids: list[int], n: int) -> tuple[float, list[int]]:
    """tok/s of n greedy single-token steps after prefilling `ids`; and the n + 1 tokens."""
    tokens = [engine.start(ids, n)]
    t0 = time.perf_counter()
    for _ in range(n):
        tokens.append(engine.step(tokens[-1]))
    return n / (time.perf_counter() - t0), tokens


def run_worker(spec: WorkerSpec) -> EngineResult:
    import numpy as np

    if not spec.engine.startswith("llama"):
        import torch

        torch.set_num_threads(spec.threads)
    r = EngineResult(spec.engine, ENGINES[spec.engine])
    engine = make_engine(spec.engine, spec.threads, Path(spec.gguf))
    r.base_rss_mb = rss_mb()
    load_s, cached = engine.load()
    if spec.phase == "convert":
        r.first_load_s, r.first_load_peak_rss_mb, r.cached = load_s, peak_rss_mb(), cached
        return r
    r.load_s, r.cached = load_s, cached

    t0 = time.perf_counter()  # warm-up: first touch of mmapped weights, kernel build/load
    time_decode(engine, spec.decode_prompt[:16], 4)
    r.first_forward_s = time.perf_counter() - t0
    for length, ids in spec.prompts.items():
        r.prefill_tps[length] = time_prefill(engine, ids, spec.prefill_runs)
    runs = []
    for _ in range(spec.runs):
        if hasattr(engine, "reset_perf"):
            engine.reset_perf()
        tps, tokens = time_decode(engine, spec.decode_prompt, spec.new_tokens)
        runs.append((tps, tokens))
    r.decode_tps_runs = [tps for tps, _ in runs]
    r.decode_tps = statistics.median(r.decode_tps_runs)
    r.greedy_tokens = runs[0][1]
    r.greedy_stable = all(tokens == r.greedy_tokens for _, tokens in runs)
    if hasattr(engine, "reported_decode_tps"):
        r.engine_reported_decode_tps = engine.reported_decode_tps()
    r.peak_rss_mb = peak_rss_mb()  # before the KL pass, which holds (T, V) logits
    r.weight_bytes = engine.weight_bytes()
    np.save(spec.logprobs_path, engine.logprobs(spec.kl_ids))
    return r


# ------------------------------------------------------------------------------------------
# the parent: machine, bandwidth, prompts, one subprocess per engine, comparison, tables
# ------------------------------------------------------------------------------------------


def machine_info(threads: int) -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from muse import quant

    flags = sorted(f for f in quant._cpu_flags() if f.startswith(("avx", "fma", "f16c", "amx")))
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_flags": flags,
            "muse_isa": quant.kernel_isa(), "threads": threads,
            "python": platform.python_version(), "loadavg_start": list(os.getloadavg())}
    for mod in ("transformers", "llama_cpp"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if info["llama_cpp"]:
        import llama_cpp

        system = llama_cpp.llama_print_system_info().decode(errors="replace")
        names = [f.split("=")[0].split(":")[-1].strip() for f in system.split("|") if f.strip().endswith("= 1")]
        info["llama_cpp_isa"] = " ".join(n for n in names if n.startswith(("AVX", "FMA", "F16C")))
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gb"] = round(psutil.virtual_memory().total / 1e9, 1)
    except ImportError:
        pass
    return info


def measure_bandwidth(threads: int, gib: float = 1.0, repeats: int = 7) -> dict:
    """Median GB/s of summing (read) and copying (read + write) a `gib` GiB fp32 tensor."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2**30) // 4)
    y = torch.empty_like(x)
    x.sum(), y.copy_(x)  # first touch
    read, copy = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        read.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        y.copy_(x)
        copy.append(time.perf_counter() - t0)
    return {"read_gbps": x.nbytes / statistics.median(read) / 1e9,
            "copy_gbps": 2 * x.nbytes / statistics.median(copy) / 1e9, "gib": gib}


def token_ids(gguf: Path) -> tuple[dict[str, list[int]], list[int], list[int]]:
    """(prefill prompts by length, decode prompt, KL text), from Muse's tokenizer."""
    from muse.checkpoints.gguf_file import open_reader
    from muse.tokenizer import Tokenizer

    passage = Tokenizer.from_gguf(open_reader(gguf)).encode(PASSAGE)
    repeated = passage * (max(PREFILL_LENGTHS) // len(passage) + 1)
    prompts = {str(n): repeated[:n] for n in PREFILL_LENGTHS}
    return prompts, repeated[:DECODE_PROMPT_TOKENS], passage


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class OtherLoad:
    """Share of all CPUs used by processes other than ours (and our children) while in the block."""

    def __enter__(self):
        self.t, self.busy, self.ours = time.perf_counter(), busy_cpu_s(), children_cpu_s()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t
        others = (busy_cpu_s() - self.busy) - (children_cpu_s() - self.ours)
        self.pct = max(0.0, 100 * others / (wall * (os.cpu_count() or 1)))


class BusyLoop:
    """A process spinning on one CPU (the last this process may use) while in the block: the
    browser tab or compile job a user's laptop always has."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            os.sched_setaffinity(self.proc.pid, {max(os.sched_getaffinity(0))})
        except (AttributeError, OSError):
            pass
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def wait_idle(max_wait_s: float, below_pct: float = 10.0) -> float:
    """Wait (up to max_wait_s) until other processes use < below_pct of the CPUs over 2 s."""
    deadline = time.perf_counter() + max_wait_s
    while True:
        with OtherLoad() as load:
            time.sleep(2)
        if load.pct < below_pct or time.perf_counter() >= deadline:
            return load.pct


def run_subprocess(spec: WorkerSpec, workdir: Path, env: dict, timeout: float) -> EngineResult:
    spec_path = workdir / f"{spec.engine}-{spec.phase}.spec.json"
    out_path = workdir / f"{spec.engine}-{spec.phase}.result.json"
    spec_path.write_text(json.dumps(dataclasses.asdict(spec)))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path), "--out", str(out_path)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return EngineResult(spec.engine, ENGINES[spec.engine], error=f"timed out after {timeout:.0f} s")
    if proc.returncode != 0 or not out_path.is_file():
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return EngineResult(spec.engine, ENGINES[spec.engine], error=f"exit {proc.returncode}: {tail}")
    return EngineResult(**json.loads(out_path.read_text()))


def worker_env(threads: int, muse_home: Path) -> dict:
    env = dict(os.environ, MUSE_HOME=str(muse_home), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_engine(name: str, base: dict, workdir: Path, env: dict, timeout: float, convert: bool = True) -> EngineResult:
    """Muse: a converting load in one process (unless not `convert`), then the benchmark from
    the cache in another."""
    make = lambda phase: WorkerSpec(engine=name, phase=phase, **base,  # noqa: E731
                                    logprobs_path=str(workdir / f"{name}.logprobs.npy"))
    first = None
    with OtherLoad() as load:
        if name.startswith("muse") and convert:
            first = run_subprocess(make("convert"), workdir, env, timeout)
        if first is None or not first.error:
            r = run_subprocess(make("bench"), workdir, env, timeout)
    if first is not None and first.error:
        return first
    r.other_cpu_pct = load.pct
    if first is not None:
        r.first_load_s, r.first_load_peak_rss_mb = first.first_load_s, first.first_load_peak_rss_mb
        if first.cached:
            r.error = (r.error or "") + " (first load did not convert: the cache already existed)"
    return r


def median_rounds(rounds: list[dict[str, EngineResult]]) -> dict[str, EngineResult]:
    """Each engine's median round (by decode tok/s; its first-load figures from round 1), holding
    the per-round decode ratios against tf-fp32 and llama.cpp measured in the same round."""
    results = {}
    for name in rounds[0]:
        ok = [r[name] for r in rounds if not r[name].error and r[name].decode_tps]
        if not ok:
            results[name] = rounds[0][name]
            continue
        pick = sorted(ok, key=lambda r: r.decode_tps)[(len(ok) - 1) // 2]
        pick.first_load_s = pick.first_load_s or rounds[0][name].first_load_s
        pick.first_load_peak_rss_mb = pick.first_load_peak_rss_mb or rounds[0][name].first_load_peak_rss_mb
        pick.round_decode_tps = [r.decode_tps for r in ok]
        results[name] = pick
        pick.round_ratios = {ref: [r[name].decode_tps / r[ref].decode_tps for r in rounds
                              if ref in r and r[name].decode_tps and r[ref].decode_tps]
                        for ref in ("tf-fp32", "llama.cpp") if ref != name}
    return results


def compare(results: dict[str, EngineResult], workdir: Path) -> str | None:
    """Fill KL vs the fp32 reference and greedy agreement with transformers fp32."""
    import numpy as np

    ok = {n: r for n, r in results.items() if not r.error}
    ref = next((n for n in REFERENCE_KL if n in ok), None)
    if ref is not None:
        logp_ref = np.load(workdir / f"{ref}.logprobs.npy").astype(np.float64)
        p_ref = np.exp(logp_ref)
        for n, r in ok.items():
            logp = np.load(workdir / f"{n}.logprobs.npy").astype(np.float64)
            r.kl_vs_ref = float((p_ref * (logp_ref - logp)).sum(-1).mean())
    if REFERENCE_GREEDY in ok:
        want = ok[REFERENCE_GREEDY].greedy_tokens
        for r in ok.values():
            diff = next((i for i, (a, b) in enumerate(zip(r.greedy_tokens, want)) if a != b), None)
            r.greedy_vs_ref = "yes" if diff is None else f"no (token {diff})"
    return ref


# ------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------


def fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def fmt_kl(kl: float | None) -> str:
    # float32 log-probs leave ~1e-9 of rounding: an exactly equal distribution can read as -3e-9
    return "-" if kl is None else ("0 (< 1e-7)" if abs(kl) < 1e-7 else f"{kl:.2e}")


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def versus(r: EngineResult, name: str, ref: EngineResult | None) -> str:
    """r's decode speed relative to engine `name`: the median of the per-round ratios with --rounds."""
    per_round = r.round_ratios.get(name)
    if per_round and len(per_round) > 1:
        return f"{statistics.median(per_round):.2f}x"
    return ratio(r.decode_tps, ref and ref.decode_tps)


def tables(results: dict[str, EngineResult], bandwidth: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    tf = results.get("tf-fp32")
    lc = results.get("llama.cpp")
    speed_rows, mem_rows = [], []
    for r in results.values():
        if r.error:
            speed_rows.append([r.label, f"skipped: {r.error}"] + [""] * 8)
            continue
        speed_rows.append([
            r.label, fmt(r.first_load_s, ".2f"), fmt(r.load_s, ".2f"),
            *(fmt(r.prefill_tps.get(str(n)), ",.0f") for n in PREFILL_LENGTHS),
            fmt(r.decode_tps), versus(r, "tf-fp32", tf), versus(r, "llama.cpp", lc),
            fmt(r.peak_rss_mb, ",.0f"), fmt(r.other_cpu_pct, ".0f"),
        ])
        bound = bandwidth["read_gbps"] * 1e9 / r.weight_bytes if r.weight_bytes else None
        mem_rows.append([
            r.label, fmt(r.weight_bytes and r.weight_bytes / 1e6), fmt(bound),
            fmt(bound and 100 * r.decode_tps / bound, ".0f") + "%",
            fmt_kl(r.kl_vs_ref), r.greedy_vs_ref or "-",
        ])
    speed_head = ["engine", "first load s", "load s", *(f"prefill {n} tok/s" for n in PREFILL_LENGTHS),
                  "decode tok/s", "x tf fp32", "x llama.cpp", "peak RSS MB", "other CPU %"]
    mem_head = ["engine", "MB/token", "bound tok/s", "% of bound", "KL vs fp32", "greedy = tf fp32"]
    parts = [("Speed", speed_head, speed_rows),
             (f"Bandwidth bound ({bandwidth['read_gbps']:.1f} GB/s read) and precision", mem_head, mem_rows)]
    busy = [r for r in results.values() if r.busy_decode_tps is not None]
    if busy:
        lc_busy = lc and lc.busy_decode_tps
        rows = [[r.label, fmt(r.decode_tps), fmt(r.busy_decode_tps),
                 fmt(100 * r.busy_decode_tps / r.decode_tps, ".0f") + "%" if r.decode_tps else "-",
                 ratio(r.busy_decode_tps, lc_busy)] for r in busy]
        parts.append(("Under load: a busy loop on one CPU", ["engine", "decode idle tok/s", "decode loaded tok/s",
                                                            "kept", "x llama.cpp loaded"], rows))
    return parts


def print_tables(header: str, parts, footer: list[str]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(header)
        for title, head, rows in parts:
            print(f"\n{title}")
            widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
            for row in [head] + rows:
                print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        print("\n".join(footer))
        return
    console = Console()
    if not console.is_terminal:  # piped / redirected: don't squeeze the tables into 80 columns
        console = Console(width=150)
    console.print(header)
    for title, head, rows in parts:
        t = Table(title=title, title_justify="left")
        for i, h in enumerate(head):
            t.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0)
        for row in rows:
            t.add_row(*row)
        console.print(t)
    console.print("\n".join(footer))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads and llama.cpp n_threads (default 2)")
    ap.add_argument("--model", default="smollm2-135m",
                    help="a bundled model (default smollm2-135m; others after `muse models install`) or a .gguf file")
    ap.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    ap.add_argument("--new-tokens", type=int, default=None, help="decoded tokens per run (default 128; --quick 16)")
    ap.add_argument("--runs", type=int, default=None, help="decode runs, median reported (default 3; --quick 1)")
    ap.add_argument("--quick", action="store_true", help="smoke test: few tokens, one run of each")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--muse-home", type=Path, default=None,
                    help="MUSE_HOME for the Muse engines (default: a fresh temp dir, so 'first load' converts)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per engine subprocess")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="S",
                    help="before each engine, wait up to S seconds for other processes to use < 10%% CPU")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the engines round-robin this many times; each engine's row is its median round, "
                         "and the ratios are medians of per-round ratios (a shared machine drifts between runs)")
    ap.add_argument("--busy", action="store_true",
                    help="also run each engine with a busy loop on one CPU and report the decode speed kept")
    from muse.quant import ISAS

    ap.add_argument("--isa", default=None, choices=ISAS,
                    help="force Muse's kernels onto this instruction set (sets MUSE_CPU); default: the CPU's best")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: a WorkerSpec JSON
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        spec = WorkerSpec(**json.loads(args.worker.read_text()))
        args.out.write_text(json.dumps(dataclasses.asdict(run_worker(spec))))
        return
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    new_tokens = args.new_tokens if args.new_tokens is not None else (16 if args.quick else 128)
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    if new_tokens < 1 or runs < 1 or args.rounds < 1:
        raise SystemExit(f"--new-tokens, --runs and --rounds must be >= 1, got {new_tokens}, {runs}, {args.rounds}")

    if args.isa:
        os.environ["MUSE_CPU"] = args.isa  # the workers inherit it
    machine = machine_info(args.threads)
    print(f"{machine['cpu']}, {machine['logical_cpus']} CPUs, load average {machine['loadavg_start'][0]:.2f}; "
          "measuring memory bandwidth ...", flush=True)
    bandwidth = measure_bandwidth(args.threads, gib=0.25 if args.quick else 1.0)
    gguf = gguf_path(args.model)
    prompts, decode_prompt, kl_ids = token_ids(gguf)
    base = dict(threads=args.threads, prompts=prompts, decode_prompt=decode_prompt, new_tokens=new_tokens,
                runs=runs, prefill_runs=1 if args.quick else 3, kl_ids=kl_ids, gguf=str(gguf))

    rounds: list[dict[str, EngineResult]] = []
    with tempfile.TemporaryDirectory(prefix="muse-bench-") as tmp:
        workdir = Path(tmp)
        env = worker_env(args.threads, args.muse_home or workdir / "muse_home")
        for k in range(args.rounds):
            rounds.append({})
            for name in args.engines:
                if name == "llama.cpp" and machine["llama_cpp"] is None:
                    rounds[k][name] = EngineResult(name, ENGINES[name], error="llama_cpp is not importable")
                    continue
                if args.wait_idle > 0:
                    wait_idle(args.wait_idle)
                print(f"  {ENGINES[name]}{f' (round {k + 1} of {args.rounds})' if args.rounds > 1 else ''} ...",
                      flush=True)
                # each Muse engine converts into its own fresh cache (w4a8 would find auto's), once
                own = env if args.muse_home else {**env, "MUSE_HOME": str(workdir / f"home-{name}")}
                rounds[k][name] = run_engine(name, base, workdir, own, args.timeout, convert=k == 0)
        results = median_rounds(rounds)
        for name in args.engines:
            if args.busy and not results[name].error:
                print(f"  {ENGINES[name]}, with a busy loop on one CPU ...", flush=True)
                with BusyLoop():
                    loaded = run_engine(name, base, workdir, own, args.timeout, convert=False)
                results[name].busy_decode_tps = loaded.decode_tps
        ref = compare(results, workdir)
    machine["loadavg_end"] = list(os.getloadavg())

    header = (f"\n{gguf.name} | {machine['cpu']} ({machine['logical_cpus']} logical CPUs"
              f"{', ' + str(machine.get('physical_cores')) + ' cores' if machine.get('physical_cores') else ''}, "
              f"{machine['cpu_capability']}) | torch {machine['torch']}, transformers {machine['transformers']}, "
              f"llama_cpp {machine['llama_cpp']} | {args.threads} threads\n"
              f"CPU flags: {' '.join(machine['cpu_flags']) or '?'} | Muse kernels: {machine['muse_isa']}"
              f"{' (forced)' if args.isa else ''} | llama.cpp built for: {machine.get('llama_cpp_isa') or '-'}\n"
              f"decode: {len(decode_prompt)}-token prompt + {new_tokens} greedy tokens, median of {runs}; "
              f"bandwidth: {bandwidth['read_gbps']:.1f} GB/s read, {bandwidth['copy_gbps']:.1f} GB/s copy "
              f"({bandwidth['gib']:g} GiB); load average {machine['loadavg_start'][0]:.2f} -> "
              f"{machine['loadavg_end'][0]:.2f}")
    footer = []
    if ref:
        footer.append(f"KL reference: {ENGINES[ref]}, over {len(kl_ids)} positions.")
    mf, tf = results.get("muse-fp32"), results.get("tf-fp32")
    if mf and tf and not mf.error and not tf.error:
        footer.append(f"Muse fp32 greedy output equals transformers fp32: {mf.greedy_vs_ref == 'yes' and 'yes' or 'no'}"
                      f" ({len(tf.greedy_tokens)} tokens).")
    contended = [r.label for r in results.values() if (r.other_cpu_pct or 0) >= 10]
    if contended:
        footer.append(f"Other processes used >= 10% of the CPUs during: {', '.join(contended)}; "
                      "those numbers are contended (see 'other CPU %').")
    for r in results.values():
        if len(r.round_decode_tps) > 1:
            lc = r.round_ratios.get("llama.cpp")
            footer.append(f"{r.label}: decode by round {', '.join(f'{x:.1f}' for x in r.round_decode_tps)} tok/s"
                          + (f"; x llama.cpp by round {', '.join(f'{x:.2f}' for x in lc)}" if lc else ""))
    unstable = [r.label for r in results.values() if r.greedy_stable is False]
    if unstable:
        footer.append(f"Greedy tokens differed between decode runs for: {', '.join(unstable)}.")
    print_tables(header, tables(results, bandwidth), footer)

    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "bandwidth": bandwidth, "new_tokens": new_tokens,
                                         "runs": runs, "kl_reference": ref,
                                         "results": [dataclasses.asdict(r) for r in results.values()]}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
