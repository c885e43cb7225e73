"""The safety audit log: one JSON line per decision in `MUSE_HOME/logs/safety.jsonl`.

    {"time": "2026-05-01T12:00:00.123Z", "event": "moderation", "source": "chat", "direction": "input",
     "action": "warn", "flagged": ["violence"], "scores": {"violence": 0.94}, "language": "en",
     "chars": 15, "text_hmac": "5f1c…"}

The text itself is never written: only its length and an HMAC-SHA256 keyed with a secret made once
per MUSE_HOME (`logs/.safety_key`, readable only by its owner). A plain hash would let anyone holding
the log confirm a guessed phone number or ID in seconds; with the key, only the owner can match a
text to its line. Each line is appended with one write and fsync'ed, so a crash never leaves a
half-written record (a torn last line from a full disk is skipped when reading).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import secrets
import threading
from pathlib import Path

_lock = threading.Lock()


def log_dir() -> Path:
    from muse.paths import muse_home

    return muse_home() / "logs"


def log_path() -> Path:
    return log_dir() / "safety.jsonl"


def _key() -> bytes:
    """The per-MUSE_HOME secret, created atomically on first use (two processes agree on one key)."""
    path = log_dir() / ".safety_key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".safety_key.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_hex(32).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process won the race; then its key is the key
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return path.read_bytes().strip()


def fingerprint(text: str) -> str:
    """HMAC-SHA256 of `text` under this MUSE_HOME's key (hex)."""
    return hmac.new(_key(), text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def write(record: dict) -> None:
    """Append one record (a timestamp is added) to the audit log, flushed to disk."""
    record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
              .replace("+00:00", "Z"), **record}
    line = (json.dumps(record, ensure_ascii=False, sort_keys=False) + "\n").encode("utf-8")
    path = log_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)  # O_APPEND + one write: concurrent writers never interleave a line
            os.fsync(fd)
        finally:
            os.close(fd)


def read(limit: int | None = None) -> list[dict]:
    """The last `limit` records (all when None), oldest first."""
    path = log_path()
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn line (the disk filled mid-write)
    return records[-limit:] if limit else records
