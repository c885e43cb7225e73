"""The training loop: batches, schedule, accumulation, checkpoints, exact resume after SIGKILL."""

from __future__ import annotations

import json
import math
import platform
import signal
import string
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import muse
from muse.config import ModelConfig
from muse.errors import CheckpointError, MuseError
from muse.model import Transformer
from muse.training import TokenBatches, TrainConfig, lr_at, train
from muse.training.state import STATE_FILE, load_training_state
from tests.helpers import shakespeare_text
from torch.optim.optimizer import register_optimizer_step_pre_hook

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# A ~30k-parameter GPT-2 style model: big enough to learn characters, small enough for seconds.
TINY = dict(arch="gpt2", vocab_size=65, n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False, qkv_bias=False)
QUIET = dict(progress=False, log_interval=1)


def char_tokenizer(chars: list[str]):
    """A character-level `muse.tokenizer.Tokenizer` (one token per character)."""
    import tokenizers
    from tokenizers import Regex, decoders, models, pre_tokenizers

    from muse.tokenizer import Tokenizer

    backend = tokenizers.Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=chars[0]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return Tokenizer(backend, bos_token=None, eos_tokens=[], pad_token=None, add_bos=False, chat_template=None)


@pytest.fixture(scope="module")
def shakespeare():
    """(train ids, val ids, tokenizer): char-level, nanoGPT's 90/10 split."""
    # As long as Tiny Shakespeare and in its 65 characters; from the package, not ../shared.
    allowed = set("\n !$&',-.3:;?" + string.ascii_letters)
    text = "".join(c for c in shakespeare_text(1_200_000) if c in allowed)[:1_115_394]
    chars = sorted(set(text))
    lut = {c: i for i, c in enumerate(chars)}
    ids = np.array([lut[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    return ids[:n], ids[n:], char_tokenizer(chars)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    return Transformer(ModelConfig(**{**TINY, **overrides})).init_weights(seed)


# ----------------------------------------------------------------------------- batches


def test_token_batches_are_deterministic_windows_and_ranks_split_the_global_batch():
    ids = np.arange(1000, dtype=np.uint32)  # token i == position i, so windows are easy to check
    data = TokenBatches(ids[:800], ids[800:], block_size=16, seed=7)
    x, y = data.batch("train", 3, 1, 6)
    assert x.shape == y.shape == (6, 16) and x.dtype == torch.long
    assert torch.equal(y, x + 1)  # targets are the next tokens
    assert torch.equal((x[:, 1:] - x[:, :-1]), torch.ones(6, 15, dtype=torch.long))  # contiguous windows
    assert int(x.max()) < 800 - 1 and int(y.max()) <= 799  # never reads past the split
    assert torch.equal(data.batch("train", 3, 1, 6)[0], x)  # same question, same answer
    assert not torch.equal(data.batch("train", 4, 1, 6)[0], x)
    assert not torch.equal(data.batch("train", 3, 0, 6)[0], x)
    vx, _ = data.batch("val", 0, 0, 4)
    assert int(vx.min()) >= 800
    # Two ranks with 3 rows each see exactly the 6 rows one process sees.
    r0, _ = data.batch("train", 3, 1, 3, rank=0, world=2)
    r1, _ = data.batch("train", 3, 1, 3, rank=1, world=2)
    assert torch.equal(torch.cat([r0, r1]), x)


@pytest.mark.parametrize("kwargs, name", [
    (dict(split="test"), "split"), (dict(step=-1), "step"), (dict(batch_size=0), "batch_size"),
    (dict(rank=2, world=2), "rank"), (dict(world=0), "world"),
])
def test_token_batches_reject_bad_arguments(kwargs, name):
    data = TokenBatches(np.arange(100), np.arange(100), block_size=8)
    args = dict(split="train", step=0, micro=0, batch_size=2)
    with pytest.raises(ValueError, match=name):
        data.batch(**{**args, **kwargs})


def test_token_batches_reject_data_shorter_than_a_window():
    with pytest.raises(ValueError, match="train split has 8 tokens"):
        TokenBatches(np.arange(8), np.arange(100), block_size=8)
    no_val = TokenBatches(np.arange(100), np.arange(0), block_size=8)  # fine for runs without eval
    assert no_val.batch("train", 0, 0, 2)[0].shape == (2, 8)
    with pytest.raises(ValueError, match="val split has 0 tokens.*eval_iters=0"):
        no_val.batch("val", 0, 0, 2)
    with pytest.raises(ValueError, match="1-D numpy array"):
        TokenBatches(np.zeros((10, 10), dtype=np.int64), np.arange(100), block_size=8)


# ----------------------------------------------------------------------------- config and schedule


def test_lr_schedule_warmup_cosine_and_floor():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=110, max_iters=200)
    assert lr_at(0, cfg) == pytest.approx(1e-3 * 1 / 11)  # linear warmup from lr/(warmup+1)
    assert lr_at(9, cfg) == pytest.approx(1e-3 * 10 / 11)
    assert lr_at(10, cfg) == pytest.approx(1e-3)  # peak right after warmup
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)  # cosine midpoint: halfway between lr and min_lr
    assert lr_at(35, cfg) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-4)
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    assert lr_at(150, cfg) == 1e-4  # floor after decay
    lrs = [lr_at(i, cfg) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay


def test_presets_bring_their_measured_settings_and_given_ones_win():
    from muse.training.loop import PRESET_TRAINING

    tuned = PRESET_TRAINING["shakespeare-char-cpu"]["learning_rate"]
    cfg = TrainConfig.for_preset("shakespeare-char-cpu", max_iters=50)
    assert cfg.learning_rate == tuned and cfg.resolved().min_lr == pytest.approx(tuned / 10) and cfg.max_iters == 50
    assert TrainConfig.for_preset("shakespeare-char-cpu", learning_rate=1e-3).learning_rate == 1e-3
    assert TrainConfig.for_preset("gpt2") == TrainConfig()  # no measured settings: the defaults


def test_auto_dtype_is_bf16_only_where_the_cpu_has_native_bf16(monkeypatch):
    from muse.training import loop

    cpu = torch.device("cpu")
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: True)
    assert loop.resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: False)
    assert loop.resolve_dtype("auto", cpu) == torch.float32
    assert loop.resolve_dtype("fp32", cpu) == torch.float32 and loop.resolve_dtype("bf16", cpu) == torch.bfloat16


