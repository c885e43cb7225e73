"""Perplexity and bits per byte of a model on a text, a set of files, or a prepared data directory.

    r = perplexity(model, "Some long text ...")              # or a list of token ids
    r.tokens, r.loss, r.perplexity, r.bits_per_byte, r.bytes
    r = corpus_perplexity(model, ["book.txt", "notes/"])      # files, folders, globs, a prepared dir

Sliding window, as in Hugging Face's perplexity guide: windows of `window` tokens start every
`stride` tokens and each window scores only the tokens the previous one did not, so every token is
scored once, with up to `window - 1` tokens of context. `stride == window` gives disjoint chunks
(the plain "full-window" loss; the first token of each chunk then has no context and is not scored).

Where a text starts. `encode` prepends BOS for tokenizers that want one; otherwise the tokenizer's
document separator (its first EOS token, the one `muse data prepare` puts between documents) is put
in front, so the first real token is scored too. Only a tokenizer with neither (a character-level
one) leaves the first token unscored, and its bytes are then not counted either.

Bits per byte = total nats / ln 2 / UTF-8 bytes of the scored text: unlike perplexity per token,
it does not depend on how finely a tokenizer cuts the text, so different models compare fairly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from muse.errors import MuseError

DEFAULT_WINDOW = 1024  # capped at the model's context; (window × vocab) float32 logits per step


@dataclass
class PerplexityResult:
    """tokens scored, mean loss in nats/token, exp(loss), bits per UTF-8 byte, bytes scored."""

    tokens: int
    loss: float
    perplexity: float
    bits_per_byte: float | None  # None when the bytes are unknown (token ids and no tokenizer)
    bytes: int
    window: int | None = None
    stride: int | None = None

    @property
    def nats(self) -> float:
        return self.loss * self.tokens

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_totals(cls, nats: float, tokens: int, nbytes: int | None, window=None, stride=None) -> PerplexityResult:
        if tokens < 1:
            raise MuseError("Nothing to score: the text is shorter than two tokens. Give a longer text.")
        loss = nats / tokens
        bpb = nats / math.log(2) / nbytes if nbytes else None
        return cls(tokens, loss, math.exp(loss), bpb, nbytes or 0, window, stride)

    @classmethod
    def total(cls, results: Sequence[PerplexityResult]) -> PerplexityResult:
        """Several results pooled as one corpus (token- and byte-weighted, not a mean of means)."""
        nbytes = sum(r.bytes for r in results) if all(r.bits_per_byte is not None for r in results) else None
        return cls.from_totals(sum(r.nats for r in results), sum(r.tokens for r in results), nbytes,
                               results[0].window, results[0].stride)


def check_window(model, window: int | None, stride: int | None) -> tuple[int, int]:
    """(window, stride) with defaults filled in: window = min(1024, context), stride = window // 2."""
    limit = model.config.block_size
    window = min(DEFAULT_WINDOW, limit) if window is None else window
    if not 2 <= window <= limit:
        raise ValueError(f"window must be between 2 and the model's context ({limit}) tokens, got {window}")
    stride = max(1, window // 2) if stride is None else stride
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be between 1 and window ({window}), got {stride}: a larger stride "
                         "would skip tokens")
    return window, stride


