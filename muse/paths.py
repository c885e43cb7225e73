"""Where Muse keeps things on disk: one place for `MUSE_HOME`, the model cache and installed packages.

Everything Muse writes lives under `MUSE_HOME` (default `~/.muse`): `muse.db`, converted models
in `cache/`, training runs, safety settings and the audit log. Tests point it at a temporary
directory. This module imports nothing from Muse, so every layer may use it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def muse_home() -> Path:
    """Where Muse keeps its model cache, database and runs (`MUSE_HOME`, default ~/.muse)."""
    return Path(os.environ.get("MUSE_HOME") or Path.home() / ".muse").expanduser()


def cache_home() -> Path:
    """Where converted models are cached (`MUSE_CACHE`, default MUSE_HOME/cache)."""
    return Path(os.environ.get("MUSE_CACHE") or muse_home() / "cache").expanduser()


def package_dir(module: str) -> Path | None:
    """The directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])
