"""Muse: a local-first LLM workshop.

    import muse
    m = muse.load()                     # the embedded default model
    print(m.generate("Hello", max_new_tokens=20))

The names below are imported on first use (PEP 562), so `import muse` — and with it every
`muse` command — does not pay for torch until something needs a model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "Model": "muse.api", "load": "muse.api",
    "load_checkpoint": "muse.checkpoints", "save_checkpoint": "muse.checkpoints",
    "ModelConfig": "muse.config",
    "CheckpointError": "muse.errors", "ContextLengthError": "muse.errors",
    "ModelNotFoundError": "muse.errors", "MuseError": "muse.errors",
    "Constraint": "muse.sampling", "ConstraintError": "muse.constrain",
    "GenerationChunk": "muse.generation", "SamplingParams": "muse.generation",
    "generate": "muse.generation", "stream_generate": "muse.generation",
    "KVCache": "muse.model", "Transformer": "muse.model",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'muse' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # for type checkers and IDEs; never run
    from muse.api import Model, load  # noqa: F401
    from muse.checkpoints import load_checkpoint, save_checkpoint  # noqa: F401
    from muse.config import ModelConfig  # noqa: F401
    from muse.errors import CheckpointError, ContextLengthError, ModelNotFoundError, MuseError  # noqa: F401
    from muse.constrain import ConstraintError  # noqa: F401
    from muse.sampling import Constraint  # noqa: F401
    from muse.generation import GenerationChunk, SamplingParams, generate, stream_generate  # noqa: F401
    from muse.model import KVCache, Transformer  # noqa: F401
