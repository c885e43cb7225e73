"""Files sent by users (the web app's uploads) added to the knowledge base, and paths kept safe.

    from muse.apps.uploads import add_uploads, upload_name
    added = add_uploads(kb, muse_home() / "uploads", [(upload_name("notes.pdf"), data)])

`add_uploads` is all or nothing: every file is extracted first, and one that gives no text (or is a
bomb, or over a limit) refuses the whole batch with an `UploadError` naming it; only then are the
files written to the folder and indexed, each path built with `muse.fileio.safe_join`.
"""

from __future__ import annotations

import time
from pathlib import Path

from muse.errors import MuseError
from muse.fileio import replacing, safe_join

class UploadError(MuseError):
    """An upload refused as a whole. `code`: "invalid_name" (not a plain file name) or
    "unreadable_file" (a file that gives no text, a bomb, a file over a limit)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def upload_name(name: str | None) -> str:
    """A plain file name (no folders) as sent, stripped; UploadError for anything else. `add_uploads`
    checks it with `safe_join` as well (length, NUL bytes)."""
    name = (name or "").strip()
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise UploadError(f"Upload file names must be plain names like notes.pdf, got {name!r}.", "invalid_name")
    return name


def add_uploads(kb, folder: "str | Path", uploads: list[tuple[str, bytes]], extractor=None) -> list[dict]:
    """Add files sent as (name, bytes) to the knowledge base `kb`, each saved as folder/name.

    Every file is extracted once before anything is written: one that gives no text refuses the
    whole batch (UploadError naming it), so nothing is half-added. Returns each document as
    `kb.list()` shows it, with "status" (added | updated | unchanged) and the "name" it was sent as.

    extractor: a `muse.apps.extract.Extractor` (a fresh one by default); `cancel()` on it from another
    thread (a client that left) stops the work: nothing more is extracted or written, ExtractError.
    """
    from muse.apps.extract import CANCELLED, ExtractError, Extractor

    extractor = extractor or Extractor()
    uploads = [(upload_name(name), data) for name, data in uploads]
    paths = [safe_join(folder, name) for name, _ in uploads]  # every name checked before any work
    prepared = []
    with extractor:
        for (name, data), path in zip(uploads, paths):
            try:
                prepared.append(kb.prepare(path, data, extractor))
            except ExtractError as e:
                raise UploadError(f"{name}: {e}", "unreadable_file") from None
    saved = []
    for (name, data), path, ready in zip(uploads, paths, prepared):
        if extractor.cancelled:
            raise ExtractError(CANCELLED)
        # The file takes its name only once its document is committed: a kill before that leaves a
        # temp sibling (`muse.fileio.remove_stale_temps` clears those), never a file the knowledge base lacks.
        with replacing(path, data):
            status = kb.save(ready, mtime=time.time())[0]
        saved.append((name, str(path), status))
    docs = {d["path"]: d for d in kb.list()}
    return [{**docs[path], "status": status, "name": name} for name, path, status in saved]
