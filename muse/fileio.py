"""Atomic writes: a checkpoint, cache entry, prepared corpus or exported file is whole or absent.

Everything is written into a temporary sibling directory, flushed to disk, then swapped in
with two renames. If the process dies (or the disk fills) before the swap, the previous
directory is untouched; between the two renames only `.NAME.old-PID` exists, and
`muse.training.state.find_checkpoint` knows to look there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Callable

from muse.errors import MuseError


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


def write_text_atomic(path: "str | Path", text: str) -> Path:
    """Write a UTF-8 text file whole or not at all: a temp sibling, flushed, then renamed over `path`."""
    path = Path(path)
    if path.is_dir():
        raise MuseError(f"{path} is a directory; give a file name, e.g. {path / 'out.jsonl'}")
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise MuseError(f"Cannot write {path}: {e.strerror}. Choose another path.") from None
    return path
