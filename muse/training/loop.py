"""The one training loop, for pretraining from scratch and for fine-tuning (full or LoRA).

    cfg = TrainConfig(max_iters=2000, batch_size=12, learning_rate=1e-3)
    result = train(model, TokenBatches(train_ids, val_ids, 64), cfg, "runs/shakespeare")
    muse.load("runs/shakespeare/best")      # a normal Muse checkpoint, tokenizer included

What differs between pretraining and fine-tuning is plugged in, not copied: the `BatchSource`
(where x, y come from), `params` (which parameters train) and `save_fn` (what a checkpoint
stores). Everything else lives here once: AdamW with decoupled weight decay on matrices only,
linear warmup + cosine decay, gradient accumulation, clipping, autocast/GradScaler, optional
torch.compile, periodic eval, best/last checkpoints with exact resume, metrics.jsonl, a loss
plot, TensorBoard, a progress bar and torchrun scale-out (`muse.training.distributed`).

Iterations count optimizer steps: iter i (0-based) uses the lr of `lr_at(i, cfg)` and the
batches of step i; after it completes, `iter = i + 1` is what metrics, evals and checkpoints
report. Eval runs when iter is a multiple of eval_interval and at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import io
import json
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

from muse import ops
from muse.checkpoints import HAND_OVER, reporter
from muse.errors import CheckpointError, MuseError
from muse.fileio import disk_full_is_an_error, write_bytes_atomic, write_text_atomic
from muse.generation import per_second
from muse.training import distributed as dist_
from muse.training.batches import BatchSource
from muse.training.state import (find_checkpoint, load_training_state, nothing_to_resume,
                                 save_training_checkpoint, write_checkpoint, capture_rng, restore_rng)

DTYPES = ("auto", "fp32", "bf16", "fp16")
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
PLOT_REFRESH_S = 30.0  # the loss plot is redrawn at evals at most this often, and at the end


# Training settings measured for a model preset, over TrainConfig's defaults (nanoGPT's
# shakespeare_char recipe). shakespeare-char-cpu (0.8M parameters, 2000 steps of 12 × 64
# tokens): peak lr 1e-3 ends at val loss 1.91 / 1.90 (seeds 1337 / 1), 3e-3 at 1.77 / 1.77,
# 5e-3 at 1.77, 8e-3 at 1.79 (bench/train.py --anchor; loss over the whole val split). Its
# evals take 20 batches, as nanoGPT's CPU config does: 200 would add ~18 s to a 70 s run
# (9 evals x 200 forward passes of ~10 ms).
PRESET_TRAINING: dict[str, dict[str, Any]] = {
    "shakespeare-char-cpu": {"learning_rate": 3e-3, "eval_iters": 20},
}


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings for `train()`. Every field is checked on creation.

    Defaults follow nanoGPT's shakespeare_char recipe. Three settings are derived from others
    unless given: min_lr (learning_rate / 10), lr_decay_iters (max_iters) and save_interval
    (eval_interval). They stay None here, so they follow any later change (`dataclasses.replace`,
    overrides on top of a recipe); `resolved()` fills them in, and `train()` runs on that.
    Per optimizer step the loop consumes batch_size * grad_accum * world_size sequences.
    """

    max_iters: int = 2000
    batch_size: int = 12
    grad_accum: int = 1
    learning_rate: float = 1e-3
    min_lr: float | None = None  # None: learning_rate / 10
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # None: max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 250
    eval_iters: int = 200  # 0 disables evaluation (and so the best checkpoint)
    log_interval: int = 10
    save_interval: int | None = None  # None: eval_interval; 0 disables out_dir/last (a final one is still written)
    dtype: str = "auto"  # "auto": bf16 autocast on GPUs and CPUs with native bf16, else fp32
    compile: bool = False
    seed: int = 1337
    tensorboard: bool = False
    progress: bool = True
    distributed: str = "ddp"  # "ddp" | "fsdp" under torchrun
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"

    @classmethod
    def for_preset(cls, preset: str, **settings) -> "TrainConfig":
        """The settings measured best for a model preset (`PRESET_TRAINING`), then `settings` on top."""
        return cls.from_dict({**PRESET_TRAINING.get(preset, {}), **settings})

    def __post_init__(self) -> None:
        self._validate()

    def resolved(self) -> "TrainConfig":
        """This config with its derived settings filled in: the one place they are derived."""
        derived = {name: rule(self) for name, rule in _DERIVED.items() if getattr(self, name) is None}
        return dataclasses.replace(self, **derived) if derived else self

    def _validate(self) -> None:
        def integer(name: str, low: int) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")

        def number(name: str, ok: Callable[[float], bool], what: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not ok(v):
                raise ValueError(f"{name} must be {what}, got {v!r}")

        for name in ("max_iters", "batch_size", "grad_accum", "eval_interval", "log_interval"):
            integer(name, 1)
        for name in ("warmup_iters", "eval_iters", "seed"):
            integer(name, 0)
        for name in ("lr_decay_iters", "save_interval"):
            if getattr(self, name) is not None:  # None: derived (always valid when what it follows is)
                integer(name, 0)
        number("learning_rate", lambda v: v > 0, "> 0")
        if self.min_lr is not None:
            number("min_lr", lambda v: 0 <= v <= self.learning_rate, f"in [0, learning_rate={self.learning_rate}]")
        number("weight_decay", lambda v: v >= 0, ">= 0")
        number("beta1", lambda v: 0 <= v < 1, "in [0, 1)")
        number("beta2", lambda v: 0 <= v < 1, "in [0, 1)")
        number("grad_clip", lambda v: v >= 0, ">= 0 (0 disables clipping)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.distributed not in dist_.STRATEGIES:
            raise ValueError(f"distributed must be one of {dist_.STRATEGIES}, got {self.distributed!r}")
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu", "cuda")
                                                   or self.device.startswith("cuda:")):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        for name in ("compile", "tensorboard", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """A TrainConfig from settings by name; an unknown name is an error naming the known ones."""
        check_names(data, {"training": cls.names()})
        return cls(**data)

    @classmethod
    def names(cls) -> list[str]:
        return sorted(f.name for f in dataclasses.fields(cls))


# The settings derived from others unless given (see TrainConfig).
_DERIVED: dict[str, Callable[[TrainConfig], Any]] = {
    "min_lr": lambda cfg: cfg.learning_rate / 10,
    "lr_decay_iters": lambda cfg: cfg.max_iters,
    "save_interval": lambda cfg: cfg.eval_interval,
}


def check_names(given: Iterable[str], known: dict[str, list[str]]) -> None:
    """A ValueError naming each unknown setting (with the closest known one) and listing the known
    settings, per kind: known = {"model": [...], "training": [...]}."""
    everything = sorted(n for names in known.values() for n in names)
    unknown = [n for n in given if n not in everything]
    if not unknown:
        return
    named = []
    for name in unknown:
        close = difflib.get_close_matches(str(name), everything, n=1)
        named.append(f"{name} (did you mean {close[0]}?)" if close else str(name))
    kinds = " or ".join(known)
    lists = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in known.items())
    raise ValueError(f"unknown {kinds} setting{'s' if len(unknown) > 1 else ''}: {', '.join(named)}. "
                     f"Known settings, {lists}.")


@dataclass
class TrainResult:
    best_val_loss: float  # inf when no eval ran
    iter: int  # optimizer steps completed
    out_dir: Path
    last: Path | None  # out_dir/last (resumable)
    best: Path | None  # out_dir/best (lowest val loss)
    metrics_file: Path
    plot_file: Path | None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    tokens_per_s: float = 0.0  # training tokens (all ranks) per second of training time this run
    elapsed: float = 0.0  # seconds of training, resumed runs included


def lr_at(it: int, cfg: TrainConfig) -> float:
    """Learning rate of step `it`: linear warmup, cosine decay to min_lr, then min_lr (nanoGPT's schedule)."""
    cfg = cfg.resolved()
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters or cfg.lr_decay_iters <= cfg.warmup_iters:
        return cfg.min_lr  # after decay (or no room to decay: a run shorter than its warmup)
    ratio = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 → 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (≥2-D: linears, embeddings) only, not on norms and biases."""
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)  # one kernel for all parameters
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 dot products (AVX512-BF16 or AMX). There bf16 autocast trains faster
    than fp32 (shakespeare-char-cpu on 2 Zen 4 cores: 21 vs 29 ms a step, same val loss); on other
    CPUs bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace").split()
    except OSError:  # not Linux: stay with fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: "auto" is bf16 on GPUs with fast bf16 and on CPUs with native bf16, else fp32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("dtype='fp16' needs a GPU; use dtype='bf16' or 'fp32' on the CPU")
    return dtype


class _CompiledOrEager:
    """torch.compile(module), falling back to eager (with one warning) if compiling fails."""

    def __init__(self, module: nn.Module):
        self.eager = module
        self.compiled = torch.compile(module)
        self.failed = False

    def __call__(self, *args, **kwargs):
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # compile errors surface on the first call
                self.failed = True
                warnings.warn(f"torch.compile failed ({type(e).__name__}: {e}); training continues in eager mode.",
                              stacklevel=2)
        return self.eager(*args, **kwargs)


class _Metrics:
    """metrics.jsonl (one JSON object per log or eval line), TensorBoard and the loss plot. Rank 0 only."""

    def __init__(self, out_dir: Path, resume_iter: int | None, tensorboard: bool):
        self.file = out_dir / METRICS_FILE
        self.plot_file = out_dir / PLOT_FILE
        self.rows: list[dict[str, Any]] = []
        if resume_iter is not None and self.file.exists():
            # Drop what the interrupted run logged after its checkpoint: those steps run again.
            self.rows = [r for r in read_metrics(self.file) if r["iter"] <= resume_iter]
        write_text_atomic(self.file, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.fh = open(self.file, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # checked importable by train()

            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_iter)
        self._plot_warned = False
        self._plotted_at = time.monotonic()

    def refresh_plot(self) -> None:
        """Redraw the loss plot during training, at most every PLOT_REFRESH_S seconds: drawing
        it takes about 0.25 s, which every eval paid (2 s of a 70 s CPU run); `plot()` at
        the end draws the final one."""
        if time.monotonic() - self._plotted_at >= PLOT_REFRESH_S:
            self.plot()

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with disk_full_is_an_error(self.file):
            self.fh.write(json.dumps(row) + "\n")
            self.fh.flush()
        if self.tb is not None:
            for key, value in row.items():
                if key != "iter" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else key,
                                       value, row["iter"])
            self.tb.flush()

    def plot(self) -> Path | None:
        """Write the train/val loss curves as a PNG (atomically). Skipped with a warning without matplotlib."""
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure  # no pyplot: never touches the user's backend
        except ImportError:
            if not self._plot_warned:
                warnings.warn("matplotlib is not installed, so no loss plot: pip install matplotlib==3.11.2")
                self._plot_warned = True
            return None
        fig = Figure(figsize=(7, 4.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for key, label in (("train_loss", "train"), ("val_loss", "val")):
            pts = [(r["iter"], r[key]) for r in self.rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=label, marker="o" if key == "val_loss" else None, markersize=3)
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        self._plotted_at = time.monotonic()
        return write_bytes_atomic(self.plot_file, png.getvalue())

    def close(self) -> None:
        with disk_full_is_an_error(self.file):  # closing flushes what a failed log() left buffered
            self.fh.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(file: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl. A half-written last line (the run was killed while logging) is
    dropped with a warning; a bad line before it is an error naming the line."""
    lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("iter"), int):
                raise ValueError("not a metrics row")
        except ValueError:
            if n < len(lines):
                raise MuseError(f"Line {n} of {file} is not a metrics row: {line[:80]!r}. Fix or delete that "
                                "line, then resume again.") from None
            warnings.warn(f"{file} ended in a half-written line (the run was stopped while logging); "
                          f"dropped it: {line[:80]!r}", stacklevel=2)
            continue
        rows.append(row)
    return rows