def test_cpu_bf16_training_runs_attention_in_fp32_and_keeps_the_gradients(monkeypatch):
    """Under CPU bf16 autocast the matmuls run in bf16 but attention in fp32 (its bf16 backward is slow);
    the loss and gradients stay close to fp32 training's."""
    monkeypatch.setenv("MUSE_NO_FUSED", "1")  # model.py's SDPA path; test_ops checks the kernels' under autocast
    model = tiny_model(seed=3)
    x = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    _, want = model(x, y)
    want.backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(x, y)
    loss.backward()
    assert seen and all(s == (torch.float32, False) for s in seen)
    assert loss.item() == pytest.approx(want.item(), rel=2e-2)
    for p, g in zip(model.parameters(), want_grads):
        assert torch.nn.functional.cosine_similarity(p.grad.flatten(), g.flatten(), dim=0) > 0.98


def test_train_config_defaults_follow_other_fields():
    cfg = TrainConfig(learning_rate=6e-4, max_iters=500, eval_interval=50)
    resolved = cfg.resolved()
    assert resolved.min_lr == pytest.approx(6e-5) and resolved.lr_decay_iters == 500 and resolved.save_interval == 50
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_dict(resolved.to_dict()) == resolved


@pytest.mark.parametrize("field, value", [
    ("max_iters", 0), ("batch_size", -1), ("grad_accum", 0), ("learning_rate", 0.0), ("learning_rate", float("nan")),
    ("min_lr", 1.0), ("warmup_iters", -5), ("weight_decay", -0.1), ("beta1", 1.0), ("beta2", -0.5),
    ("grad_clip", -1.0), ("eval_interval", 0), ("eval_iters", -1), ("log_interval", 0), ("save_interval", -2),
    ("dtype", "fp8"), ("distributed", "horovod"), ("device", "tpu"), ("compile", "yes"), ("batch_size", 2.5),
])
def test_bad_train_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_a_run_shorter_than_its_warmup_only_warms_up():
    cfg = TrainConfig(max_iters=5, warmup_iters=100, learning_rate=1e-3)
    assert [lr_at(i, cfg) for i in range(5)] == pytest.approx([1e-3 * (i + 1) / 101 for i in range(5)])


# ----------------------------------------------------------------------------- the step


