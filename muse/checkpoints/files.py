"""Reading checkpoint files a user hands in, which may be broken or hostile.

Everything here fails with a `CheckpointError` that names the file, what is wrong and what
to do — never a TypeError, RecursionError or library error from deep inside:

- JSON (config.json, the shard index) is size-capped, must be an object, refuses NaN/Infinity
  and nesting deeper than any real config;
- a file named by a model directory (or its index) must stay inside that directory: no
  absolute paths, no `..`, no symlinks out — except the Hugging Face cache's own layout,
  where `snapshots/<rev>/<file>` links to `../../blobs/<sha>`;
- safetensors headers are size-checked before the library parses them, and their names,
  shapes and dtypes are read (cheaply, without the data) so loaders can check them against
  the config before loading anything.
"""

from __future__ import annotations

import json
import math
import stat
import struct
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from muse.errors import CheckpointError, MuseError

MAX_CONFIG_BYTES = 16 << 20  # real config.json files are a few KB
MAX_INDEX_BYTES = 64 << 20  # the largest sharded indexes are a few MB
MAX_JSON_DEPTH = 64  # real configs nest 3-4 levels
MAX_SAFETENSORS_HEADER = 64 << 20  # ~100 bytes per tensor; the library's own cap is 100 MB
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

PICKLE_HINT = (
    "Muse reads weights only from safetensors and GGUF files, because loading a pickle can run "
    "code. Convert it once, where you trust the file, with transformers: "
    "`AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)`, "
    "or use the model's safetensors/GGUF release."
)


_REQUIRED = object()


def show(value: Any) -> str:
    """A short repr for error messages (a crafted value may be megabytes long)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Fields:
    """Typed reads of a config's key → value pairs; every error names the file and the key."""

    def __init__(self, data: dict, where: str):
        self.data, self.where = data, where

    def _raw(self, key: str, default: Any) -> Any:
        value = self.data.get(key)
        if value is None:  # transformers writes null for an unset optional field
            if default is _REQUIRED:
                raise CheckpointError(f"{self.where} lacks the field {key!r}; the config is incomplete.")
            return default
        return value

    def integer(self, key: str, limit: str, default: Any = _REQUIRED) -> Any:
        """A positive int no larger than `muse.config.LIMITS[limit]`."""
        from muse.config import LIMITS

        value = self._raw(key, default)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(f"{self.where}: {key} must be a positive integer, got {show(value)}.")
        if value > LIMITS[limit]:
            raise CheckpointError(f"{self.where}: {key} is {value:,}, more than the {LIMITS[limit]:,} Muse supports; "
                                  "the config is corrupt or describes a model Muse cannot run.")
        return value

    def number(self, key: str, default: Any = _REQUIRED) -> Any:
        """A positive finite number (as float)."""
        value = self._raw(key, default)
        if value is None:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise CheckpointError(f"{self.where}: {key} must be a positive number, got {show(value)}.")
        return float(value)

    def boolean(self, key: str, default: Any = _REQUIRED) -> bool:
        value = self._raw(key, default)
        if not isinstance(value, bool):
            raise CheckpointError(f"{self.where}: {key} must be true or false, got {show(value)}.")
        return value

    def mapping(self, key: str) -> dict:
        value = self._raw(key, {})
        if not isinstance(value, dict):
            raise CheckpointError(f"{self.where}: {key} must be an object, got {show(value)}.")
        return value


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def read_json(path: Path, max_bytes: int | None = None) -> dict:
    """A JSON object from `path`, bounded in size (default MAX_CONFIG_BYTES) and depth."""
    max_bytes = MAX_CONFIG_BYTES if max_bytes is None else max_bytes
    size = _regular_file_size(path)
    if size > max_bytes:
        raise CheckpointError(f"{path} is {size:,} bytes, more than the {max_bytes:,} a checkpoint's JSON "
                              "may be; the file is corrupt or not what its name says.")
    try:
        with open(path, "rb") as f:
            text = f.read(max_bytes + 1).decode("utf-8")
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise CheckpointError(f"{path} is nested too deeply for a checkpoint's JSON; the file is corrupt.") from None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e}).") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN, a 5000-digit number
        raise CheckpointError(f"{path} is not valid JSON ({e}); the file is corrupt.") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, but holds a {type(data).__name__}; "
                              "the file is corrupt or not a model config.")
    if _depth(data) > MAX_JSON_DEPTH:
        raise CheckpointError(f"{path} nests more than {MAX_JSON_DEPTH} levels deep; it is not a model config.")
    return data


