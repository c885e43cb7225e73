"""Training checkpoints: the model in Muse's format plus `training_state.pt`, written atomically.

A training checkpoint directory (out_dir/last, or out_dir/best) holds:
  whatever `save_fn` writes   the model part (default: `muse.save_checkpoint`, so
                              `muse.load(out_dir / "last")` works, tokenizer included)
  training_state.pt           iter, best val loss, the trainable parameters, optimizer,
                              GradScaler, RNG states (torch, CUDA, numpy, python), TrainConfig

`training_state.pt` holds only tensors, numbers, strings, lists and dicts, so it is read back
with `torch.load(..., weights_only=True)`. The trainable parameters are stored in it (not read
back from the model files) so resuming works whatever `save_fn` writes (LoRA saves only its
adapter) and is bit-exact.

Writes go to a temporary sibling directory that replaces the old one with two renames; if the
process dies between them, `find_checkpoint` still finds the complete previous copy.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from muse.errors import CheckpointError
from muse.fileio import atomic_dir

STATE_FILE = "training_state.pt"
STATE_VERSION = 1


def capture_rng() -> dict[str, Any]:
    """Every RNG a training step may draw from, as weights_only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(path: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_dir)` and move the result to `path` atomically (the old copy survives a crash)."""
    return atomic_dir(path, write)


def save_training_checkpoint(path: Path, state: dict[str, Any],
                             save_model: Callable[[Path], None] | None) -> Path:
    """Write `state` as training_state.pt (after `save_model(dir)` writes the model part) atomically."""

    def write(tmp: Path) -> None:
        if save_model is not None:
            save_model(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        # Through a Python file, so a full disk surfaces as OSError(ENOSPC), not torch's "unexpected pos".
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save({"version": STATE_VERSION, **state}, f)

    return write_checkpoint(path, write)


def find_checkpoint(out_dir: Path, name: str = "last") -> Path | None:
    """out_dir/name if it is complete, else a complete copy left by a crash mid-swap, else None."""
    out_dir = Path(out_dir)
    candidates = [out_dir / name] + sorted(out_dir.glob(f".{name}.old-*"))
    return next((c for c in candidates if (c / STATE_FILE).is_file()), None)


def nothing_to_resume(out_dir: Path) -> CheckpointError:
    """The error for a resume that finds no complete checkpoint in out_dir, saying what is there."""
    last = Path(out_dir) / "last"
    if last.is_dir() and any(last.iterdir()):
        return CheckpointError(
            f"{last} has weights but no training state ({STATE_FILE} is missing): the run was stopped while "
            f"saving it, or the file was removed. Resume from a complete copy of {last} (put it back), or "
            "start again without --resume in another output directory.")
    return CheckpointError(f"Nothing to resume in {out_dir}: no {last} checkpoint. "
                           "Start a fresh run without --resume.")


def load_training_state(path: Path) -> dict[str, Any]:
    """Read training_state.pt from a checkpoint directory (weights_only: no code is unpickled)."""
    file = Path(path) / STATE_FILE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: {path} is not a training checkpoint.") from None
    except Exception as e:
        raise CheckpointError(f"{file} is corrupt or was not written by Muse ({e}).") from e
    if not isinstance(state, dict) or state.get("version", 0) > STATE_VERSION:
        raise CheckpointError(f"{file} was written by a newer Muse or is not a training state; upgrade Muse.")
    return state