class FixedRows:
    """A BatchSource serving slices of one fixed batch: micro m of size b gets rows [m*b, (m+1)*b)."""

    block_size = 16

    def __init__(self, n: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 65, (n, 16), generator=g)
        self.y = torch.randint(0, 65, (n, 16), generator=g)
        self.y[:, :3] = -100  # ignored positions are allowed

    def batch(self, split, step, micro, batch_size, rank=0, world=1):
        rows = slice(micro * batch_size, (micro + 1) * batch_size)
        return self.x[rows], self.y[rows]


def _train_capturing_grads(model, cfg, out):
    """Train, and return the gradients the optimizer stepped with (after accumulation and clipping)."""
    grads = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: grads.append([p.grad.clone() for p in model.parameters()]))
    try:
        train(model, FixedRows(), cfg, out)
    finally:
        hook.remove()
    return grads


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    cfg = dict(max_iters=1, warmup_iters=0, eval_iters=0, weight_decay=0.1, grad_clip=0.5, dtype="fp32", **QUIET)
    a, b = tiny_model(1), tiny_model(1)
    grads_a = _train_capturing_grads(a, TrainConfig(batch_size=8, grad_accum=1, **cfg), tmp_path / "a")
    grads_b = _train_capturing_grads(b, TrainConfig(batch_size=4, grad_accum=2, **cfg), tmp_path / "b")
    assert len(grads_a) == len(grads_b) == 1  # one optimizer step each
    names = [n for n, _ in a.named_parameters()]
    for name, ga, gb in zip(names, grads_a[0], grads_b[0]):
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-7, msg=name)
    # Adam's first step moves each weight by about lr * sign(grad): the same update up to the
    # few entries whose gradient is ~0 (where fp32 rounding can flip the sign).
    moved = 0
    for (name, pa), pb, p0 in zip(a.named_parameters(), b.parameters(), tiny_model(1).parameters()):
        same = torch.isclose(pa, pb, rtol=0, atol=1e-7).float().mean().item()
        assert same > 0.99, name
        moved += not torch.equal(pa, p0)
    assert moved == len(names)  # every parameter took the step


def test_only_the_given_params_train(tmp_path):
    model = tiny_model(2)
    for p in model.parameters():
        p.requires_grad_(False)
    head = [model.layers[1].mlp.fc.weight.requires_grad_(True)]
    before = {n: p.clone() for n, p in model.named_parameters()}
    train(model, FixedRows(), TrainConfig(max_iters=2, batch_size=4, eval_iters=0, **QUIET), tmp_path,
          params=head)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"layers.1.mlp.fc.weight"}


def test_compile_failure_falls_back_to_eager(tmp_path, monkeypatch):
    def broken_compile(module, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("no compiler here")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(UserWarning, match="torch.compile failed.*eager"):
        result = train(tiny_model(), FixedRows(), TrainConfig(max_iters=3, batch_size=4, eval_iters=0, compile=True,
                                                              **QUIET), tmp_path)
    assert result.iter == 3 and len([r for r in result.metrics if "train_loss" in r]) == 3


# ----------------------------------------------------------------------------- end to end


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64", "i686"), reason="FTZ/DAZ is x86's")
def test_cpu_training_flushes_denormals_and_restores_the_setting(tmp_path):
    def denormal_survives() -> bool:  # 1e-39 is below float32's smallest normal, 1.2e-38
        return (torch.full((4096,), 1e-39) * 1.0).ne(0).all().item()

    seen = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen.append(denormal_survives()))
    try:
        assert denormal_survives()
        train(tiny_model(), FixedRows(), TrainConfig(max_iters=2, batch_size=4, eval_iters=0, **QUIET), tmp_path)
    finally:
        handle.remove()
    assert seen == [False, False]  # flushed to 0 while training (x86 arithmetic on them is ~100x slower)
    assert denormal_survives()  # and as it was afterwards