def windows(n: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first): feed ids[begin:end] and score the tokens first … end-1.

    Hugging Face's loop: the window slides by `stride`; each scores what the previous did not reach.
    """
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        first = max(prev_end, begin + 1)  # the window's first token has no context inside it
        if first < end:
            yield begin, end, first
        prev_end = end
        if end == n:
            break


def start_ids(tokenizer, text: str) -> tuple[list[int], bool]:
    """Token ids of `text` with a start token in front; the bool says whether there is one."""
    ids = tokenizer.encode(text, add_special_tokens=True)
    if tokenizer.add_bos:
        return ids, True
    if tokenizer.eos_tokens:
        return [tokenizer.token_to_id(tokenizer.eos_tokens[0])] + ids, True
    return ids, False


def _as_ids(model, text_or_ids) -> tuple[list[int], int | None]:
    """(ids, bytes of the scored text): ids[0] is context only, everything after it is scored."""
    tok = model.tokenizer
    if isinstance(text_or_ids, str):
        if tok is None:
            raise ValueError(f"{model.name} has no tokenizer; pass token ids instead of text")
        ids, started = start_ids(tok, text_or_ids)
        if started:
            return ids, len(text_or_ids.encode("utf-8"))
        return ids, len(tok.decode(ids[1:]).encode("utf-8"))
    ids = [int(i) for i in text_or_ids]
    nbytes = len(tok.decode(ids[1:], skip_special_tokens=True).encode("utf-8")) if tok is not None else None
    return ids, nbytes


@torch.inference_mode()
def score_windows(net, ids: list[int], window: int, stride: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """For each window: (log-probs (S, V) float32 of the S scored positions, their target ids (S,))."""
    x = torch.tensor(ids, dtype=torch.long, device=net.device)
    for begin, end, first in windows(len(ids), window, stride):
        logits, _ = net(x[begin:end][None])  # (1, T, V)
        # logits[t] predicts token begin + t + 1, so tokens first … end-1 come from t = first-begin-1 … T-2
        scored = logits[0, first - begin - 1:end - begin - 1]
        yield F.log_softmax(scored.float(), dim=-1), x[first:end]


def perplexity(model, text_or_ids: "str | Sequence[int]", window: int | None = None, stride: int | None = None,
               on_progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Perplexity of `model` (a `muse.api.Model`) on one text or one sequence of token ids.

    Token ids are taken as they are: ids[0] is context only (put BOS/EOS there yourself).
    `on_progress(scored, total)` is called after each window.
    """
    window, stride = check_window(model, window, stride)
    ids, nbytes = _as_ids(model, text_or_ids)
    if len(ids) < 2:
        raise MuseError("Nothing to score: the text is shorter than two tokens. Give a longer text.")
    nats, tokens = 0.0, 0
    for logp, target in score_windows(model.model, ids, window, stride):
        nats -= logp.gather(1, target[:, None]).sum().item()
        tokens += len(target)
        if on_progress is not None:
            on_progress(tokens, len(ids) - 1)
    return PerplexityResult.from_totals(nats, tokens, nbytes, window, stride)


# -- corpora ----------------------------------------------------------------------------------


def corpus_perplexity(model, sources, window: int | None = None, stride: int | None = None,
                      on_progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Pooled perplexity over files, folders, globs (each file one document, scored on its own),
    or a prepared data directory (`muse data prepare`; its validation split is scored)."""
    results = [perplexity(model, doc, window, stride, on_progress) for doc in documents(model, sources)]
    return PerplexityResult.total(results)


def documents(model, sources) -> list["str | list[int]"]:
    """The texts (or, for a prepared directory, token ids) that `sources` name; empty files left out."""
    sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
    docs: list = []
    for src in sources:
        if (Path(src) / "manifest.json").is_file():
            docs.append(prepared_ids(model, src))
            continue
        from muse.training.data import resolve_sources

        docs += [t for t in map(read_text, resolve_sources([src])) if t.strip()]
    if not docs:
        raise MuseError(f"No text to score in {', '.join(map(str, sources))}: the files are empty.")
    return docs


def read_text(file: Path) -> str:
    try:
        return Path(file).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MuseError(f"{file} is not UTF-8 text (byte {e.start} is invalid). Convert it to UTF-8 "
                        "(e.g. `iconv -f GBK -t UTF-8`) or leave it out.") from None


def prepared_ids(model, data_dir) -> list[int]:
    """The validation split of a prepared directory (the training split if it has none)."""
    from muse.training.data import load_prepared

    data = load_prepared(data_dir)
    if model.tokenizer is not None and not same_vocabulary(data.tokenizer, model.tokenizer):
        raise MuseError(f"{data_dir} was prepared with a different tokenizer than {model.name}'s, so its token "
                        "ids mean other text. Score the raw text files instead, or prepare the data again with "
                        f"`--tokenizer {model.name}`.")
    ids = data.val if len(data.val) >= 2 else data.train
    return ids.tolist()


def same_vocabulary(a, b) -> bool:
    """Whether two tokenizers map the same strings to the same ids (so their ids are interchangeable)."""
    return a.backend.get_vocab(with_added_tokens=True) == b.backend.get_vocab(with_added_tokens=True)
