"""Atomic writes: a checkpoint, cache entry, prepared corpus or exported file is whole or absent.

Everything is written into a temporary sibling directory, flushed to disk, then swapped in
with two renames. If the process dies (or the disk fills) before the swap, the previous
directory is untouched; between the two renames only `.NAME.old-PID` exists, and
`muse.training.state.find_checkpoint` knows to look there.

A full disk (or quota, or file size limit) while writing is a `DiskFullError` naming the file or
directory being written and saying the previous copy is kept: `disk_full_reason` is the one place
that recognises one, whether it comes as an OSError or wrapped by a library (safetensors, tokenizers).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Callable, Iterator

from muse.errors import MuseError

# What each errno means for the user; libraries written in Rust or C++ pass on only the OS's text.
_DISK_FULL = {
    errno.ENOSPC: "the disk holding it is full",
    errno.EDQUOT: "your disk quota there is used up",
    errno.EFBIG: "the file is larger than the disk or a size limit allows",
}


class DiskFullError(MuseError):
    """A write that failed for lack of space; the previous copy of `path` (if any) is unchanged."""

    def __init__(self, path: Path, reason: str, existed: bool):
        self.path, self.reason = Path(path), reason
        kept = f"{self.path.name} is left as it was" if existed else "nothing was written"
        super().__init__(f"Cannot write {self.path}: {reason}; {kept}. Free some space "
                         f"(`df -h {self.path.parent}`) and try again, or write somewhere else.")


def disk_full_reason(e: BaseException) -> str | None:
    """Why `e` (or an error it was raised from) is a full disk, in words; None if it is not one."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for code, what in _DISK_FULL.items():
            text = os.strerror(code)
            if (isinstance(e, OSError) and e.errno == code) or text in str(e):
                return f"{what} ({text})"
        e = e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def disk_full_is_an_error(path: "str | Path") -> Iterator[None]:
    """Turn a full disk inside the block into a `DiskFullError` naming `path` (the outermost one
    wins, so a nested atomic write is reported as the target the user asked for)."""
    path = Path(path)
    existed = path.exists()
    try:
        yield
    except DiskFullError as e:
        raise DiskFullError(path, e.reason, existed) from None
    except Exception as e:
        reason = disk_full_reason(e)
        if reason is None:
            raise
        raise DiskFullError(path, reason, existed) from None


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
    """Run `write(tmp_dir)` and move the result to `path` atomically; on any error remove tmp.
    A full disk is a `DiskFullError` naming `path`."""
    path = Path(path)
    with disk_full_is_an_error(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            write(tmp)
            return replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def write_bytes_atomic(path: "str | Path", data: bytes, private: bool = False) -> Path:
    """Write a file whole or not at all: a temp sibling, flushed, then renamed over `path`.

    `private` files get 0o600; otherwise a replaced file keeps its permissions and a new one gets 0o644.
    """
    with replacing(path, data, private):
        pass
    return Path(path)


@contextlib.contextmanager
def replacing(path: "str | Path", data: bytes, private: bool = False) -> Iterator[Path]:
    """`write_bytes_atomic` in two steps: `data` is written and flushed to a temp sibling, the block
    runs, and only then is the temp file renamed over `path`. If the block raises (say, the database
    commit that records the change), `path` is left as it was.
    """
    path = Path(path)
    if path.is_dir():
        raise MuseError(f"{path} is a directory; give a file name, e.g. {path / 'out.jsonl'}")
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}"  # see _TEMP_FILE
    existed = path.exists()
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            mode = 0o600 if private else path.stat().st_mode & 0o7777 if path.exists() else 0o644
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)  # os.open's mode is filtered by the umask
        except OSError as e:
            raise _write_error(path, e, existed) from None
        yield path
        try:
            os.replace(tmp, path)
            _fsync_dir(path.parent)  # make the rename itself durable
        except OSError as e:
            raise _write_error(path, e, existed) from None
    finally:
        tmp.unlink(missing_ok=True)


_TEMP_FILE = re.compile(r"\..+\.tmp-(\d+)-\d+")  # `replacing`'s temp siblings: .NAME.tmp-PID-THREAD


def remove_stale_temps(folder: "str | Path") -> list[Path]:
    """Remove the temp files `replacing` left in `folder` when its process died before the rename
    (kill -9, a power cut); those of processes still running are kept. Returns the ones removed."""
    try:
        entries = list(Path(folder).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for f in entries:
        m = _TEMP_FILE.fullmatch(f.name)
        if m and not f.is_symlink() and f.is_file() and not _running(int(m.group(1))):
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _write_error(path: Path, e: OSError, existed: bool) -> MuseError:
    reason = disk_full_reason(e)
    if reason is not None:
        return DiskFullError(path, reason, existed)
    return MuseError(f"Cannot write {path}: {e.strerror}. Choose another path.")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: "str | Path", text: str, private: bool = False) -> Path:
    """`write_bytes_atomic` for UTF-8 text (newlines written as given)."""
    return write_bytes_atomic(path, text.encode("utf-8"), private)


# -- paths built from user input ----------------------------------------------------------

# File systems allow 255 bytes a name; atomic writes add a ".NAME.tmp-PID-THREAD" sibling.
MAX_NAME_BYTES = 200


class UnsafePathError(MuseError):
    """A user-supplied path that would leave the directory it must stay in."""


def safe_join(base: "str | Path", *parts: str) -> Path:
    """base / parts, guaranteed to stay inside `base` (for names that come from users).

    Rejects absolute parts, `..` that climbs out, NUL bytes, and symlinks that point outside;
    raises `UnsafePathError`. The directories need not exist yet.
    """
    root = Path(base).resolve()
    for part in parts:
        if not isinstance(part, str) or not part or "\x00" in part:
            raise UnsafePathError(f"invalid path component {part!r}: use a plain, non-empty file name")
        if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise UnsafePathError(f"the name {part[:40]!r}… is {len(part.encode('utf-8', 'surrogatepass'))} bytes "
                                  f"long; the limit is {MAX_NAME_BYTES} bytes: use a shorter name")
        if Path(part).is_absolute() or part.startswith(("/", "\\")) or (part[1:2] == ":" and part[0].isalpha()):
            raise UnsafePathError(f"absolute paths are not allowed here: {part!r}; give a name relative to {root}")
    target = root.joinpath(*parts).resolve()  # resolves `..` and symlinks
    if target != root and root not in target.parents:
        raise UnsafePathError(f"{'/'.join(parts)!r} points outside {root}; use a name without '..' or links out")
    return target