_FREED_BUFFERS = textwrap.dedent("""
    import ctypes, resource, sys
    import torch
    from muse import ops
    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    if sys.argv[1] == "keep":
        assert ops.keep_freed_memory()
    before = libc.mallinfo2().hblkhd
    x = torch.empty(5 << 20).fill_(1.0)  # 20 MiB of activations
    mapped = libc.mallinfo2().hblkhd - before
    del x
    def allocate_and_free():  # a step's worth of 1.5 MB activations, then freed
        xs = [torch.empty(384 * 1024).fill_(1.0) for _ in range(16)]
        del xs
    for _ in range(3):
        allocate_and_free()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        allocate_and_free()
    print(mapped, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
""")


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_freed_activation_buffers_are_reused_not_faulted_in_again():
    def mapped_and_faults(mode: str) -> tuple[int, float]:
        out = subprocess.run([sys.executable, "-c", _FREED_BUFFERS, mode], capture_output=True, text=True,
                             cwd=Path(muse.__file__).parents[1], check=True).stdout.split()
        return int(out[-2]), float(out[-1])

    (default_mapped, _), (kept_mapped, kept_faults) = mapped_and_faults("default"), mapped_and_faults("keep")
    # glibc's default maps a 20 MiB buffer on its own and unmaps it when freed (so the next one is
    # faulted in again, page by page); kept, it comes from the heap and stays there for reuse.
    assert default_mapped >= 20 << 20 and kept_mapped == 0
    assert kept_faults < 16 * 384 / 20  # of the pages touched each round, under 5 % come back from the kernel


def test_cpu_training_keeps_freed_memory_and_hands_it_back_after(tmp_path, monkeypatch):
    from muse import ops

    calls = []
    monkeypatch.setattr(ops, "keep_freed_memory", lambda: calls.append("keep") or True)
    monkeypatch.setattr(ops, "release_freed_memory", lambda: calls.append("release"))
    train(tiny_model(), FixedRows(), TrainConfig(max_iters=2, batch_size=4, eval_iters=0, **QUIET), tmp_path)
    assert calls == ["keep", "release"]


