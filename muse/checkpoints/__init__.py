"""Finding and loading checkpoints: bundled names, GGUF files, HF and Muse directories.

`load_checkpoint(name_or_path, precision)` is the one entry point. A GGUF is
converted once into Muse's format under `MUSE_HOME/cache/` (or `MUSE_CACHE`) (keyed by the file's
path, size and mtime, and the precision) so later loads only memory-map safetensors.

Loading reports its steps to a `Progress` callback, `progress(what, done, total)` (total 0: a
step of unknown length), passed to `load_checkpoint` or set for a block with
`reporting(progress)` by a caller that reaches it through `muse.load` (the CLI's progress bars).
"""

from __future__ import annotations

import hashlib
import os
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from muse.checkpoints.files import PICKLE_HINT, read_tokenizer
from muse.checkpoints.registry import BUNDLED, DEFAULT_MODEL, find_bundled, verify
from muse.paths import cache_home
from muse.config import ModelConfig
from muse.errors import CheckpointError, ModelNotFoundError


def is_adapter_dir(path: Path) -> bool:
    """Whether `path` is a LoRA adapter directory (checked without importing torch)."""
    return (path / "adapter_config.json").is_file()


Progress = Callable[[str, int, int], None]  # (what is happening, done, total; 0 = unknown)
_reporter: ContextVar[Progress | None] = ContextVar("muse_checkpoint_progress", default=None)


@contextmanager
def reporting(progress: Progress | None) -> Iterator[None]:
    """Send the progress of every checkpoint load in this block (and this context) to `progress`."""
    token = _reporter.set(progress)
    try:
        yield
    finally:
        _reporter.reset(token)


def _silent(what: str, done: int, total: int) -> None:
    pass


HAND_OVER = ""  # reported as the step name: "from here on I draw my own progress" (the training bar)


def reporter() -> Progress:
    """Where this context's progress goes (set by `reporting`; else nowhere): library code that
    runs long, like training, reports its steps before the work starts through it."""
    return _reporter.get() or _silent


@dataclass
class Source:
    kind: str  # "gguf" | "hf" | "muse"
    path: Path
    name: str  # what the user called it
    bundled: Any = None


@dataclass
class Checkpoint:
    model: Any  # muse.model.Transformer
    tokenizer: Any  # muse.tokenizer.Tokenizer | None
    info: dict[str, Any] = field(default_factory=dict)


def resolve(name_or_path: str | Path | None = None) -> Source:
    """Turn a bundled model name or a local path into a `Source`."""
    from muse.checkpoints.native import is_muse_dir  # here, not at the top: `muse models` needs no torch

    name = str(name_or_path) if name_or_path is not None else os.environ.get("MUSE_MODEL") or DEFAULT_MODEL
    bundled = find_bundled(name)
    if bundled is not None:
        path = bundled.installed_file()
        if path is None:
            raise ModelNotFoundError(f"The bundled model {bundled.name!r} is not installed: {bundled.install_hint()}.")
        return Source("gguf", path, bundled.name, bundled)
    path = Path(name).expanduser()
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80":
            raise CheckpointError(f"{path} is not a GGUF file: it is a PyTorch pickle. {PICKLE_HINT}")
        if magic != b"GGUF":
            raise CheckpointError(f"{path} is not a GGUF file (bad magic); pass a .gguf file or a model directory "
                                  "(a safetensors file needs the config.json of its directory).")
        return Source("gguf", path.resolve(), name)
    if path.is_dir():
        if is_muse_dir(path):
            return Source("muse", path.resolve(), name)
        if (path / "config.json").is_file():
            return Source("hf", path.resolve(), name)
        raise CheckpointError(f"{path} is a directory without config.json; it is not a model checkpoint.")
    raise ModelNotFoundError(
        f"No model found at {name!r}. Use a bundled name ({', '.join(BUNDLED)}), a .gguf file, "
        "or a Hugging Face / Muse model directory; `muse models` lists what is available."
    )


