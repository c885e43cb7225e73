"""Thumbs up / down on answers, with corrections: fine-tuning data and eval items.

    from muse.apps.feedback import add_feedback, export_feedback, message_number
    add_feedback(store, +1, "Paris.", [{"role": "user", "content": "Capital of France?"}], comment="short, right")
    add_feedback(store, -1, "Lyon.", prompt, correction="Paris.")    # a bad answer and the right one
    assistant.rate(cid, -1, "wrong", message_number(assistant.get_conversation(cid), message_id))  # by its id
    export_feedback(store, "train.jsonl")              # then: muse finetune --data train.jsonl
    export_feedback(store, "items.jsonl", kind="eval")  # then: muse eval -s items.jsonl

Each feedback row keeps its own copy of the exchange (the prompt messages and the answer), so it survives
the conversation being deleted. When one message is rated more than once, the latest rating counts.

The ratings close the loop in two ways:
- **fine-tuning data** (`kind="finetune"`): one chat per line in the format `muse finetune` reads
  (`{"messages": [...prompt, {"role": "assistant", "content": answer}]}`): every liked answer, and for a
  disliked one the user's correction in its place (a disliked answer without a correction is not
  training data: it says what not to write, not what to write).
- **eval items** (`kind="eval"`): every disliked answer as `{"messages": prompt, "rejected": answer,
  "reference": correction}` (reference only where there is one), which `muse eval -s FILE` scores: does
  the model now give the correction, and does it avoid the rejected answer.
"""

from __future__ import annotations

import json
from pathlib import Path

from muse.errors import MuseError
from muse.fileio import write_text_atomic
from muse.store import Store

ROLES = ("system", "user", "assistant", "tool")
KINDS = ("finetune", "eval")


def add_feedback(store: Store, rating: int, response: str, prompt: list[dict], comment: str | None = None,
                 message_id: int | None = None, correction: str | None = None) -> int:
    """Record a rating (+1 liked, -1 disliked) of `response`, the answer to the messages `prompt`; returns its id.

    `correction` is the answer the user wanted instead (only with a -1 rating)."""
    if rating not in (1, -1) or isinstance(rating, bool):
        raise ValueError(f"rating must be +1 (good) or -1 (bad), got {rating!r}")
    if not isinstance(response, str) or not response.strip():
        raise ValueError("response must be the non-empty text of the answer being rated")
    _check_prompt(prompt)
    if comment is not None and not isinstance(comment, str):
        raise ValueError(f"comment must be text, got {type(comment).__name__}")
    comment = (comment or "").strip() or None
    correction = _check_correction(correction, rating, response)
    prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
    with store.transaction():
        cur = store.execute("INSERT INTO feedback (message_id, prompt, response, rating, comment, correction) "
                            "VALUES (?, ?, ?, ?, ?, ?)",
                            (message_id, json.dumps(prompt, ensure_ascii=False), response, rating, comment,
                             correction))
    return cur.lastrowid


def _check_correction(correction, rating: int, response: str) -> str | None:
    if correction is None:
        return None
    if not isinstance(correction, str):
        raise ValueError(f"correction must be text, got {type(correction).__name__}")
    if not correction.strip():
        return None
    if rating != -1:
        raise ValueError("a correction goes with a thumbs-down (-1): it is the answer wanted instead")
    if correction.strip() == response.strip():
        raise ValueError("the correction is the same as the answer; give the answer you wanted instead")
    return correction.strip()


def _check_prompt(prompt) -> None:
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("prompt must be the non-empty list of {'role', 'content'} messages the answer replied to")
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"prompt[{i}] must be a dict with role {'|'.join(ROLES)} and string content")


def message_number(conversation: dict, message_id: int) -> int:
    """The position `n` (what `Assistant.rate` takes) of the message with id `message_id` (the ids the
    server's API shows) in `conversation` (as `Assistant.get_conversation` returns it); MuseError if
    that message is not in it."""
    n = next((m["n"] for m in conversation["messages"] if m["id"] == message_id), None)
    if n is None:
        raise MuseError(f"Message {message_id} is not in conversation {conversation['id']}.")
    return n


def list_feedback(store: Store) -> list[dict]:
    """Every rating, oldest first: id, rating, comment, correction, prompt (list of messages), response,
    message_id, created_at."""
    rows = store.all("SELECT id, rating, comment, correction, prompt, response, message_id, created_at "
                     "FROM feedback ORDER BY id")
    for r in rows:
        r["prompt"] = json.loads(r["prompt"])
    return rows


def latest_ratings(store: Store) -> list[dict]:
    """The rows of `list_feedback` that count: the latest rating of each rated thing (the message it
    rated, else the exchange's text), ordered by when that latest rating was given."""
    latest: dict = {}
    for r in list_feedback(store):
        key = r["message_id"] if r["message_id"] is not None else json.dumps([r["prompt"], r["response"]])
        latest.pop(key, None)  # re-insert so the dict keeps the order of the latest ratings
        latest[key] = r
    return list(latest.values())


def training_chats(store: Store) -> list[list[dict]]:
    """Fine-tuning chats (prompt + the answer to learn), each once: liked answers, and the corrections
    of disliked ones."""
    chats, seen = [], set()
    for r in latest_ratings(store):
        answer = r["response"] if r["rating"] == 1 else r["correction"]
        if answer is None:
            continue
        chat = r["prompt"] + [{"role": "assistant", "content": answer}]
        text = json.dumps(chat, ensure_ascii=False)
        if text not in seen:
            seen.add(text)
            chats.append(chat)
    return chats


def eval_items(store: Store) -> list[dict]:
    """Every disliked answer as an eval item: {"messages", "rejected", "reference" (the correction, if any)}."""
    items, seen = [], set()
    for r in latest_ratings(store):
        if r["rating"] != -1:
            continue
        item = {"messages": r["prompt"], "rejected": r["response"]}
        if r["correction"]:
            item["reference"] = r["correction"]
        text = json.dumps(item, ensure_ascii=False, sort_keys=True)
        if text not in seen:
            seen.add(text)
            items.append(item)
    return items


def export_feedback(store: Store, path: "str | Path", kind: str = "finetune") -> int:
    """Write the feedback to `path` as JSONL; returns how many lines. kind="finetune": chats for
    `muse finetune --data` (`training_chats`); kind="eval": items for `muse eval -s` (`eval_items`).

    Raises MuseError (and writes nothing) when there is nothing of that kind yet.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "finetune":
        rows = [{"messages": c} for c in training_chats(store)]
        empty = ("No liked or corrected answers yet, so there is nothing to fine-tune on. Rate answers with "
                 "/good in `muse chat`, or `muse feedback add --conversation ID --down --correction TEXT`.")
    else:
        rows = eval_items(store)
        empty = ("No disliked answers yet, so there are no eval items. Rate answers with /bad in `muse chat` "
                 "or `muse feedback add --conversation ID --down`.")
    if not rows:
        raise MuseError(empty)
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)
