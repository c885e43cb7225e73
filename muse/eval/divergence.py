"""How far one model's next-token distributions are from another's on the same text.

    r = kl_divergence(base, quantized, text)
    r.mean, r.p99, r.same_top1     # KL(base ‖ other) in nats per position; % positions with the same argmax

Like llama.cpp's `perplexity --kl-divergence`: the baseline's distribution P and the other's Q at
every scored position (the same sliding windows as `perplexity`), KL(P‖Q) = Σ P (log P − log Q).
Both models must share a tokenizer (e.g. one model at two precisions).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from muse.errors import MuseError
from muse.eval.perplexity import _as_ids, check_window, documents, same_vocabulary, score_windows


_ROWS = 128  # positions per float64 block: 128 × 152k vocabulary × 8 bytes ≈ 155 MB


@dataclass
class KLResult:
    positions: int
    mean: float  # nats per position
    median: float
    p99: float
    max: float
    same_top1: float  # % of positions where both models' most likely token agree
    loss_base: float  # the two models' loss on the same tokens (nats/token)
    loss_other: float

    def to_dict(self) -> dict:
        return asdict(self)


def check_same_tokenizer(a, b) -> None:
    ta, tb = a.tokenizer, b.tokenizer
    if a.config.vocab_size != b.config.vocab_size or (
            ta is not None and tb is not None and not same_vocabulary(ta, tb)):
        raise MuseError(f"{a.name} and {b.name} use different tokenizers, so their next-token distributions "
                        "cannot be compared position by position. Compare perplexity or bits per byte instead.")


def kl_divergence(base, other, text_or_ids: "str | Sequence[int]", window: int | None = None,
                  stride: int | None = None) -> KLResult:
    """KL(base ‖ other) per position over a text: mean, median, p99 and max, plus same top-1 %."""
    return _kl(base, other, [text_or_ids], window, stride)


def corpus_kl_divergence(base, other, sources, window: int | None = None, stride: int | None = None) -> KLResult:
    """`kl_divergence` pooled over every position of the files / prepared directory `sources` name."""
    return _kl(base, other, documents(base, sources), window, stride)


@torch.inference_mode()
def _kl(base, other, docs: list, window: int | None, stride: int | None) -> KLResult:
    check_same_tokenizer(base, other)
    window, stride = check_window(base, window, stride)
    check_window(other, window, stride)
    kls, same, nats_p, nats_q = [], 0, 0.0, 0.0
    for doc in docs:
        ids, _ = _as_ids(base, doc)
        for (logp, target), (logq, _) in zip(score_windows(base.model, ids, window, stride),
                                             score_windows(other.model, ids, window, stride)):
            for a in range(0, len(target), _ROWS):  # float64 (rows, V) blocks bound the memory
                p, q, t = logp[a:a + _ROWS].double(), logq[a:a + _ROWS].double(), target[a:a + _ROWS, None]
                kls.append((p.exp() * (p - q)).sum(-1).clamp_min(0))  # tiny negatives are rounding
                same += (p.argmax(-1) == q.argmax(-1)).sum().item()
                nats_p -= p.gather(1, t).sum().item()
                nats_q -= q.gather(1, t).sum().item()
    if not kls:
        raise MuseError("Nothing to compare: the text is shorter than two tokens. Give a longer text.")
    kl = torch.cat(kls).numpy()  # (positions,); numpy: torch.quantile refuses more than 16M values
    n = len(kl)
    return KLResult(n, float(kl.mean()), float(np.median(kl)), float(np.percentile(kl, 99)), float(kl.max()),
                    100.0 * same / n, nats_p / n, nats_q / n)