def _cache_dir(src: Source, precision: str) -> Path:
    st = src.path.stat()
    key = hashlib.sha256(f"{src.path}|{st.st_size}|{st.st_mtime_ns}|{precision}".encode()).hexdigest()[:16]
    stem = src.bundled.name if src.bundled else src.path.stem
    return cache_home() / f"{stem}-{precision}-{key}"


def _convert_gguf(src: Source, precision: str, progress: Progress = _silent):
    from muse.checkpoints.gguf_file import open_reader, read_gguf_config, read_gguf_sampling, read_gguf_weights
    from muse.checkpoints.weights import build_model
    from muse.tokenizer import Tokenizer

    progress(f"Opening {src.path.name}", 0, 0)
    reader = open_reader(src.path)
    config = read_gguf_config(reader, src.path)
    weights = read_gguf_weights(reader, config, keep_packed=precision != "fp32", path=src.path, progress=progress)
    progress("Building the model", 0, 0)
    model, quant = build_model(config, weights, precision, where=str(src.path))
    tokenizer = None
    if "tokenizer.ggml.tokens" in reader.fields:
        progress("Reading the tokenizer", 0, 0)
        tokenizer = read_tokenizer(lambda: Tokenizer.from_gguf(reader), src.path)
    return model, tokenizer, quant, read_gguf_sampling(reader)


def _gguf_sampling(src: Source, cache: Path, meta: dict) -> dict:
    """A cached conversion's recommended sampling. A cache written before Muse kept it reads the
    GGUF's metadata once (the `gguf` reader takes seconds on a large file: 6.5 s for the bilingual
    model) and writes it into the cache's config.json, so later loads stay fast."""
    if "sampling" in meta.get("source", {}):
        return dict(meta["source"]["sampling"])
    import json

    from muse.checkpoints.gguf_file import open_reader, read_gguf_sampling
    from muse.fileio import write_text_atomic

    sampling = read_gguf_sampling(open_reader(src.path))
    meta["source"] = {**meta.get("source", {}), "sampling": sampling}
    try:
        write_text_atomic(cache / "config.json", json.dumps(meta, indent=2))
    except OSError:
        pass  # a read-only cache: correct, only slower next time
    return sampling


def _recommended(src: Source, found: dict) -> dict:
    """The sampling to recommend: the file's own, else its publisher's (a bundled model), else {}."""
    if found or src.bundled is None:
        return found
    return dict(src.bundled.sampling)


def load_checkpoint(name_or_path: str | Path | None = None, precision: str = "auto",
                    progress: Progress | None = None) -> Checkpoint:
    """Load any supported checkpoint as (model, tokenizer, info).

    progress: called as `progress(what, done, total)` at each step (default: the one set by
    `reporting`, else nothing); a first GGUF load reports every tensor it converts."""
    from muse.checkpoints.native import is_muse_dir, load_muse, save_muse
    from muse.checkpoints.weights import PRECISIONS, build_model

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "w4a8":  # the "auto" model (and cache), then int8 activations
        from muse.quant import set_activation_bits

        ckpt = load_checkpoint(name_or_path, "auto", progress)
        ckpt.info.update(precision="w4a8", int8_activation_layers=set_activation_bits(ckpt.model, 8))
        return ckpt
    report = progress or reporter()
    t0 = time.perf_counter()
    if name_or_path is not None and is_adapter_dir(Path(name_or_path).expanduser()):
        return load_adapter_checkpoint(name_or_path, precision)  # a LoRA adapter: its base, adapted and merged
    src = resolve(name_or_path)
    info: dict[str, Any] = {"name": src.name, "path": str(src.path), "format": src.kind, "precision": precision}
    if src.bundled is not None:
        report(f"Verifying {src.bundled.name}", 0, 0)
        verify(src.bundled, src.path)  # cheap (≈0.05 s for the default) and catches tampering
    if src.kind == "muse":
        from muse.checkpoints.hf import read_generation_config

        model, tokenizer, meta = load_muse(src.path)
        info.update(quantization=meta.get("quantization", {}), source=meta.get("source", {}),
                    sampling=read_generation_config(src.path))
    elif src.kind == "hf":
        from muse.checkpoints.hf import hf_to_muse, read_generation_config, read_hf_config, read_hf_tensors
        from muse.tokenizer import Tokenizer

        config = read_hf_config(src.path)
        report(f"Reading {src.path.name}", 0, 0)
        tensors = read_hf_tensors(src.path, config)
        model, quant = build_model(config, hf_to_muse(tensors, config), precision, where=str(src.path))
        has_tok = (src.path / "tokenizer.json").is_file()
        tokenizer = read_tokenizer(lambda: Tokenizer.from_dir(src.path), src.path) if has_tok else None
        info.update(quantization=quant, sampling=read_generation_config(src.path))
    else:
        cache = _cache_dir(src, precision)
        if is_muse_dir(cache):
            model, tokenizer, meta = load_muse(cache)
            info.update(quantization=meta.get("quantization", {}), cached=True,
                        sampling=_recommended(src, _gguf_sampling(src, cache, meta)))
        else:
            model, tokenizer, quant, sampling = _convert_gguf(src, precision, report)
            report("Saving the converted model to the cache", 0, 0)
            save_muse(cache, model, tokenizer, quant,
                      source={"gguf": str(src.path), "precision": precision, "sampling": sampling})
            info.update(quantization=quant, cached=False, sampling=_recommended(src, sampling))
        info["cache"] = str(cache)
    info["load_seconds"] = time.perf_counter() - t0
    return Checkpoint(model, tokenizer, info)