class _Progress:
    """A rich progress bar with loss, tokens/s and ETA (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def update(self, it: int, info: str | None = None) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=it, **({"info": info} if info is not None else {}))

    def print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _default_save_fn(path: Path, model: nn.Module, tokenizer) -> None:
    from muse.checkpoints import save_checkpoint

    save_checkpoint(path, model, tokenizer, trained_by="muse.training")


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _check_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs the package)
    except ImportError:
        raise MuseError("TensorBoard logging needs the tensorboard package: pip install tensorboard==2.21.0 "
                        "(or run without tensorboard=True / --tensorboard).") from None


def train(model: nn.Module, data: BatchSource, cfg: TrainConfig, out_dir: str | Path, *, tokenizer=None,
          resume: bool = False, params: list[nn.Parameter] | None = None,
          save_fn: Callable[[Path, nn.Module, Any], None] | None = None) -> TrainResult:
    """Train `model` on batches from `data`; write checkpoints and metrics under `out_dir`.

    model: a `muse.Transformer` (or any module with forward(x, targets) -> (logits, loss)); it is
        moved to the training device and trained in place (fp32 weights, autocast per cfg.dtype).
    data: a `BatchSource`; train batches come from split "train", eval batches from "val".
    params: the parameters to train (e.g. LoRA's); default every parameter that requires grad.
        Freeze the others (requires_grad=False) so no gradient is computed for them.
    save_fn(path, model, tokenizer): writes the model part of a checkpoint into the new directory
        `path`; default `muse.save_checkpoint`, so `muse.load(out_dir / "best")` works.
    resume: continue from out_dir/last exactly where it stopped (same losses as an uninterrupted
        run); `cfg` may extend max_iters. Without resume, an out_dir holding a checkpoint is refused.

    Writes out_dir/metrics.jsonl, out_dir/loss.png, out_dir/best (when val loss improves),
    out_dir/last (every save_interval iters and at the end) and out_dir/tensorboard (if asked).
    Under torchrun every rank calls train(); only rank 0 writes.
    """
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    cfg = cfg.resolved()
    if not callable(getattr(data, "batch", None)):
        raise ValueError(f"data must be a BatchSource (with a batch() method), got {type(data).__name__}")
    out_dir = Path(out_dir)
    save_fn = save_fn or _default_save_fn
    if cfg.tensorboard:
        _check_tensorboard()

    # Resume state is read before anything is written, so a bad out_dir changes nothing.
    state = None
    if resume:
        ckpt = find_checkpoint(out_dir)
        if ckpt is None:
            raise nothing_to_resume(out_dir)
        state = load_training_state(ckpt)
    elif find_checkpoint(out_dir) is not None or (out_dir / "last").exists() or (out_dir / "best").exists():
        raise CheckpointError(f"{out_dir} already holds a training run; pass resume=True (--resume) to continue "
                              "it, or choose another output directory.")

    env = dist_.setup(cfg.device)
    finished = False
    try:
        run = _Run(model, data, cfg, out_dir, tokenizer, save_fn, env)
        run.setup(params, state)
        result = run.loop()
        finished = True
        return result
    finally:
        dist_.teardown(env, synchronize=finished)


class _Run:
    """One call of train(): the state the loop carries from step to step, and the loop in named parts.

    setup() builds everything in the order exact resume needs: weights are restored before DDP/FSDP
    wraps the model, the optimizer, scaler and RNG states once the optimizer exists. Then
    loop() runs step() every iteration, evaluate() and checkpoint() at their intervals.
    """

    def __init__(self, model, data, cfg: TrainConfig, out_dir: Path, tokenizer, save_fn, env: dist_.DistEnv):
        self.model, self.data, self.cfg, self.out_dir = model, data, cfg, out_dir
        self.tokenizer, self.save_fn, self.env, self.main = tokenizer, save_fn, env, env.is_main
        self.start_iter, self.best_val, self.elapsed_before = 0, math.inf, 0.0
        self.tokens_this_run = 0

    # -- setup and restore

    def setup(self, params: list[nn.Parameter] | None, state: dict[str, Any] | None) -> None:
        cfg, env = self.cfg, self.env
        self.amp_dtype = resolve_dtype(cfg.dtype, env.device)
        self.model.to(env.device)
        names = _trainable_names(self.model, params)
        _seed_everything(cfg.seed + env.rank)  # dropout differs per rank; data does not depend on it
        if state is not None:
            self.restore_weights(state, names)
        self.module = dist_.wrap(self.model, env, cfg.distributed)
        # FSDP replaces parameters with sharded ones: look the trainable ones up again by name.
        named = dict(self.model.named_parameters())
        self.trainable = {n: named[n] for n in names}
        self.params = list(self.trainable.values())
        # FSDP shards parameters and optimizer state across ranks: checkpoints gather them whole.
        self.sharded = env.distributed and cfg.distributed == "fsdp"
        self.optimizer = make_optimizer(self.params, cfg, env.device)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.amp_dtype == torch.float16)
        if state is not None:
            self.restore_optimizer(state)
        self.forward = _CompiledOrEager(self.module) if cfg.compile else self.module
        self.autocast = (torch.autocast(env.device.type, dtype=self.amp_dtype) if self.amp_dtype != torch.float32
                         else contextlib.nullcontext())
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        resumed_at = self.start_iter if state is not None else None
        self.metrics = _Metrics(self.out_dir, resumed_at, cfg.tensorboard) if self.main else None
        if self.main and cfg.progress:
            reporter()(HAND_OVER, 0, 0)  # a caller's progress line makes way for the training bar
        self.bar = _Progress(self.main and cfg.progress, cfg.max_iters, self.start_iter)
        self.last_dir = None
        self.best_dir = self.out_dir / "best" if (self.out_dir / "best").is_dir() else None  # from before a resume
        self.tokens_per_iter = cfg.batch_size * cfg.grad_accum * env.world * _seq_len(self.data, cfg)

    def restore_weights(self, state: dict[str, Any], names: list[str]) -> None:
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for name in names:
                saved = state["params"].get(name)
                if saved is None or saved.shape != named[name].shape:
                    raise CheckpointError(f"The checkpoint's parameter {name} is missing or has another shape: "
                                          "it was trained with a different model configuration.")
                named[name].copy_(saved)
        self.start_iter, self.best_val, self.elapsed_before = state["iter"], state["best_val_loss"], state["elapsed"]
        _warn_if_changed(state, self.cfg, self.env)

    def restore_optimizer(self, state: dict[str, Any]) -> None:
        """The optimizer, scaler and this rank's RNG states, so the next step is the one the run would have taken."""
        if state.get("sharded", False) != self.sharded:
            raise CheckpointError("This checkpoint was written by a run with another sharding (FSDP vs not): resume "
                                  "it with the same distributed strategy it was trained with.")
        if self.sharded:
            dist_.load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        rank = self.env.rank
        restore_rng(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])

    # -- the loop

    def loop(self) -> TrainResult:
        cfg = self.cfg
        self.t0 = time.perf_counter()
        self.t_log, self.it_log = self.t0, self.start_iter
        self.model.train()
        done = self.start_iter
        if self.start_iter >= cfg.max_iters:
            self.last_dir = find_checkpoint(self.out_dir)  # nothing left to do: max_iters already reached
        on_cpu = self.env.device.type == "cpu"
        flushed = ops.flush_denormals(True) if on_cpu else None  # denormal floats: ~100x slower on x86
        if on_cpu:
            ops.keep_freed_memory()  # reuse each step's activation buffers, not fresh zeroed pages
        try:
            for it in range(self.start_iter, cfg.max_iters):
                self.step(it)
                done = it + 1
                last_step = done == cfg.max_iters
                if cfg.eval_iters > 0 and (done % cfg.eval_interval == 0 or last_step):
                    self.evaluate(done)
                if (cfg.save_interval and done % cfg.save_interval == 0) or last_step:
                    self.checkpoint(done)
        finally:
            if on_cpu:
                ops.flush_denormals(flushed)
                ops.release_freed_memory()
            self.bar.close()
            if self.metrics is not None:
                self.metrics.close()
        return self.result(done)

    def step(self, it: int) -> None:
        """Optimizer step `it` (0-based), then its log line when one is due."""
        lr = lr_at(it, self.cfg)
        loss = self.optimizer_step(it, lr)
        self.tokens_this_run += self.tokens_per_iter
        done = it + 1
        if done % self.cfg.log_interval != 0 and done != self.cfg.max_iters:
            self.bar.update(done)
            return
        train_loss = float(dist_.mean_over_ranks(loss, self.env))
        now = time.perf_counter()
        tok_s = per_second(self.tokens_per_iter * (done - self.it_log), now - self.t_log)
        self.t_log, self.it_log = now, done
        if self.main:
            self.metrics.log({"iter": done, "train_loss": train_loss, "lr": lr, "tokens_per_s": tok_s,
                              "elapsed": self.elapsed_before + now - self.t0})
            self.bar.update(done, f"loss {train_loss:.4f}  {tok_s:,.0f} tok/s")

    def optimizer_step(self, it: int, lr: float) -> torch.Tensor:
        """One optimizer step over grad_accum micro-batches; returns this rank's mean train loss (a tensor)."""
        cfg, env, optimizer, scaler = self.cfg, self.env, self.optimizer, self.scaler
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=env.device)
        for micro in range(cfg.grad_accum):
            x, y = self.data.batch("train", it, micro, cfg.batch_size, env.rank, env.world)
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            # Gradients are all-reduced only on the last micro-step (DDP no_sync before it).
            with dist_.no_sync(self.module, micro < cfg.grad_accum - 1):
                with self.autocast:
                    _, loss = self.forward(x, y)
                scaler.scale(loss / cfg.grad_accum).backward()  # the mean over micro-batches
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum / cfg.grad_accum

    def evaluate(self, done: int) -> None:
        """The val loss after `done` steps: logged, plotted, and out_dir/best when it improved."""
        val = _evaluate(self.model, self.data, self.cfg, self.env, self.autocast)
        improved = val < self.best_val
        if improved:
            self.best_val = val
        to_save = self.model_to_save() if improved else None  # every rank computes the same `improved`
        if self.main:
            self.metrics.log({"iter": done, "val_loss": val, "val_ppl": math.exp(min(val, 700.0)),
                              "elapsed": self.elapsed_before + time.perf_counter() - self.t0})
            self.bar.print(f"iter {done}: val loss {val:.4f}" + ("  (best)" if improved else ""))
            self.metrics.refresh_plot()
            if improved:
                self.best_dir = write_checkpoint(self.out_dir / "best",
                                                 lambda tmp: self.save_fn(tmp, to_save, self.tokenizer))
        dist_.barrier(self.env)

    # -- checkpoints and the result

    def checkpoint(self, done: int) -> None:
        """out_dir/last: the model, and all `resume` needs to continue exactly after step `done`."""
        rngs = _all_rng_states(self.env)  # collectives: every rank takes part
        to_save = self.model_to_save()
        optimizer = self.optimizer
        optim_state = dist_.full_optimizer_state(self.model, optimizer) if self.sharded else optimizer.state_dict()
        if self.main:
            named_now = dict(to_save.named_parameters())
            training_state = {
                "iter": done, "best_val_loss": self.best_val,
                "elapsed": self.elapsed_before + (time.perf_counter() - self.t0),
                "params": {n: named_now[n].detach().cpu() for n in self.trainable},
                "optimizer": optim_state, "scaler": self.scaler.state_dict(), "sharded": self.sharded,
                "config": self.cfg.to_dict(), "world": self.env.world, "rng": rngs,
            }
            self.last_dir = save_training_checkpoint(self.out_dir / "last", training_state,
                                                     lambda tmp: self.save_fn(tmp, to_save, self.tokenizer))
        dist_.barrier(self.env)

    def model_to_save(self) -> nn.Module | None:
        """The model as save_fn sees it: itself, or under FSDP an unsharded copy on rank 0 (collective)."""
        if not self.sharded:
            return self.model
        full = dist_.full_model_state(self.model)
        if not self.main:
            return None
        plain = type(self.model)(self.model.config)  # FSDP checkpoints need a model rebuildable from its config
        plain.load_state_dict(full)
        return plain

    def result(self, done: int) -> TrainResult:
        train_time = time.perf_counter() - self.t0
        plot = self.metrics.plot() if self.main else None
        return TrainResult(
            best_val_loss=self.best_val, iter=done, out_dir=self.out_dir, last=self.last_dir, best=self.best_dir,
            metrics_file=self.out_dir / METRICS_FILE, plot_file=plot,
            metrics=list(self.metrics.rows) if self.main else [],
            tokens_per_s=self.tokens_this_run / train_time if train_time > 0 else 0.0,
            elapsed=self.elapsed_before + train_time,
        )


