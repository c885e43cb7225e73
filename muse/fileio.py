"""Atomic directory writes: a checkpoint, cache entry or prepared corpus is whole or absent.

Everything is written into a temporary sibling directory, flushed to disk, then swapped in
with two renames. If the process dies (or the disk fills) before the swap, the previous
directory is untouched; between the two renames only `.NAME.old-PID` exists, and
`muse.training.state.find_checkpoint` knows to look there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def fsync_tree(path: Path) -> None:
    """Flush every file under `path` to disk (before a rename makes it visible)."""
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def replace_dir(tmp: Path, target: Path) -> Path:
    """Flush the finished directory `tmp` and put it at `target` (replacing any old one)."""
    tmp, target = Path(tmp), Path(target)
    fsync_tree(tmp)
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def atomic_dir(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_dir)` and move the result to `path` atomically; on any error remove tmp."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        return replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