def _regular_file_size(path: Path) -> int:
    """The size of `path`, refused unless it is a regular file (opening a FIFO would block forever)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; a model directory needs it.") from None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e}).") from e
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path} is not a regular file (a directory, FIFO or device); "
                              "a checkpoint's files must be plain files.")
    return st.st_size


def _roots(model_dir: Path) -> list[Path]:
    root = model_dir.resolve()
    roots = [root]
    if root.parent.name == "snapshots":  # HF hub cache: models--x/snapshots/<rev>/f -> ../../blobs/<sha>
        roots.append((root.parent.parent / "blobs").resolve())
    return roots


def model_file(model_dir: Path, name: str, what: str = "file") -> Path:
    """`model_dir / name`, refused unless it stays inside `model_dir` (see the module docstring)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{model_dir}: {what} name {name!r} is not a file name.")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts or ".." in windows.parts:
        raise CheckpointError(
            f"{model_dir}: {what} {name!r} points outside the model directory; a checkpoint may only "
            "name files inside its own directory. The checkpoint is broken or was crafted to read other files."
        )
    path = model_dir / name
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise CheckpointError(f"{path} cannot be resolved ({e}).") from e
    if not any(resolved.is_relative_to(r) for r in _roots(model_dir)):
        raise CheckpointError(
            f"{path} is a link to {resolved}, outside the model directory; Muse reads a checkpoint only "
            "from its own directory. Copy the file into the directory instead of linking it."
        )
    return path


def _safetensors_error(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is corrupt or truncated, not a valid safetensors file ({why}); "
                           "download or copy it again.")


def check_safetensors_header(path: Path) -> None:
    """Refuse a file whose header length is absurd before the library reads it."""
    size = _regular_file_size(path)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e}).") from e
    if len(head) < 9:
        raise _safetensors_error(path, f"it is only {size} bytes long")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_SAFETENSORS_HEADER:
        raise _safetensors_error(path, f"its header claims {n:,} bytes (at most {MAX_SAFETENSORS_HEADER:,})")
    if 8 + n > size:
        raise _safetensors_error(path, f"its header claims {n:,} bytes but the file has {size:,}")
    if head[8:9] != b"{":
        raise _safetensors_error(path, "its header is not a JSON object")


class SafetensorsFile:
    """One safetensors file opened for reading: names, shapes and dtypes first, data on request."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        check_safetensors_header(path)
        self.path = path
        try:
            self._f = safe_open(str(path), framework="pt")
            self.specs: dict[str, tuple[tuple[int, ...], str]] = {}
            for name in self._f.keys():
                s = self._f.get_slice(name)
                self.specs[name] = (tuple(s.get_shape()), s.get_dtype())
        except Exception as e:  # SafetensorError and friends: the library validated offsets and sizes
            raise _safetensors_error(path, str(e)) from e

    def get(self, name: str):
        try:
            return self._f.get_tensor(name)
        except Exception as e:
            raise _safetensors_error(self.path, f"tensor {name!r} cannot be read ({e})") from e


def check_specs(where: str, found: dict[str, tuple[tuple[int, ...], str]],
                expected: dict[str, tuple[int, ...]], optional: frozenset[str] = frozenset(),
                dtypes: tuple[str, ...] = FLOAT_DTYPES) -> None:
    """Compare tensors a file holds (name → (shape, dtype)) with what the config needs (name → shape).

    Every name in `expected` but not in `optional` must be present; nothing outside `expected`
    may be; shapes must match exactly and dtypes be in `dtypes`. One error lists every problem.
    """
    problems = []
    missing = sorted(set(expected) - set(found) - optional)
    extra = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing tensors: {_few(missing)}")
    if extra:
        problems.append(f"unexpected tensors: {_few(extra)}")
    wrong = [f"{n} is {list(shape)}, expected {list(expected[n])}"
             for n, (shape, _) in sorted(found.items()) if n in expected and tuple(shape) != tuple(expected[n])]
    if wrong:
        problems.append(f"wrong shapes: {_few(wrong)}")
    bad_types = [f"{n} is {dtype}" for n, (_, dtype) in sorted(found.items()) if n in expected and dtype not in dtypes]
    if bad_types:
        problems.append(f"unsupported dtypes ({'/'.join(dtypes)} expected): {_few(bad_types)}")
    if problems:
        raise CheckpointError(f"{where} does not match its config: " + "; ".join(problems)
                              + ". The weights belong to a different model or the files are corrupt.")


def _few(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" … ({len(items)} in all)" if len(items) > n else "")


def read_tokenizer(build, where) -> Any:
    """`build()` (a tokenizer loader), with a wrong-typed or malformed value anywhere in the
    tokenizer's files or metadata turned into a CheckpointError naming `where`."""
    try:
        return build()
    except MuseError:
        raise  # already says what is wrong
    except Exception as e:  # the `tokenizers` library raises bare Exceptions; TypeError etc. from bad values
        raise CheckpointError(f"{where}: the tokenizer is unusable ({type(e).__name__}: {str(e)[:200]}); "
                              "the tokenizer files are corrupt. Download them again.") from e