def _trainable_names(model: nn.Module, params: list[nn.Parameter] | None) -> list[str]:
    """The names of the parameters to train (default: those with requires_grad), in the model's order."""
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("params is empty: nothing to train (every parameter has requires_grad=False)")
    ids = {id(p) for p in params}
    names = [n for n, p in model.named_parameters() if id(p) in ids]
    if len(names) != len(ids):
        raise ValueError("params must be parameters of model")
    return names


def _evaluate(model, data, cfg, env, autocast) -> float:
    """Mean val loss over eval_iters batches (the same batches at every eval), averaged over ranks."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=env.device)
    with torch.no_grad(), autocast:
        for k in range(cfg.eval_iters):
            x, y = data.batch("val", k, 0, cfg.batch_size, env.rank, env.world)
            _, loss = model(x.to(env.device), y.to(env.device))  # not through DDP: no gradients to sync
            total += loss.double()
    model.train()
    return float(dist_.mean_over_ranks(total / cfg.eval_iters, env))


def _all_rng_states(env: dist_.DistEnv) -> list[dict[str, Any]]:
    """Every rank's RNG states (rank order), so dropout resumes exactly on each. Collective."""
    mine = capture_rng()
    if not env.distributed:
        return [mine]
    gathered = [None] * env.world
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