@pytest.mark.parametrize("refresh_s, plots", [(1e9, 1), (0.0, 5)])
def test_the_loss_plot_is_redrawn_at_evals_at_most_every_refresh_interval(tmp_path, monkeypatch, refresh_s, plots):
    from muse.training import loop

    drawn = []
    draw = loop._Metrics.plot
    monkeypatch.setattr(loop._Metrics, "plot", lambda self: drawn.append(1) or draw(self))
    monkeypatch.setattr(loop, "PLOT_REFRESH_S", refresh_s)
    result = train(tiny_model(), FixedRows(), TrainConfig(max_iters=4, batch_size=4, eval_interval=1, eval_iters=1,
                                                          **QUIET), tmp_path / "run")
    assert len(drawn) == plots  # 4 evals and the end, or the end alone
    assert result.plot_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_goes_down_and_the_checkpoint_loads_and_generates(tmp_path, shakespeare):
    train_ids, val_ids, tok = shakespeare
    data = TokenBatches(train_ids, val_ids, block_size=32)
    cfg = TrainConfig(max_iters=150, batch_size=16, learning_rate=3e-3, warmup_iters=10, eval_interval=50,
                      eval_iters=10, log_interval=10, progress=False)
    out = tmp_path / "run"
    model = tiny_model(0)
    result = train(model, data, cfg, out, tokenizer=tok)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == result.metrics
    train_rows = [r for r in rows if "train_loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    assert [r["iter"] for r in train_rows] == list(range(10, 151, 10))
    assert [r["iter"] for r in val_rows] == [50, 100, 150]
    assert {"lr", "tokens_per_s", "elapsed"} <= set(train_rows[0]) and {"val_ppl", "elapsed"} <= set(val_rows[0])
    assert train_rows[0]["train_loss"] > 3.5  # ~ln(65) = 4.17 at the start
    assert val_rows[-1]["val_loss"] < 2.9  # learnt character statistics
    assert val_rows[-1]["val_ppl"] == pytest.approx(math.exp(val_rows[-1]["val_loss"]))
    assert result.best_val_loss == min(r["val_loss"] for r in val_rows)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    last = muse.load(out / "last")  # the final weights, exactly
    for name, p in model.named_parameters():
        torch.testing.assert_close(dict(last.model.named_parameters())[name], p, rtol=0, atol=0)
    assert load_training_state(out / "last")["iter"] == 150
    best = muse.load(out / "best")  # a normal Muse checkpoint, tokenizer included
    assert best.tokenizer.vocab_size == tok.vocab_size  # the training tokenizer, saved with the weights
    text = best.generate("ROMEO:", max_new_tokens=20, temperature=0)
    assert len(text) == 20 and set(text) <= set(tok.backend.get_vocab())  # one character per token


def test_an_existing_run_is_not_overwritten_and_resume_needs_a_run(tmp_path):
    cfg = TrainConfig(max_iters=2, batch_size=4, eval_iters=0, **QUIET)
    with pytest.raises(CheckpointError, match="Nothing to resume"):
        train(tiny_model(), FixedRows(), cfg, tmp_path, resume=True)
    train(tiny_model(), FixedRows(), cfg, tmp_path)
    with pytest.raises(CheckpointError, match="resume=True"):
        train(tiny_model(), FixedRows(), cfg, tmp_path)
    # Resuming a finished run with a larger max_iters continues it (on a stretched lr schedule).
    with pytest.warns(UserWarning, match="lr_decay_iters 2 -> 4"):
        result = train(tiny_model(), FixedRows(), TrainConfig(max_iters=4, batch_size=4, eval_iters=0, **QUIET),
                       tmp_path, resume=True)
    assert result.iter == 4 and [r["iter"] for r in result.metrics] == [1, 2, 3, 4]


def test_a_corrupt_training_state_is_a_clear_error(tmp_path):
    train(tiny_model(), FixedRows(), TrainConfig(max_iters=2, batch_size=4, eval_iters=0, **QUIET), tmp_path)
    (tmp_path / "last" / STATE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        train(tiny_model(), FixedRows(), TrainConfig(max_iters=4, batch_size=4, eval_iters=0, **QUIET), tmp_path,
              resume=True)


def test_resume_with_another_model_shape_is_a_clear_error(tmp_path):
    train(tiny_model(), FixedRows(), TrainConfig(max_iters=2, batch_size=4, eval_iters=0, **QUIET), tmp_path)
    with pytest.raises(CheckpointError, match="different model configuration"):
        train(tiny_model(n_embd=48), FixedRows(), TrainConfig(max_iters=4, batch_size=4, eval_iters=0, **QUIET),
              tmp_path, resume=True)


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    train(tiny_model(), FixedRows(), TrainConfig(max_iters=3, batch_size=4, eval_interval=3, eval_iters=1,
                                                 tensorboard=True, **QUIET), tmp_path)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import fails as if not installed
    with pytest.raises(MuseError, match="pip install tensorboard"):
        train(tiny_model(), FixedRows(), TrainConfig(max_iters=1, batch_size=4, tensorboard=True, **QUIET), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before anything was written


# ----------------------------------------------------------------------------- exact resume after SIGKILL

RUN_SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    import torch
    from muse.config import ModelConfig
    from muse.model import Transformer
    from muse.training import TokenBatches, TrainConfig, train

    out, resume, delay = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3])
    torch.set_num_threads(1)

    class Slow(TokenBatches):  # same batches, slower steps, so the parent can kill mid-run
        def batch(self, *args, **kwargs):
            time.sleep(delay)
            return super().batch(*args, **kwargs)

    ids = np.random.default_rng(0).integers(0, 65, 20000).astype(np.uint16)
    data = Slow(ids[:18000], ids[18000:], block_size=32, seed=5)
    model = Transformer(ModelConfig(**{TINY!r})).init_weights(3)
    cfg = TrainConfig(max_iters=40, batch_size=4, grad_accum=2, warmup_iters=5, eval_interval=10, eval_iters=2,
                      save_interval=10, log_interval=1, dtype="fp32", progress=False, seed=11)
    train(model, data, cfg, out, resume=resume)
""").replace("{TINY!r}", repr({**TINY, "dropout": 0.1}))  # dropout: the RNG state must resume too


def _run(script: Path, out: Path, resume: bool, delay: float = 0.0) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(script), str(out), "1" if resume else "0", str(delay)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_resume_after_sigkill_logs_exactly_the_uninterrupted_losses(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)

    # The run to kill: SIGKILL once it has logged iter 23, i.e. after writing the iter-20 checkpoint.
    killed = tmp_path / "killed"
    proc = subprocess.Popen([PYTHON, str(script), str(killed), "0", "0.02"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the training process exited before it was killed: {proc.stderr.read().decode()[-2000:]}")
        if (killed / "metrics.jsonl").exists() and any(r["iter"] >= 23 for r in _metrics(killed)):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    logged_before_kill = max(r["iter"] for r in _metrics(killed))
    assert 23 <= logged_before_kill < 40
    resumed_from = load_training_state(killed / "last")["iter"]
    assert 20 <= resumed_from < 40

    done = _run(script, killed, resume=True)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = tmp_path / "reference"
    ref = _run(script, reference, resume=False)
    assert ref.returncode == 0, ref.stderr[-3000:]

    got, want = _metrics(killed), _metrics(reference)
    strip = lambda rows, key: [(r["iter"], r[key]) for r in rows if key in r]  # noqa: E731
    assert strip(got, "train_loss") == strip(want, "train_loss")  # equal, not close
    assert strip(got, "val_loss") == strip(want, "val_loss")
    assert [i for i, _ in strip(got, "train_loss")] == list(range(1, 41))  # no step lost or repeated
    assert strip(got, "lr") == strip(want, "lr")


# ----------------------------------------------------------------------------- pretrain()


def test_pretrain_builds_the_preset_with_the_datas_vocabulary(tmp_path):
    """pretrain() on a directory written by muse.training.data.prepare (char-level)."""
    from muse.checkpoints import reporting
    from muse.training import pretrain
    from muse.training.data import prepare

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_text(50_000), encoding="utf-8")
    prepare(corpus, tmp_path / "data", char_level=True)
    cfg = TrainConfig(max_iters=4, batch_size=2, eval_interval=4, eval_iters=1, **QUIET)
    steps = []
    with reporting(lambda what, done, total: steps.append(what)):  # what `muse train` shows before the bar
        result = pretrain(tmp_path / "data", tmp_path / "run", "tiny", {"n_layer": 1, "block_size": 16}, cfg)
    assert result.iter == 4
    assert steps[0] == "Reading data" and steps[1].startswith("Building a tiny model (") and len(steps) == 2
    m = muse.load(tmp_path / "run" / "best")
    vocab = len(set(corpus.read_text(encoding="utf-8")))
    assert (m.config.vocab_size, m.config.n_layer, m.config.block_size, m.config.arch) == (vocab, 1, 16, "llama")
    assert m.tokenizer.decode(m.tokenizer.encode("To be, or not")) == "To be, or not"
    with pytest.raises(ValueError, match="vocab_size"):
        pretrain(tmp_path / "data", tmp_path / "run2", "tiny", {"vocab_size": 10}, cfg)


def test_resuming_with_other_settings_warns(tmp_path):
    train(tiny_model(), FixedRows(), TrainConfig(max_iters=2, batch_size=4, eval_iters=0, **QUIET), tmp_path)
    with pytest.warns(UserWarning, match="batch_size 4 -> 2"):
        train(tiny_model(), FixedRows(), TrainConfig(max_iters=3, batch_size=2, eval_iters=0, **QUIET), tmp_path,
              resume=True)


# ----------------------------------------------------------------------------- resume after a crash while writing


def _short_run(max_iters: int) -> TrainConfig:
    return TrainConfig(max_iters=max_iters, lr_decay_iters=4, batch_size=4, eval_iters=0, **QUIET)


def test_resume_drops_a_half_written_last_metrics_line(tmp_path):
    train(tiny_model(), FixedRows(), _short_run(2), tmp_path)
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"iter": 3, "train_lo')  # killed in the middle of logging iter 3
    with pytest.warns(UserWarning, match="half-written line.*dropped it"):
        result = train(tiny_model(), FixedRows(), _short_run(4), tmp_path, resume=True)
    assert [r["iter"] for r in result.metrics] == [1, 2, 3, 4]
    assert _metrics(tmp_path) == result.metrics  # the file is whole again


def test_a_bad_metrics_line_before_the_last_is_a_clear_error(tmp_path):
    train(tiny_model(), FixedRows(), _short_run(2), tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(MuseError, match="Line 2 of .*metrics.jsonl is not a metrics row"):
        train(tiny_model(), FixedRows(), _short_run(4), tmp_path, resume=True)


def test_a_last_checkpoint_without_its_training_state_says_so(tmp_path):
    train(tiny_model(), FixedRows(), _short_run(2), tmp_path)
    (tmp_path / "last" / STATE_FILE).unlink()  # as if stopped between the weights and the state
    with pytest.raises(CheckpointError, match=r"last has weights but no training state \(training_state.pt"):
        train(tiny_model(), FixedRows(), _short_run(4), tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="already holds a training run"):  # and is not overwritten either
        train(tiny_model(), FixedRows(), _short_run(4), tmp_path)
