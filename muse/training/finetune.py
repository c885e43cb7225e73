"""Fine-tuning on chats: full or LoRA, through the one training loop.

    muse.training.finetune.finetune(None, "chats.jsonl", "runs/ft", method="lora")

Data is OpenAI-style chats JSONL, one conversation per line:

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

`ChatBatches` renders each conversation with the model's own chat template and takes the
loss only on what the assistant says: each assistant message's content and its
end-of-turn token (e.g. `<|im_end|>`). System and user turns, the template's role headers
and padding get label -100. Which tokens those are is found by rendering the conversation
prefix up to each assistant turn (with the generation prompt) and comparing token
prefixes — the "assistant mask" idea of transformers/TRL — never by searching decoded text.

Examples are padded (not packed) to the longest in their batch, so no example attends
to another. A conversation longer than `block_size` tokens is truncated at the end (its
early turns are kept) with a warning that counts them; one with no assistant token left
after truncation is skipped and counted too (`ChatBatches.stats`).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from muse.errors import MuseError

ROLES = ("system", "user", "assistant", "tool")
METHODS = ("lora", "full")


class ChatDataError(MuseError, ValueError):
    """A chats JSONL file that cannot be used (malformed line, bad roles, nothing to learn)."""


# ----------------------------------------------------------------------------- reading chats

def read_chats(path: str | Path) -> list[list[dict[str, str]]]:
    """Conversations from a chats JSONL file, validated; errors name file:line and the fix."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ChatDataError(f"{path}: no such file; pass a chats JSONL file (one {{\"messages\": [...]}} per line)."
                            ) from None
    except UnicodeDecodeError as e:
        raise ChatDataError(f"{path} is not UTF-8 text ({e}); save it as UTF-8 JSONL.") from None
    except OSError as e:  # a directory, no permission, ...
        raise ChatDataError(f"{path} cannot be read ({e.strerror}); pass a chats JSONL file.") from None
    chats = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ChatDataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                                "each line must be one JSON object.") from None
        chats.append(_check_chat(record, where))
    if not chats:
        example = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}'
        raise ChatDataError(f"{path} holds no conversations; add lines like {example}")
    return chats