def load_adapter_checkpoint(adapter_dir: str | Path, precision: str = "auto", base: str | Path | None = None,
                            merged: bool = True) -> Checkpoint:
    """The `Checkpoint` of base + LoRA adapter (what `muse.load(adapter_dir)` loads).

    The base is the one the adapter records (or `base`), loaded at fp32 and checked against the
    recorded sha256; see `muse.checkpoints.adapter.adapt` for `precision` and `merged`."""
    from muse.checkpoints.adapter import adapt, base_source
    from muse.checkpoints.weights import PRECISIONS
    from muse.lora import read_adapter_config

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "w4a8":  # merged into fp32 weights, which int4 then packs
        from muse.quant import set_activation_bits

        ckpt = load_adapter_checkpoint(adapter_dir, "int4", base, merged)
        ckpt.info.update(precision="w4a8", int8_activation_layers=set_activation_bits(ckpt.model, 8))
        return ckpt
    adapter_dir = Path(adapter_dir).expanduser()
    config = read_adapter_config(adapter_dir)
    src = base_source(config, adapter_dir, base)
    ckpt = load_checkpoint(src, precision="fp32")
    model, info = adapt(ckpt, config, adapter_dir, precision, merged)
    return Checkpoint(model, ckpt.tokenizer, {**info, "base": src})


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, base: str | Path | None = None) -> Path:
    """`muse lora merge`: write base + adapter as a full fp32 Muse checkpoint in `out_dir`."""
    ckpt = load_adapter_checkpoint(adapter_dir, "fp32", base)
    return save_checkpoint(out_dir, ckpt.model, ckpt.tokenizer, base=ckpt.info["base"],
                           adapter=str(Path(adapter_dir).resolve()))


def read_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint without loading its weights."""
    if is_adapter_dir(Path(path).expanduser()):
        from muse.lora import read_adapter_config

        try:
            return ModelConfig.from_dict(read_adapter_config(path)["model"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}/adapter_config.json has no valid model section ({e!r:.200}).") from e
    src = resolve(path)
    if src.kind == "muse":
        from muse.checkpoints.native import read_muse_config

        return read_muse_config(src.path)
    if src.kind == "hf":
        from muse.checkpoints.hf import read_hf_config

        return read_hf_config(src.path)
    from muse.checkpoints.gguf_file import open_reader, read_gguf_config

    return read_gguf_config(open_reader(src.path), src.path)


def save_checkpoint(path: str | Path, model, tokenizer=None, quant: dict | None = None, **source) -> Path:
    """Save a model in Muse's format (atomically)."""
    from muse.checkpoints.native import save_muse

    return save_muse(path, model, tokenizer, quant, source=source)


__all__ = ["Checkpoint", "Progress", "Source", "load_checkpoint", "read_config", "reporting", "resolve", "save_checkpoint"]