# Settings that change which batches or updates a step sees: the run then continues, but not exactly.
_EXACTNESS_FIELDS = ("batch_size", "grad_accum", "seed", "dtype", "learning_rate", "min_lr", "warmup_iters",
                     "lr_decay_iters", "weight_decay", "beta1", "beta2", "grad_clip")


def _warn_if_changed(state: dict[str, Any], cfg: TrainConfig, env: dist_.DistEnv) -> None:
    saved = state.get("config", {})
    changed = [f"{k} {saved[k]!r} -> {getattr(cfg, k)!r}" for k in _EXACTNESS_FIELDS
               if k in saved and saved[k] != getattr(cfg, k)]
    if state.get("world", 1) != env.world:
        changed.append(f"world size {state.get('world', 1)} -> {env.world}")
    if changed and env.is_main:
        warnings.warn("Resuming with changed settings (" + "; ".join(changed) + "): training continues, but not "
                      "exactly as the interrupted run would have.", stacklevel=5)


def _seq_len(data: BatchSource, cfg: TrainConfig) -> int:
    """Tokens per sequence (for tokens/s): the block size of token batches, else measured once."""
    block = getattr(data, "block_size", None)
    if block is None:
        block = data.batch("train", 0, 0, 1)[0].shape[1]
    return int(block)


