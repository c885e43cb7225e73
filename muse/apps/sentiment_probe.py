"""Sentiment by a linear probe: a logistic regression over the multilingual embedding of a text.

The probe reads the text's multilingual-e5-small vector (`muse.apps.embed`, the knowledge base's
embedding model) and weighs it with a (384, 3) matrix fitted on labelled examples that ship with Muse:
`data/sentiment_train_en.jsonl` and `data/sentiment_train_zh.jsonl`, written for the project (plain
reviews, concessions where one side wins, sarcasm, polite complaints, facts and questions as
neutral), none taken from the eval sets. One probe serves Chinese and English and every language model:
no language model runs, so it answers in milliseconds and gives real probabilities.

Why a probe: the language models' own methods (likelihood, constrained choice, label similarity) did
not tell neutral facts and concessive reviews apart on the dev sets. `muse.apps.analysis` mixes the
probe into each model's method ("auto"; DEFAULT_METHODS has the figures) or runs it alone
(method "probe").

The fitted weights ship as `data/sentiment_probe.safetensors` with the sha256 of the training files in
its metadata (a test refuses weights older than their data). Refit after changing the data:

    python -m muse.apps.sentiment_probe        # embeds the examples, fits, writes the weights file

The fit is deterministic: full-batch gradient descent from zero on standardised features, with an L2
penalty, folded back into one matrix and bias over the raw unit vectors.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from muse.apps.embed import MODEL_NAME, embed

if TYPE_CHECKING:
    import numpy as np

LABELS = ("positive", "negative", "neutral")  # the columns of W, the order of predict's output
DATA_DIR = Path(__file__).parent / "data"
TRAIN_FILES = ("sentiment_train_en.jsonl", "sentiment_train_zh.jsonl")
WEIGHTS = DATA_DIR / "sentiment_probe.safetensors"
EMBED_KIND = "query"  # e5's side for a text to judge, as the embedding method embeds it
L2 = 1e-2  # on the standardised weights; dev accuracy (en/zh) was 90/95 from 1e-3 to 3e-2, 85/85 at 0.1
STEPS, LEARNING_RATE = 3000, 0.5


def training_items() -> list[dict]:
    """The bundled examples: [{"text", "label"}], English then Chinese."""
    items = []
    for name in TRAIN_FILES:
        for line in (DATA_DIR / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                items.append(json.loads(line))
    return items


def data_digest() -> str:
    """sha256 over the training files' bytes, in TRAIN_FILES order: what the shipped weights were fitted on."""
    h = hashlib.sha256()
    for name in TRAIN_FILES:
        h.update((DATA_DIR / name).read_bytes())
    return h.hexdigest()


def fit(X: "np.ndarray", y: "np.ndarray", l2: float = L2, steps: int = STEPS) -> tuple["np.ndarray", "np.ndarray"]:
    """(W (D, K), b (K,)) of a multinomial logistic regression: X (N, D) features, y (N,) class ids in
    range(K), K = len(LABELS). Features are standardised for the descent (e5's components differ
    by hundredths), then the scaling is folded into W and b."""
    import numpy as np

    X = np.asarray(X, dtype=np.float64)
    mean, std = X.mean(0), X.std(0) + 1e-8
    Z = (X - mean) / std  # (N, D)
    n, k = len(y), len(LABELS)
    onehot = np.eye(k)[y]  # (N, K)
    W, b = np.zeros((Z.shape[1], k)), np.zeros(k)
    for _ in range(steps):
        logits = Z @ W + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / n  # (N, K): d(mean cross-entropy)/d(logits)
        W -= LEARNING_RATE * (Z.T @ g + l2 * W)
        b -= LEARNING_RATE * g.sum(0)
    W_raw = W / std[:, None]
    return W_raw.astype(np.float32), (b - mean @ W_raw).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _weights() -> tuple["np.ndarray", "np.ndarray"]:
    from safetensors.numpy import load_file

    tensors = load_file(str(WEIGHTS))
    return tensors["weight"], tensors["bias"]


def predict(texts: list[str]) -> "np.ndarray":
    """(N, 3) probabilities over LABELS for each text."""
    return predict_vectors(embed(list(texts), EMBED_KIND))


def predict_vectors(X: "np.ndarray") -> "np.ndarray":
    """(N, 3) probabilities over LABELS from the texts' (N, 384) EMBED_KIND vectors, for a caller that
    embedded them already (the embedding method mixed with the probe embeds a text once)."""
    import numpy as np

    W, b = _weights()
    logits = X @ W + b  # (N, 3)
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def refit(path: Path = WEIGHTS) -> dict:
    """Embed the bundled examples, fit the probe and write its weights to `path` (atomically, with the
    data's digest and the embedding model's name in the metadata). Returns the training accuracy."""
    import numpy as np
    from safetensors.numpy import save_file

    items = training_items()
    X = embed([it["text"] for it in items], EMBED_KIND)
    y = np.array([LABELS.index(it["label"]) for it in items])
    W, b = fit(X, y)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"weight": W, "bias": b}, str(tmp),
              metadata={"data_sha256": data_digest(), "embedding_model": MODEL_NAME, "labels": ",".join(LABELS)})
    os.replace(tmp, path)
    _weights.cache_clear()
    return {"examples": len(items), "train_accuracy": float(((X @ W + b).argmax(1) == y).mean())}


def shipped_metadata(path: Path = WEIGHTS) -> dict[str, str]:
    """The metadata the weights file was written with."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        return dict(f.metadata() or {})


if __name__ == "__main__":
    print(refit())
