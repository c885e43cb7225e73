"""Thumbs up / down on answers, and the liked ones as fine-tuning data.

    from muse.apps.feedback import add_feedback, export_feedback, message_number
    add_feedback(store, +1, "Paris.", [{"role": "user", "content": "Capital of France?"}], comment="short, right")
    assistant.rate(cid, -1, "wrong", message_number(assistant.get_conversation(cid), message_id))  # by its id
    export_feedback(store, "liked.jsonl")    # then: muse finetune --data liked.jsonl

Each feedback row keeps its own copy of the exchange (the prompt messages and the answer), so it survives
the conversation being deleted. When one message is rated more than once, the latest rating counts.
`export_feedback` writes one chat per line in the format `muse finetune` reads
(`{"messages": [...prompt, {"role": "assistant", "content": answer}]}`), liked exchanges only.
"""

from __future__ import annotations

import json
from pathlib import Path

from muse.errors import MuseError
from muse.fileio import write_text_atomic
from muse.store import Store

ROLES = ("system", "user", "assistant", "tool")


def add_feedback(store: Store, rating: int, response: str, prompt: list[dict], comment: str | None = None,
                 message_id: int | None = None) -> int:
    """Record a rating (+1 liked, -1 disliked) of `response`, the answer to the messages `prompt`; returns its id."""
    if rating not in (1, -1) or isinstance(rating, bool):
        raise ValueError(f"rating must be +1 (good) or -1 (bad), got {rating!r}")
    if not isinstance(response, str) or not response.strip():
        raise ValueError("response must be the non-empty text of the answer being rated")
    _check_prompt(prompt)
    if comment is not None and not isinstance(comment, str):
        raise ValueError(f"comment must be text, got {type(comment).__name__}")
    comment = (comment or "").strip() or None
    prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
    with store.transaction():
        cur = store.execute("INSERT INTO feedback (message_id, prompt, response, rating, comment) "
                            "VALUES (?, ?, ?, ?, ?)",
                            (message_id, json.dumps(prompt, ensure_ascii=False), response, rating, comment))
    return cur.lastrowid


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
    """Every rating, oldest first: id, rating, comment, prompt (list of messages), response, message_id, created_at."""
    rows = store.all("SELECT id, rating, comment, prompt, response, message_id, created_at FROM feedback ORDER BY id")
    for r in rows:
        r["prompt"] = json.loads(r["prompt"])
    return rows


def liked_exchanges(store: Store) -> list[list[dict]]:
    """The liked exchanges as chats (prompt + answer), each once, where the latest rating of it is +1."""
    latest: dict = {}  # one key per rated thing: the message it rated, else the exchange's text
    for r in list_feedback(store):
        key = r["message_id"] if r["message_id"] is not None else json.dumps([r["prompt"], r["response"]])
        latest.pop(key, None)  # re-insert so the dict keeps the order of the latest ratings
        latest[key] = r
    chats, seen = [], set()
    for r in latest.values():
        chat = r["prompt"] + [{"role": "assistant", "content": r["response"]}]
        text = json.dumps(chat, ensure_ascii=False)
        if r["rating"] == 1 and text not in seen:
            seen.add(text)
            chats.append(chat)
    return chats


def export_feedback(store: Store, path: "str | Path") -> int:
    """Write the liked exchanges to `path` as chats JSONL for `muse finetune`; returns how many.

    Raises MuseError (and writes nothing) when no answer is liked yet.
    """
    chats = liked_exchanges(store)
    if not chats:
        raise MuseError("No liked answers yet, so there is nothing to export. Rate answers with /good in "
                        "`muse chat` or `muse feedback add --conversation ID --up`.")
    lines = "".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in chats)
    write_text_atomic(path, lines)
    return len(chats)
