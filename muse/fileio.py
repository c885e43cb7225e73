"""Atomic writes: a checkpoint, cache entry, prepared corpus or exported file is whole or absent.

Everything is written into a temporary sibling directory, flushed to disk, then swapped in
with two renames. If the process dies (or the disk fills) before the swap, the previous
directory is untouched; between the two renames only `.NAME.old-PID` exists, and
`muse.training.state.find_checkpoint` knows to look there.
"""

from __future__ import annotations

import os
import shutil
import threading
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


def write_bytes_atomic(path: "str | Path", data: bytes, private: bool = False) -> Path:
    """Write a file whole or not at all: a temp sibling, flushed, then renamed over `path`.

    `private` files get 0o600; otherwise a replaced file keeps its permissions and a new one gets 0o644.
    """
    path = Path(path)
    if path.is_dir():
        raise MuseError(f"{path} is a directory; give a file name, e.g. {path / 'out.jsonl'}")
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = 0o600 if private else path.stat().st_mode & 0o7777 if path.exists() else 0o644
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # os.open's mode is filtered by the umask
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MuseError(f"Cannot write {path}: {e.strerror}. Choose another path.") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: "str | Path", text: str, private: bool = False) -> Path:
    """`write_bytes_atomic` for UTF-8 text (newlines written as given)."""
    return write_bytes_atomic(path, text.encode("utf-8"), private)
