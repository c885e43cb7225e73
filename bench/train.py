"""Training speed and quality: tokens/s, MFU, peak memory, wall time and val loss of Muse's loop.

    python bench/train.py --anchor        # nanoGPT's CPU shakespeare_char run, side by side with Muse
    python bench/train.py                 # a short run of each preset (tokens/s, MFU, memory)
    python bench/train.py --presets shakespeare-char-cpu tiny --iters 30 --compile

The anchor is nanoGPT's train.py with its CPU shakespeare_char settings (4 layers, 4 heads, 128
wide, block 64, batch 12, 2000 iters, lr 1e-3 → 1e-4, warmup 100, beta2 0.99, dropout 0,
eval_iters 20, log_interval 1, no compile) on the character-level Tiny Shakespeare split: val
loss 1.886 in 136 s of wall time on the reference 2-core machine. --anchor runs, each in its
own process, on the same split:

  nanogpt            nanoGPT's loop and model re-implemented in plain PyTorch (bench/nanogpt_ref.py)
                     with nanoGPT's batch sampling: it reproduces the 1.886 and times it on this machine
  nanogpt (Muse's batches + init)   the same loop fed Muse's batches and initial weights
  muse, nanoGPT's recipe            Muse's train() with nanoGPT's hyperparameters: its losses
                     must equal the line above step for step (the loops do the same arithmetic)
  muse, preset defaults             `muse train --preset shakespeare-char-cpu` as shipped: the peak
                     lr measured for this preset and dtype "auto" (bf16 autocast on CPUs with native
                     bf16, fp32 elsewhere); the same model, batch, steps and schedule shape

Wall-time ratios are against the nanogpt row run here and against nanoGPT's 136 s. "val loss"
is the 20-batch estimate both loops log; "full val" is the loss over every window of the val
split (far less noisy). MFU is against this machine's measured matmul peak in the run's dtype. Each
configuration runs in its own process, so peak memory (max RSS) is its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
NANOGPT_WALL_S, NANOGPT_VAL = 136.0, 1.886

PRESETS = {  # preset name -> (model overrides, batch size); block sizes are the presets'
    "shakespeare-char-cpu": ({"dropout": 0.0}, 12),
    "shakespeare-char": ({}, 12),  # nanoGPT's GPU shakespeare_char shapes (10.7M params, block 256)
    "tiny": ({"vocab_size": 65}, 12),  # a small Llama (RMSNorm, RoPE, SwiGLU, GQA)
    "llama-small": ({"vocab_size": 65}, 8),  # llama-100m's shapes cut to 4 layers x 256 wide
}
LLAMA_SMALL = dict(arch="llama", vocab_size=65, n_layer=4, n_head=8, n_kv_head=4, n_embd=256,
                   intermediate_size=688, block_size=256)


def char_data() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """nanoGPT's shakespeare_char prepare.py: sorted characters as the vocabulary, 90/10 split."""
    text = SHAKESPEARE.read_text(encoding="utf-8")
    chars = sorted(set(text))
    lut = np.zeros(max(map(ord, chars)) + 1, dtype=np.uint16)
    lut[[ord(c) for c in chars]] = np.arange(len(chars))
    ids = lut[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]
    n = int(0.9 * len(ids))
    return ids[:n], ids[n:], chars


