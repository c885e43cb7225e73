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

from muse.checkpoints.hf import read_json
from muse.checkpoints.weights import assemble
from muse.config import ModelConfig
from muse.errors import CheckpointError
from muse.fileio import atomic_dir

FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_muse_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("format") == "muse"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


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
    meta = read_json(path / "config.json")
    if meta.get("format") != "muse":
        raise CheckpointError(f"{path}/config.json is not a Muse checkpoint config.")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer Muse (format {meta['format_version']}); upgrade Muse.")
    return meta


def load_muse(path: str | Path):
    """(model, tokenizer or None, meta) from a Muse checkpoint directory."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_muse_meta(path)
    try:
        config = ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json has an invalid model section: {e}") from e
    try:
        state = load_file(str(path / "model.safetensors"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}/model.safetensors is missing.") from None
    except Exception as e:
        raise CheckpointError(f"{path}/model.safetensors is corrupt or truncated ({e}).") from e
    model = assemble(config, state, meta.get("quantization", {}), DTYPES.get(meta.get("dtype"), torch.float32))
    tokenizer = None
    if (path / "tokenizer.json").exists():
        from muse.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(path)
    return model, tokenizer, meta
