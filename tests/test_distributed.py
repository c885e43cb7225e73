"""Scale-out: two gloo processes under torchrun train like one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from muse.config import ModelConfig
    from muse.model import Transformer
    from muse.training import TokenBatches, TrainConfig, train

    out, batch_size, strategy = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    max_iters, resume = int(sys.argv[4]), sys.argv[5] == "1"
    torch.set_num_threads(1)
    ids = (np.arange(20000) * 7 % 65).astype(np.uint16)  # a learnable cycle
    data = TokenBatches(ids[:18000], ids[18000:], block_size=32, seed=5)
    model = Transformer(ModelConfig(arch="gpt2", vocab_size=65, n_layer=2, n_head=2, n_embd=32, block_size=32,
                                    bias=False, qkv_bias=False)).init_weights(3)
    cfg = TrainConfig(max_iters=max_iters, lr_decay_iters=10, batch_size=batch_size, grad_accum=2, warmup_iters=2,
                      learning_rate=1e-2, eval_interval=5,
                      eval_iters=3, log_interval=1, dtype="fp32", progress=False, distributed=strategy,
                      device="cpu")
    train(model, data, cfg, out, resume=resume)  # every rank trains; only rank 0 writes
""")


def _torchrun(script: Path, out: Path, nproc: int, batch_size: int, strategy: str = "ddp", max_iters: int = 10,
              resume: bool = False):
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(script), str(out), str(batch_size), strategy, str(max_iters), "1" if resume else "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)


def _why(proc: subprocess.CompletedProcess) -> str:
    """The ranks' own error lines (torchrun's summary alone does not say what went wrong)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("[rank") or "Error" in ln]
    return "\n".join(lines[-60:]) or proc.stderr[-4000:]


def _rows(out: Path, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["iter"], r[key]) for r in rows if key in r]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, global batch 8 x 2 micro-steps."""
    tmp = tmp_path_factory.mktemp("single")
    script = tmp / "run.py"
    script.write_text(SCRIPT)
    proc = _torchrun(script, tmp / "out", nproc=1, batch_size=8)
    assert proc.returncode == 0, _why(proc)
    return script, tmp / "out"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path, single, strategy):
    script, ref = single
    out = tmp_path / "out"
    proc = _torchrun(script, out, nproc=2, batch_size=4, strategy=strategy)
    assert proc.returncode == 0, _why(proc)

    want, got = _rows(ref, "train_loss"), _rows(out, "train_loss")
    assert [i for i, _ in got] == list(range(1, 11))
    assert [i for i, _ in got] == [i for i, _ in want]
    for (i, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-4), f"iter {i}"
    for (i, a), (_, b) in zip(_rows(out, "val_loss"), _rows(ref, "val_loss")):
        assert a == pytest.approx(b, rel=1e-4), f"val at iter {i}"
    assert got[-1][1] < got[0][1]  # it trained
    # Rank 0 alone wrote the run; the checkpoint is a normal, complete one.
    assert sorted(p.name for p in out.iterdir()) == ["best", "last", "loss.png", "metrics.jsonl"]
    import muse

    m = muse.load(out / "last")
    ref_model = muse.load(ref / "last")
    for (name, p), q in zip(m.model.named_parameters(), ref_model.model.parameters()):
        assert (p - q).abs().max().item() < 1e-4, name


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_distributed_run_resumes_exactly(tmp_path, strategy):
    """Stopped at iter 6 and resumed to 10, two ranks log what an uninterrupted two-rank run logs."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    whole, split = tmp_path / "whole", tmp_path / "split"
    for out, max_iters, resume in ((whole, 10, False), (split, 6, False), (split, 10, True)):
        proc = _torchrun(script, out, nproc=2, batch_size=4, strategy=strategy, max_iters=max_iters, resume=resume)
        assert proc.returncode == 0, _why(proc)
    assert _rows(split, "train_loss") == _rows(whole, "train_loss")
    # The stopped run also evaluated at its last iter (6); every other eval matches.
    assert [r for r in _rows(split, "val_loss") if r[0] != 6] == _rows(whole, "val_loss")