def matmul_peak(dtype: torch.dtype = torch.float32, sizes: tuple[int, ...] = (1024, 2048, 3072),
                repeats: int = 5) -> float:
    """Best GFLOP/s of square `dtype` matmuls on this machine (all threads torch uses). Another
    process on the machine lowers it, so MFU figures are only as good as a quiet machine."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm up
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def flops_per_token(config) -> float:
    """Training FLOPs per token (forward + backward): 6 x params + attention (nanoGPT's estimate)."""
    n = config.num_params() - (config.block_size * config.n_embd if config.pos == "learned" else 0)
    return 6 * n + 12 * config.n_layer * config.n_head * config.head_dim * config.block_size


@torch.no_grad()
def full_val_loss(model, val_ids: np.ndarray, block: int, batch: int = 64) -> float:
    """Mean loss over every non-overlapping window of the val split (a far less noisy figure than
    the 20 random batches nanoGPT's eval_iters=20 averages)."""
    model.eval()
    n = (len(val_ids) - 1) // block
    starts = np.arange(n) * block
    total = 0.0
    for i in range(0, n, batch):
        idx = starts[i:i + batch, None] + np.arange(block + 1)
        chunk = torch.from_numpy(val_ids[idx].astype(np.int64))
        _, loss = model(chunk[:, :-1], chunk[:, 1:])
        total += loss.item() * len(idx)
    return total / n


ANCHOR_RUNS = ("nanogpt", "nanogpt-muse-batches", "anchor", "anchor-preset")
ANCHOR_NAMES = {"nanogpt": "nanogpt", "nanogpt-muse-batches": "nanogpt (Muse's batches+init)",
                "anchor": "muse, nanoGPT's recipe", "anchor-preset": "muse, preset defaults"}


def anchor_config(preset_defaults: bool, compile_: bool, seed: int):
    """nanoGPT's CPU shakespeare_char settings; with preset_defaults, the preset's own measured ones on top."""
    from muse.training import TrainConfig

    settings = dict(max_iters=2000, batch_size=12, warmup_iters=100, lr_decay_iters=2000, beta2=0.99,
                    weight_decay=0.1, grad_clip=1.0, eval_interval=250, eval_iters=20, log_interval=1,
                    compile=compile_, seed=seed, progress=False)
    if preset_defaults:  # dtype "auto": bf16 autocast where the CPU has native bf16
        return TrainConfig.for_preset("shakespeare-char-cpu", **settings)
    return TrainConfig(learning_rate=1e-3, min_lr=1e-4, dtype="fp32", **settings)  # nanoGPT on a CPU: fp32


def run_reference(name: str, seed: int) -> dict:
    """The nanoGPT baseline (bench/nanogpt_ref.py) in this process; with Muse's batches and init for
    the step-for-step comparison."""
    import nanogpt_ref as ref
    from muse.config import ModelConfig
    from muse.model import Transformer
    from muse.training import TokenBatches

    start = time.perf_counter()
    train_ids, val_ids, chars = char_data()
    batches = init = None
    gelu = "none"  # nanoGPT's nn.GELU()
    if name == "nanogpt-muse-batches":
        data = TokenBatches(train_ids, val_ids, ref.BLOCK, seed=seed)
        batches = lambda split, step: data.batch(split, step, 0, ref.BATCH)  # noqa: E731
        init = Transformer(ModelConfig.from_name("shakespeare-char-cpu", dropout=0.0)).init_weights(seed).state_dict()
        gelu = "tanh"  # Muse's GPT-2 blocks use GPT-2's tanh GELU
    r = ref.run(train_ids, val_ids, len(chars), seed, batches=batches, init=init, gelu=gelu)
    wrapped = lambda x, y: (None, r["model"](x, y))  # noqa: E731  full_val_loss wants (logits, loss)
    wrapped.eval = r["model"].eval
    return {"name": name, "params": sum(p.numel() for p in r["model"].parameters()), "block": ref.BLOCK,
            "batch": ref.BATCH, "iters": ref.ITERS, "compile": False, "val_loss": r["val_loss"],
            "final_val_loss": r["val_loss"], "train_wall_s": r["train_wall_s"],
            "run_wall_s": time.perf_counter() - start,
            "tokens_per_s": ref.ITERS * ref.BATCH * ref.BLOCK / r["train_wall_s"],
            "ms_per_iter": 1000 * r["train_wall_s"] / ref.ITERS, "train_losses": r["train_losses"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "plot": "-",
            "flops_per_token": flops_per_token(ModelConfig.from_name("shakespeare-char-cpu")),
            "full_val_loss": full_val_loss(wrapped, val_ids, ref.BLOCK)}


def run_one(name: str, iters: int, compile_: bool, anchor: bool, out: Path, seed: int = 1337,
            dtype: str | None = None) -> dict:
    """Train one configuration in this process and return its figures."""
    from muse.config import ModelConfig
    from muse.model import Transformer
    from muse.training import TokenBatches, TrainConfig, train

    if name.startswith("nanogpt"):
        return run_reference(name, seed)
    start = time.perf_counter()  # data preparation + model build + train()
    train_ids, val_ids, chars = char_data()
    if anchor:
        config = ModelConfig.from_name("shakespeare-char-cpu", dropout=0.0)
        cfg = anchor_config(name == "anchor-preset", compile_, seed)
        if dtype and name == "anchor-preset":
            cfg = dataclasses.replace(cfg, dtype=dtype)
        batch = 12
    else:
        overrides, batch = PRESETS[name]
        config = (ModelConfig(**LLAMA_SMALL) if name == "llama-small"
                  else ModelConfig.from_name(name, **overrides))
        cfg = TrainConfig(max_iters=iters, batch_size=batch, warmup_iters=min(100, iters), eval_interval=iters,
                          eval_iters=5, log_interval=max(1, iters // 5), compile=compile_, progress=False)
    data = TokenBatches(train_ids, val_ids, config.block_size, seed=seed)
    model = Transformer(config).init_weights(seed)
    t = time.perf_counter()
    result = train(model, data, cfg, out)
    train_wall = time.perf_counter() - t
    logs = [r for r in result.metrics if "tokens_per_s" in r]
    # Steady-state speed: skip the first fifth (allocator warm-up, compilation).
    steady = logs[len(logs) // 5:] or logs
    tok_s = float(np.median([r["tokens_per_s"] for r in steady]))
    from muse.training.loop import resolve_dtype

    return {
        "name": name, "params": config.num_params(), "lr": cfg.learning_rate,
        "dtype": str(resolve_dtype(cfg.dtype, torch.device("cpu"))).replace("torch.", ""),
        "train_losses": [r["train_loss"] for r in result.metrics if "train_loss" in r], "block": config.block_size,
        "batch": batch, "iters": cfg.max_iters, "compile": compile_, "val_loss": result.best_val_loss,
        "final_val_loss": [r["val_loss"] for r in result.metrics if "val_loss" in r][-1],
        "train_wall_s": train_wall, "run_wall_s": time.perf_counter() - start,
        "ms_per_iter": 1000 * config.block_size * batch / tok_s, "tokens_per_s": tok_s,
        "avg_tokens_per_s": result.tokens_per_s, "flops_per_token": flops_per_token(config),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "plot": str(result.plot_file),
        "full_val_loss": full_val_loss(model, val_ids, config.block_size),  # the final weights
    }


def child(args) -> None:
    out = Path(args.out)
    print(json.dumps(run_one(args.child, args.iters, args.compile, args.child.startswith("anchor"), out, args.seed,
                             args.dtype)))


# What --isa avx2 sets for every run: torch's own vector kernels, MKL's and oneDNN's GEMMs limited
# to AVX2 (+FMA), the instruction set of most laptops, on a CPU that has more.
# Muse's own kernels (GELU, attention) take their AVX2 build.
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "MUSE_CPU": "avx2"}
FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


def spawn(name: str, iters: int, compile_: bool, out: Path, seed: int, dtype: str | None = None,
          env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--iters", str(iters), "--out", str(out), "--seed", str(seed)]
    if compile_:
        cmd.append("--compile")
    if dtype:
        cmd += ["--dtype", dtype]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_wall_s": wall}  # python start to exit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--anchor", action="store_true", help="nanoGPT's CPU shakespeare_char run (2000 iters)")
    p.add_argument("--presets", nargs="*", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--iters", type=int, default=40, help="iterations per preset (not for --anchor)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=1337, help="model init and batch sampling seed")
    p.add_argument("--out", default=None, help="directory for the runs (default: a temp dir)")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16"),
                   help="the preset run's dtype (default: the preset's \"auto\": bf16 where the CPU has it natively)")
    p.add_argument("--isa", default=None, choices=("avx2",),
                   help="limit torch, MKL and oneDNN to AVX2+FMA, as on most laptops (this CPU may have more)")
    p.add_argument("--runs", nargs="*", choices=ANCHOR_RUNS, help="with --anchor: only these runs (default all four)")
    p.add_argument("--repeat", type=int, default=1, help="rounds of the runs, interleaved; the median wall is reported")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    out = Path(args.out or tempfile.mkdtemp(prefix="muse-bench-train-"))
    load = os.getloadavg()
    if args.isa:
        os.environ.update(AVX2_ENV)  # before this process's first matmul, for the peak below
    peaks = {"float32": matmul_peak()}
    if args.dtype != "fp32":  # the preset run may train in bf16
        peaks["bfloat16"] = matmul_peak(torch.bfloat16)
    from muse import quant

    quant.kernels_available()  # build Muse's kernels for this ISA now, not inside the first timed run
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    print(f"CPU flags: {' '.join(f for f in FLAGS if f in flags) or '?'} | torch kernels: "
          f"{torch.backends.cpu.get_cpu_capability()} | Muse kernels: {quant.kernel_isa()}"
          f"{' (forced with --isa ' + args.isa + ')' if args.isa else ''}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, matmul peak fp32 {peaks['float32']:,.1f} "
          f"/ bf16 {peaks.get('bfloat16', 0):,.1f} GFLOP/s, "
          f"load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    names = (args.runs or list(ANCHOR_RUNS)) if args.anchor else args.presets
    walls: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(args.repeat):  # rounds interleave the runs, so a slow spell hits each alike
        for name in names:
            r = spawn(name, args.iters, args.compile, out / f"{name}-{round_}", args.seed, args.dtype,
                      AVX2_ENV if args.isa else None)
            r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / (peaks[r.get("dtype", "float32")] * 1e9)
            walls[name].append(r)
            print(f"  {ANCHOR_NAMES.get(name, name)}: val loss {r['final_val_loss']:.4f}, {r['process_wall_s']:.1f} s",
                  file=sys.stderr, flush=True)
    # Each configuration's run of median wall time stands for it.
    rows = [sorted(runs, key=lambda r: r["process_wall_s"])[len(runs) // 2] for runs in walls.values()]
    if args.repeat > 1:
        for name, runs in walls.items():
            per_round = ", ".join(f"{r['process_wall_s']:.1f}" for r in runs)
            print(f"{ANCHOR_NAMES.get(name, name)}: wall per round {per_round} s")
    print_table(rows)
    if args.anchor:
        print_anchor(rows)
        if args.repeat > 1:
            print_round_ratios(walls)
    load = os.getloadavg()
    print(f"load average after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"loss curves: {', '.join(r['plot'] for r in rows if r['plot'] != '-')}")


SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def print_table(rows: list[dict]) -> None:
    head = (f"{'run':<32}{'params':>8}{'block':>6}{'batch':>6}{'iters':>6}{'dtype':>6}{'tok/s':>9}{'ms/iter':>8}"
            f"{'MFU':>7}{'peak MB':>8}{'train s':>8}{'proc s':>8}{'val loss':>9}{'full val':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{ANCHOR_NAMES.get(r['name'], r['name']):<32}{r['params'] / 1e6:>7.2f}M{r['block']:>6}{r['batch']:>6}"
              f"{r['iters']:>6}{SHORT.get(r.get('dtype', 'float32'), '?'):>6}{r['tokens_per_s']:>9,.0f}{r['ms_per_iter']:>8.1f}{100 * r['mfu']:>6.1f}%"
              f"{r['peak_rss_mb']:>8.0f}{r['train_wall_s']:>8.1f}{r['process_wall_s']:>8.1f}"
              f"{r['final_val_loss']:>9.4f}{r['full_val_loss']:>9.4f}")


def print_anchor(rows: list[dict]) -> None:
    by = {r["name"]: r for r in rows}
    ref, twin, same, preset = (by.get(n) for n in ANCHOR_RUNS)
    if twin and same:
        diff = np.abs(np.array(twin["train_losses"]) - np.array(same["train_losses"]))
        print(f"\nparity: Muse's loop vs nanoGPT's on the same batches and initial weights: train losses differ by at "
              f"most {diff.max():.2e} over {len(diff)} steps (mean {diff.mean():.1e}); final val loss "
              f"{same['final_val_loss']:.4f} vs {twin['final_val_loss']:.4f}")
    if ref is None:
        return
    print(f"nanogpt here: val loss {ref['final_val_loss']:.4f} (nanoGPT's own run: {NANOGPT_VAL}) in "
          f"{ref['process_wall_s']:.1f} s (nanoGPT's own run: {NANOGPT_WALL_S:.0f} s)")
    for r, target in ((same, 1.88), (preset, 1.80)):
        if r is None:
            continue
        print(f"{ANCHOR_NAMES[r['name']]} (peak lr {r['lr']:g}, {r['dtype']}): val loss {r['final_val_loss']:.4f}, full val "
              f"{r['full_val_loss']:.4f}; wall {r['process_wall_s']:.1f} s = {r['process_wall_s'] / ref['process_wall_s']:.2f}"
              f" x the nanogpt run here, {r['process_wall_s'] / NANOGPT_WALL_S:.2f} x nanoGPT's {NANOGPT_WALL_S:.0f} s "
              f"(target: val loss <= {target} in <= 0.80 x)")


def print_round_ratios(walls: dict[str, list[dict]]) -> None:
    """Each Muse run's wall time over the nanogpt run of its own round, and the median."""
    if "nanogpt" not in walls:
        return
    for name in ("anchor", "anchor-preset"):
        if name in walls:
            ratios = [r["process_wall_s"] / ref["process_wall_s"] for r, ref in zip(walls[name], walls["nanogpt"])]
            print(f"{ANCHOR_NAMES[name]} / nanogpt, per round: {', '.join(f'{x:.2f}' for x in ratios)}; "
                  f"median {float(np.median(ratios)):.2f}")

if __name__ == "__main__":
    main()
