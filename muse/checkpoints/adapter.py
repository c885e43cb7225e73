"""LoRA adapters as checkpoints: find an adapter's base model, check it is the one it was trained on,
apply the adapter and merge it into plain weights (`muse.load(adapter_dir)`, `muse lora merge`).

The layers and the adapter file format live in `muse.lora`; training adapters in `muse.training.finetune`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from muse.checkpoints.registry import find_bundled
from muse.errors import CheckpointError
from muse.checkpoints.weights import build_model
from muse.lora import load_adapter, merge_lora



def base_fingerprint(name_or_path: str | Path | None, info: dict[str, Any]) -> dict[str, Any]:
    """Identify the base model an adapter belongs to: what the user called it, its resolved
    path, and the sha256 + size of its weight file(s), so a changed base is detected."""
    path = Path(info.get("path", "")) if info.get("path") else None
    entry: dict[str, Any] = {"name": str(name_or_path) if name_or_path is not None else info.get("name"),
                             "path": str(path) if path else None}
    if path is not None and path.exists():
        entry.update(_weights_digest(path))
    return entry


def _weights_digest(path: Path) -> dict[str, Any]:
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    h, size = hashlib.sha256(), 0
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        size += f.stat().st_size
    return {"sha256": h.hexdigest(), "size": size}


def base_source(config: dict[str, Any], adapter_dir: Path, base: str | Path | None) -> str:
    """Where to load the base from: the caller's choice, else the recorded name or path."""
    if base is not None:
        return str(base)
    rec = config.get("base") or {}
    name = rec.get("name")
    if name and find_bundled(str(name)) is not None:
        return str(name)
    for candidate in (rec.get("path"), name):
        if candidate and Path(candidate).expanduser().exists():
            return str(candidate)
    raise CheckpointError(
        f"The base model of the adapter in {adapter_dir} ({rec.get('name') or rec.get('path')!r}) "
        "was not found; pass the base explicitly (base=... / --base PATH)."
    )


def check_base(config: dict[str, Any], info: dict[str, Any], adapter_dir: Path) -> None:
    rec = config.get("base") or {}
    if not rec.get("sha256") or not info.get("path"):
        return
    path = Path(info["path"])
    if not path.exists():
        return
    got = _weights_digest(path)
    if got["size"] != rec.get("size") or got["sha256"] != rec["sha256"]:
        raise CheckpointError(
            f"The adapter in {adapter_dir} was trained on a base with sha256 {rec['sha256'][:12]}…, "
            f"but {path} has sha256 {got['sha256'][:12]}…; use the original base model."
        )


def adapt(base: Any, config: dict[str, Any], adapter_dir: Path, precision: str, merged: bool = True):
    """(model, info) of the loaded fp32 `base` checkpoint with the adapter in `adapter_dir` applied.

    The base is checked against the recorded sha256 first. With `merged` (the default) the
    adapter is folded into plain weights; precision "auto"/"fp32" keeps fp32, "bf16"/"int8"/"int4"
    converts the merged weights as `muse.load` would.
    """
    check_base(config, base.info, adapter_dir)
    model = load_adapter(base.model, adapter_dir)
    info = {**base.info, "adapter": str(adapter_dir), "precision": precision}
    if not merged:
        return model, info
    model = merge_lora(model)
    if precision not in ("auto", "fp32"):
        state = {k: v.detach() for k, v in model.state_dict().items()}
        model, info["quantization"] = build_model(model.config, state, precision)
    return model, info