def model_setting_names() -> list[str]:
    """The fields of a model preset that `pretrain(overrides=...)` (`muse train --set`) may change."""
    from muse.config import ModelConfig

    return sorted(f.name for f in dataclasses.fields(ModelConfig))


def split_settings(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`muse train --set` values by name: (model overrides, training settings). An unknown name is an
    error naming both kinds of setting."""
    model_names = model_setting_names()
    check_names(settings, {"model": model_names, "training": TrainConfig.names()})
    model = {k: v for k, v in settings.items() if k in model_names}
    return model, {k: v for k, v in settings.items() if k not in model}


def pretrain(data_dir: str | Path, out_dir: str | Path, preset: str, overrides: dict[str, Any] | None = None,
             cfg: TrainConfig | None = None, resume: bool = False) -> TrainResult:
    """Train a model from scratch on a directory prepared by `muse.training.data`.

    The model is `ModelConfig.from_name(preset, vocab_size=<the data's tokenizer>, **overrides)`,
    initialised with cfg.seed; batches are windows of block_size + 1 tokens of train.bin / val.bin.
    Checkpoints carry the data's tokenizer, so `muse.load(out_dir / "best")` generates text.
    """
    from muse.config import ModelConfig
    from muse.model import Transformer
    from muse.training.batches import TokenBatches

    cfg = cfg or TrainConfig.for_preset(preset)
    overrides = dict(overrides or {})
    check_names(overrides, {"model": model_setting_names()})
    probe = ModelConfig.from_name(preset, **{k: v for k, v in overrides.items() if k != "vocab_size"})
    report = reporter()
    report(f"Reading {Path(data_dir).name}", 0, 0)
    data = TokenBatches.from_dir(data_dir, probe.block_size, seed=cfg.seed)
    tokenizer = data.tokenizer
    vocab = overrides.pop("vocab_size", None) or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise ValueError(f"vocab_size ({vocab}) is smaller than the data's tokenizer ({tokenizer.vocab_size} tokens)")
    config = ModelConfig.from_name(preset, vocab_size=vocab, **overrides)
    report(f"Building a {preset} model ({config.num_params() / 1e6:.1f}M parameters)", 0, 0)
    model = Transformer(config).init_weights(cfg.seed)
    return train(model, data, cfg, out_dir, tokenizer=tokenizer, resume=resume)
