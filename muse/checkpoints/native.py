"""Muse's own checkpoint format — also the cache format for converted GGUF files.

A directory holding:
  config.json        {"format": "muse", "format_version": 1, "model": ModelConfig,
                      "dtype", "quantization": {module: {bits, group_size}}, "source": {...}}
  model.safetensors  Muse parameter names; quantized layers as qweight/scales/mins
  tokenizer.json, tokenizer_config.json   (optional: a model without them gives raw logits)

Writes are atomic: everything goes to a temporary sibling directory that is renamed
into place, so a crash or full disk leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from muse.checkpoints.files import MAX_CONFIG_BYTES, SafetensorsFile, model_file, read_json, read_tokenizer
from muse.checkpoints.weights import assemble
from muse.config import ModelConfig
from muse.errors import CheckpointError
from muse.fileio import atomic_dir

FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_muse_dir(path: Path) -> bool:
    """Whether `path` holds a Muse checkpoint (its config.json says "format": "muse")."""
    try:
        cfg = model_file(path, "config.json")
        if not cfg.is_file() or cfg.stat().st_size > MAX_CONFIG_BYTES:
            return False  # a huge config.json is refused, with reasons, by whichever loader reads it
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (CheckpointError, OSError, ValueError, RecursionError):  # a link out; bad JSON or UTF-8
        return False
    return isinstance(data, dict) and data.get("format") == "muse"


def save_muse(path: str | Path, model, tokenizer=None, quant: dict | None = None,
              source: dict[str, Any] | None = None) -> Path:
    """Write a model (and tokenizer) atomically as a Muse checkpoint directory."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        dtype = next((v.dtype for v in state.values() if v.is_floating_point() and v.dim() == 1), torch.float32)
        meta = {
            "format": "muse",
            "format_version": FORMAT_VERSION,
            "model": model.config.to_dict(),
            "dtype": str(dtype).removeprefix("torch."),
            "quantization": quant or {},
            "source": source or {},
        }
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(tmp)

    return atomic_dir(path, write)


def read_muse_meta(path: Path) -> dict:
    meta = read_json(model_file(path, "config.json"))
    where = f"{path}/config.json"
    if meta.get("format") != "muse":
        raise CheckpointError(f"{where} is not a Muse checkpoint config.")
    version = meta.get("format_version", 0)
    if type(version) is not int:
        raise CheckpointError(f"{where}: format_version must be an integer, got {version!r:.60}.")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer Muse (format {version}); upgrade Muse.")
    for key, kind in (("model", dict), ("quantization", dict), ("dtype", str), ("source", dict)):
        if key in meta and not isinstance(meta[key], kind):
            raise CheckpointError(f"{where}: {key} must be a JSON {'object' if kind is dict else 'string'}, "
                                  f"got {meta[key]!r:.60}.")
    return meta


def read_muse_config(path: Path, meta: dict | None = None) -> ModelConfig:
    """The ModelConfig of a Muse checkpoint directory (its config.json's "model")."""
    meta = read_muse_meta(path) if meta is None else meta
    try:
        return ModelConfig.from_dict(meta["model"])
    except KeyError:
        raise CheckpointError(f"{path}/config.json has no model section; the checkpoint is incomplete.") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json has an invalid model section: {e}") from e


def load_muse(path: str | Path):
    """(model, tokenizer or None, meta) from a Muse checkpoint directory."""
    path = Path(path)
    meta = read_muse_meta(path)
    config = read_muse_config(path, meta)
    weights = model_file(path, "model.safetensors")
    st = SafetensorsFile(weights)
    state = {name: st.get(name) for name in st.specs}
    model = assemble(config, state, meta.get("quantization", {}), DTYPES.get(meta.get("dtype"), torch.float32),
                     where=str(weights))
    tokenizer = None
    if (path / "tokenizer.json").exists():
        from muse.tokenizer import Tokenizer

        tokenizer = read_tokenizer(lambda: Tokenizer.from_dir(path), path)
    return model, tokenizer, meta
