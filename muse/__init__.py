"""Muse: a local-first LLM workshop.

    import muse
    m = muse.load()                     # the embedded default model
    print(m.generate("Hello", max_new_tokens=20))
"""

from muse.api import Model, load
from muse.checkpoints import load_checkpoint, save_checkpoint
from muse.config import ModelConfig
from muse.errors import CheckpointError, ContextLengthError, ModelNotFoundError, MuseError
from muse.generation import GenerationChunk, SamplingParams, generate, stream_generate
from muse.model import KVCache, Transformer

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ContextLengthError", "GenerationChunk", "KVCache", "Model", "ModelConfig",
    "ModelNotFoundError", "MuseError", "SamplingParams", "Transformer", "generate", "load",
    "load_checkpoint", "save_checkpoint", "stream_generate",
]