def _check_chat(record: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        raise ChatDataError(f'{where}: expected an object with a non-empty "messages" list.')
    messages = []
    for i, m in enumerate(record["messages"]):
        if not isinstance(m, dict):
            raise ChatDataError(f"{where}: messages[{i}] must be an object with \"role\" and \"content\".")
        if m.get("role") not in ROLES:
            raise ChatDataError(f"{where}: messages[{i}] has role {m.get('role')!r}; use one of {', '.join(ROLES)}.")
        if not isinstance(m.get("content"), str):
            raise ChatDataError(f"{where}: messages[{i}] ({m['role']}) needs a string \"content\".")
        messages.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatDataError(f"{where}: the conversation has no assistant message, so there is nothing to learn.")
    return messages


# ----------------------------------------------------------------------------- assistant masks

def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def encode_chat(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation and per-token labels: the id where the assistant
    speaks (content + end-of-turn token), -100 everywhere else.

    For assistant turn i, the span starts where `messages[:i]` rendered with the generation
    prompt ends and stops where `messages[:i+1]` rendered without it ends, both measured as
    the common token prefix with the full rendering (robust to a merge across the boundary).
    The span is cut after its last EOS id, so a template's trailing newline is not learned.
    """
    def ids_of(text: str) -> list[int]:
        has_bos = tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)
        return tokenizer.encode(text, add_special_tokens=not has_bos)

    ids = ids_of(tokenizer.apply_chat_template(messages, add_generation_prompt=False))
    labels = [-100] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = ids_of(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)) if i else []
        upto = ids_of(tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False))
        start, end = _common_prefix(ids, prompt), _common_prefix(ids, upto)
        eos = [j for j in range(start, end) if ids[j] in tokenizer.eos_ids]
        if eos:
            end = eos[-1] + 1
        labels[start:end] = ids[start:end]
    return ids, labels


# ----------------------------------------------------------------------------- batches

@dataclass
class ChatStats:
    conversations: dict[str, int] = field(default_factory=dict)  # per split, after skipping
    truncated: int = 0  # longer than block_size: cut at the end
    skipped: int = 0  # no assistant token left within block_size
    label_tokens: dict[str, int] = field(default_factory=dict)  # tokens that carry loss, per split


class ChatBatches:
    """A `BatchSource` over chats: assistant-only labels, right-padded to the batch's longest row.

    x, y = (B, T) long; y[t] is the label of token t+1 (next-token targets), -100 on prompt
    tokens and padding. Validation: `val_path` if given, else every `val_every`-th conversation
    (the 10th, 20th, ... line) when there are at least `val_every` of them, else the training
    conversations (a tiny dataset has nothing to spare; `stats` says so).
    Row choice is a function of (seed, split, step, micro) and rank slices the global batch.
    """

    def __init__(self, path: str | Path, tokenizer, block_size: int, *, val_path: str | Path | None = None,
                 val_every: int = 10, seed: int = 1337):
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 2:
            raise ValueError(f"block_size must be an integer >= 2, got {block_size!r}")
        if not isinstance(val_every, int) or val_every < 0:
            raise ValueError(f"val_every must be an integer >= 0 (0: no split), got {val_every!r}")
        if tokenizer is None:
            raise ValueError("tokenizer is required: chat fine-tuning needs the model's tokenizer and chat template")
        self.tokenizer, self.max_len, self.seed = tokenizer, block_size, int(seed)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else min(tokenizer.eos_ids or {0})
        chats = read_chats(path)
        if val_path is not None:
            splits = {"train": chats, "val": read_chats(val_path)}
        elif val_every and len(chats) >= val_every:
            splits = {"train": [c for i, c in enumerate(chats) if i % val_every != val_every - 1],
                      "val": [c for i, c in enumerate(chats) if i % val_every == val_every - 1]}
        else:
            splits = {"train": chats, "val": chats}
        self.val_is_train = splits["val"] is chats and val_path is None
        self.stats = ChatStats()
        self._examples: dict[str, list[tuple[list[int], list[int]]]] = {}
        for split, convs in splits.items():
            self._examples[split] = self._encode_all(convs, count=split == "train" or not self.val_is_train)
            if not self._examples[split]:
                raise ChatDataError(f"no {split} conversation fits block_size={block_size} with an assistant "
                                    "token left; raise block_size or shorten the conversations")
            self.stats.conversations[split] = len(self._examples[split])
            self.stats.label_tokens[split] = sum(sum(t != -100 for t in y) for _, y in self._examples[split])
        if self.stats.truncated or self.stats.skipped:
            warnings.warn(
                f"{self.stats.truncated} conversation(s) longer than block_size={block_size} tokens were truncated "
                f"at the end; {self.stats.skipped} with no assistant token left were skipped.", stacklevel=2)

    def _encode_all(self, convs, count: bool) -> list[tuple[list[int], list[int]]]:
        out = []
        for messages in convs:
            ids, labels = encode_chat(self.tokenizer, messages)
            if len(ids) > self.max_len + 1:  # x and y are ids[:-1] and ids[1:]
                ids, labels = ids[: self.max_len + 1], labels[: self.max_len + 1]
                self.stats.truncated += count
            if all(t == -100 for t in labels[1:]):
                self.stats.skipped += count
                continue
            out.append((ids, labels))
        return out

    def __len__(self) -> int:
        return len(self._examples["train"])

    def examples(self, split: str = "train") -> list[tuple[list[int], list[int]]]:
        """(ids, labels) per conversation, before shifting and padding."""
        return self._examples[split]

    def batch(self, split: str, step: int, micro: int, batch_size: int, rank: int = 0, world: int = 1
              ) -> tuple[torch.Tensor, torch.Tensor]:
        from muse.training.batches import SPLITS, check_batch_args

        check_batch_args(split, step, micro, batch_size, rank, world)
        examples, rows = self._examples[split], batch_size * world
        if split == "val":
            # Eval batches walk the validation set in order, so eval_iters batches cover it.
            order = (np.arange(rows) + step * rows) % len(examples)
        else:
            rng = np.random.default_rng([self.seed, SPLITS.index(split), step, micro])
            reps = -(-rows // len(examples))  # whole shuffles, so rows repeat only when they must
            order = np.concatenate([rng.permutation(len(examples)) for _ in range(reps)])[:rows]
        picked = [examples[i] for i in order[rank * batch_size:(rank + 1) * batch_size]]
        T = max(len(ids) for ids, _ in picked) - 1
        x = torch.full((batch_size, T), self.pad_id, dtype=torch.long)
        y = torch.full((batch_size, T), -100, dtype=torch.long)
        for r, (ids, labels) in enumerate(picked):
            n = len(ids) - 1
            x[r, :n] = torch.tensor(ids[:-1])
            y[r, :n] = torch.tensor(labels[1:])
        return x, y


# ----------------------------------------------------------------------------- fine-tuning

def default_settings(method: str) -> dict:
    """The fine-tuning settings that differ from `TrainConfig`'s: short, small batches, a higher LR
    for LoRA. Derived settings (min_lr, lr_decay_iters, save_interval) are left out on purpose:
    `TrainConfig.resolved()` derives them from the final values, whatever the user overrides."""
    return dict(max_iters=100, batch_size=4, grad_accum=1, learning_rate=1e-3 if method == "lora" else 5e-5,
                warmup_iters=5, weight_decay=0.0, eval_interval=50, eval_iters=4, log_interval=10,
                save_interval=0, dtype="fp32")


def default_config(method: str, val_conversations: int | None = None, **settings):
    """The TrainConfig for fine-tuning: `default_settings(method)` with `settings` on top (a name
    TrainConfig does not have is an error, not silently dropped). Given the number of validation
    conversations, eval_iters (unless set) is what covers them once, at most 20 batches."""
    from muse.training.loop import TrainConfig

    cfg = TrainConfig.from_dict({**default_settings(method), **settings})
    if val_conversations is not None and "eval_iters" not in settings:
        cfg = dataclasses.replace(cfg, eval_iters=min(20, -(-val_conversations // cfg.batch_size)))
    return cfg


def finetune(model: str | Path | None, data: str | Path, out_dir: str | Path, *, method: str = "lora",
             rank: int = 8, alpha: float = 16, dropout: float = 0.0,
             targets: str | Iterable[str] | None = None,
             cfg=None, settings: dict[str, Any] | None = None, val_data: str | Path | None = None,
             block_size: int = 512, resume: bool = False) -> Path:
    """Fine-tune `model` (default: the bundled default model) on chats JSONL `data`.

    method="lora" trains rank-`rank` adapters (scale alpha/rank) on the `targets` Linears (module-name
    suffixes such as "qkv", "proj", "gate_up", "down"; default every Linear of the blocks) and
    returns a small adapter directory (adapter.safetensors + adapter_config.json naming the
    base) that `muse.load(dir)` — or `muse lora merge` — applies.
    method="full" trains every weight and returns out_dir/"last", a Muse checkpoint directory
    `muse.load` reads (its training_state.pt, kept for resume=True, may be deleted afterwards).
    The model is loaded at fp32: quantized weights cannot be trained, so a quantized checkpoint
    (like the bundled GGUF) is dequantized first. `cfg` is a `TrainConfig`, or else `settings`
    (e.g. {"learning_rate": 5e-5}) go on top of `default_config(method)`, which also sizes the
    evaluation to the validation set. `block_size` caps a conversation's length in tokens.
    LoRA returns out_dir/"adapter" (the final adapter only). Both leave out_dir/"last" (resumable),
    out_dir/"best" (lowest validation loss, when evals run), metrics.jsonl and loss.png.
    """
    from muse.api import load
    from muse.checkpoints import reporter
    from muse.checkpoints.adapter import base_fingerprint

    settings = _check_before_loading(method, rank, alpha, dropout, cfg, settings, data, val_data)
    loaded = load(model, precision="fp32")
    if loaded.tokenizer is None:
        raise ChatDataError(f"{loaded.name} has no tokenizer; chat fine-tuning needs one (and its chat template).")
    net, tok = loaded.model, loaded.tokenizer
    reporter()(f"Reading {Path(data).name}", 0, 0)
    batches = ChatBatches(data, tok, min(block_size, net.config.block_size), val_path=val_data)
    if cfg is None:
        cfg = default_config(method, batches.stats.conversations["val"], **settings)
    base = str(model) if model is not None else loaded.name
    if method == "full":
        source = {"base": base, "finetune": "full", "data": str(Path(data).resolve())}
        return _train_full(net, tok, batches, cfg, Path(out_dir), resume, source)
    meta = {"rank": rank, "alpha": alpha, "dropout": dropout, "base": base_fingerprint(model, loaded.info),
            "model": net.config.to_dict(), "data": str(Path(data).resolve())}
    return _train_lora(net, tok, batches, cfg, Path(out_dir), resume, targets, meta)


def _check_before_loading(method, rank, alpha, dropout, cfg, settings, data, val_data) -> dict[str, Any]:
    """Everything checkable without the model, so a mistake fails before a slow load; the settings."""
    from muse.lora import check_hparams

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "lora":
        check_hparams(rank, alpha, dropout)
    if cfg is not None and settings:
        raise ValueError("pass cfg or settings, not both: settings go on top of the fine-tuning defaults")
    settings = dict(settings or {})
    if cfg is None:
        default_config(method, **settings)  # checked now; built again once the validation set is known
    read_chats(data)
    if val_data is not None:
        read_chats(val_data)
    return settings


def _train_full(net, tok, batches, cfg, out_dir: Path, resume: bool, source: dict[str, str]) -> Path:
    """Train every weight; out_dir/"last" is a full Muse checkpoint recording `source`."""
    from muse.checkpoints import save_checkpoint
    from muse.training.loop import train

    net.requires_grad_(True)

    def save_full(path: Path, m, t) -> None:
        save_checkpoint(path, m, t, **source)

    train(net, batches, cfg, out_dir, tokenizer=tok, resume=resume, save_fn=save_full)
    return out_dir / "last"


def _train_lora(net, tok, batches, cfg, out_dir: Path, resume: bool, targets, meta: dict[str, Any]) -> Path:
    """Train LoRA adapters on `targets`; returns out_dir/"adapter", the adapter alone."""
    from muse.lora import apply_lora, save_adapter
    from muse.training.loop import train

    targets_list = None if targets is None else [targets] if isinstance(targets, str) else list(targets)
    params = apply_lora(net, meta["rank"], meta["alpha"], targets_list, meta["dropout"])
    meta = {**meta, "targets": targets_list or "all block linears"}

    def save_lora(path: Path, m, t) -> None:
        save_adapter(path, m, meta)

    train(net, batches, cfg, out_dir, tokenizer=tok, resume=resume, params=params, save_fn=save_lora)
    # out_dir/last also holds the optimizer state (for --resume); the adapter alone is what users share.
    return save_adapter(out_dir / "adapter", net, meta)


__all__ = ["ChatBatches", "ChatDataError", "ChatStats", "default_config", "encode_chat", "finetune", "read_chats"]
