"""Where training batches come from: the `BatchSource` protocol and pretraining batches.

The training loop never iterates over a dataset. It asks a `BatchSource` for the batch of
a given (split, step, micro-step, rank, world size), and a source must answer with the same
tensors every time it is asked the same question. That one rule is what makes a resumed run
log exactly the losses of an uninterrupted one (the data position is just the step number)
and what lets every distributed rank draw its own slice of the global batch.

    data = TokenBatches(train_ids, val_ids, block_size=64)
    x, y = data.batch("train", step=0, micro=0, batch_size=12)   # (12, 64) long each
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

SPLITS = ("train", "val")


@runtime_checkable
class BatchSource(Protocol):
    """Deterministic batches: the same (split, step, micro, rank, world) always gives the same tensors,
    which is what makes --resume exact and lets every DDP rank draw a different slice.

    `batch` returns x, y: (batch_size, T) long tensors on the CPU; y is -100 where no loss is taken
    (padding, prompt tokens). `split` is "train" or "val"; for "val" the loop passes step = the index
    of the eval batch (0..eval_iters-1) and micro = 0. Rank r of `world` must return its own
    `batch_size` rows of the global batch of `batch_size * world` rows, so that the union over ranks
    does not depend on how many processes share the work.
    """

    def batch(self, split: str, step: int, micro: int, batch_size: int, rank: int = 0, world: int = 1
              ) -> tuple[torch.Tensor, torch.Tensor]: ...


def check_batch_args(split: str, step: int, micro: int, batch_size: int, rank: int, world: int) -> None:
    """Shared argument checks for BatchSource implementations (ValueError naming the argument)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    for name, value, low in (("step", step, 0), ("micro", micro, 0), ("batch_size", batch_size, 1),
                             ("world", world, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank!r}")


class TokenBatches:
    """Pretraining batches: random windows of block_size+1 tokens from a 1-D token array.

    Like nanoGPT's `get_batch`: row i of a batch is `data[o:o+T]` as input and `data[o+1:o+T+1]`
    as target, o uniform in [0, len - T). The offsets of the whole global batch
    (`batch_size * world` rows) come from a generator seeded with (seed, split, step, micro), and
    rank r keeps rows [r*batch_size, (r+1)*batch_size): one process with batch 2B sees exactly the
    rows two processes with batch B see together.

    `train` and `val` may be numpy memmaps (uint16/uint32 token ids); only the sampled windows
    are read.
    """

    def __init__(self, train: np.ndarray, val: np.ndarray, block_size: int, seed: int = 1337):
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.block_size = block_size
        self.seed = int(seed)
        self._data = {}
        for split, arr in (("train", train), ("val", val)):
            if not isinstance(arr, np.ndarray) or arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"{split} must be a 1-D numpy array of integer token ids")
            if split == "train" and len(arr) < block_size + 1:
                raise ValueError(self._too_short(split, len(arr)))
            self._data[split] = arr  # a short val split is fine until someone asks for val batches
        self.tokenizer = None  # set by from_dir

    @classmethod
    def from_dir(cls, data_dir: str | Path, block_size: int, seed: int = 1337) -> "TokenBatches":
        """Batches over a directory written by `muse.training.data` (train.bin, val.bin, tokenizer)."""
        from muse.training.data import load_prepared  # the data layer is optional until used

        prepared = load_prepared(data_dir)
        batches = cls(prepared.train, prepared.val, block_size, seed)
        batches.tokenizer = prepared.tokenizer
        return batches

    def _too_short(self, split: str, n: int) -> str:
        hint = " (or train with eval_iters=0)" if split == "val" else ""
        return (f"the {split} split has {n} tokens, fewer than block_size + 1 = {self.block_size + 1}; "
                f"use more data or a smaller block_size{hint}")

    def tokens(self, split: str) -> int:
        return len(self._data[split])

    def batch(self, split: str, step: int, micro: int, batch_size: int, rank: int = 0, world: int = 1
              ) -> tuple[torch.Tensor, torch.Tensor]:
        check_batch_args(split, step, micro, batch_size, rank, world)
        data, T = self._data[split], self.block_size
        if len(data) < T + 1:
            raise ValueError(self._too_short(split, len(data)))
        rng = np.random.default_rng([self.seed, SPLITS.index(split), step, micro])
        offsets = rng.integers(0, len(data) - T, size=batch_size * world)[rank * batch_size:(rank + 1) * batch_size]
        windows = data[offsets[:, None] + np.arange(T + 1)]  # (B, T+1): one gather, memmap-friendly
        chunk = torch.from_numpy(windows.astype(np.int64))
        return chunk[:, :-1], chunk[:, 1:]
