"""One SQLite database for everything a user writes: `MUSE_HOME/muse.db`.

Conversations and their messages, personas, remembered facts, knowledge-base documents and their
chunks, versions of texts the writer changed, feedback, and evaluation runs.

- WAL journal with `synchronous=FULL`: a committed row survives a crash or power loss, and readers
  never block the writer.
- Every change goes through `Store.transaction()` (`BEGIN IMMEDIATE` … `COMMIT`): a kill in the
  middle leaves the database as it was before, never a half-written row.
- The schema grows only by append-only, named migration functions (`MIGRATIONS` below). Applied
  names are kept in the `_migrations` table; a database written by a newer Muse is refused rather
  than guessed at. Pending ones are applied in one transaction that reads `_migrations` again
  under the write lock, so processes opening a new database at once each see it migrated once.
- A full disk (or one failing) is a `StoreError` naming the database, and the transaction is rolled
  back: earlier rows are intact (`Store._disk_errors` is the one place that says so).

    from muse.store import Store
    with Store() as db:
        with db.transaction():
            db.execute("INSERT INTO personas (name, system_prompt) VALUES (?, ?)", ("tutor", "..."))
        rows = db.all("SELECT * FROM personas")
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from muse.errors import MuseError
from muse.fileio import disk_full_is_an_error

MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = []
BUSY_TIMEOUT_S = 30.0  # how long a statement waits for another process's write lock


def migration(fn: Callable[[sqlite3.Connection], None]):
    """Register a migration. Never edit or reorder a released one: append a new function."""
    MIGRATIONS.append(fn)
    return fn


class StoreError(MuseError):
    """The database cannot be opened or is not one this Muse understands."""


def default_path() -> Path:
    from muse.paths import muse_home

    return muse_home() / "muse.db"


def now() -> float:
    """Timestamps are Unix seconds (REAL) everywhere in the database."""
    return time.time()


class Store:
    """A connection to the database, safe to share between threads (one lock serialises access)."""

    def __init__(self, path: "str | Path | None" = None):
        self.path = Path(path) if path else default_path()
        with disk_full_is_an_error(self.path.parent):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._disk_errors():
                # isolation_level=None: we issue BEGIN/COMMIT ourselves, so nothing commits implicitly.
                # timeout: the busy timeout, for waits on another process's write lock.
                self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                            timeout=BUSY_TIMEOUT_S)
                self.conn.row_factory = sqlite3.Row
                self._use_wal()
                self.conn.execute("PRAGMA synchronous=FULL")
                self.conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"Cannot open the Muse database {self.path}: {e}. If the file is damaged, "
                             f"move it aside (it will be recreated empty) or restore a backup.") from None
        self._lock = threading.RLock()
        self._depth = 0
        self.migrate()

    def _use_wal(self) -> None:
        """Switch to the WAL journal (a no-op once the file is in WAL mode).

        Two processes converting the same new file at once: SQLite answers the loser BUSY at once,
        without waiting (a lock upgrade that could deadlock), so try again until the busy timeout.
        """
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                self.conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if _code(e) != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    # -- schema -------------------------------------------------------------------

    def migrate(self) -> list[str]:
        """Apply the migrations this database has not seen yet, in one transaction; return their names.

        The pending list is read again under the write lock (BEGIN IMMEDIATE): another process may
        have migrated the database since the first look.
        """
        with self._lock:
            if not self._pending():  # up to date: no write lock taken
                return []
            with self.transaction():
                self.conn.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL)")
                pending = self._pending()
                for fn in pending:
                    fn(self.conn)
                    self.conn.execute("INSERT INTO _migrations (name, applied_at) VALUES (?, ?)", (fn.__name__, now()))
            return [fn.__name__ for fn in pending]

    def _pending(self) -> list[Callable[[sqlite3.Connection], None]]:
        """The migrations not applied yet; StoreError for a database that has ones this Muse lacks."""
        exists = self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_migrations'")
        applied = {r[0] for r in self.conn.execute("SELECT name FROM _migrations")} if exists.fetchone() else set()
        unknown = applied - {fn.__name__ for fn in MIGRATIONS}
        if unknown:
            raise StoreError(f"{self.path} was written by a newer Muse (migrations {sorted(unknown)} are unknown "
                             "here). Upgrade Muse, or point MUSE_HOME at another directory.")
        return [fn for fn in MIGRATIONS if fn.__name__ not in applied]

    def applied_migrations(self) -> list[str]:
        return [r["name"] for r in self.all("SELECT name FROM _migrations ORDER BY applied_at, rowid")]

    # -- access -------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All statements inside commit together or not at all. Nested uses join the outer one."""
        with self._lock, self._disk_errors():
            if self._depth:
                self._depth += 1
                try:
                    yield self.conn
                finally:
                    self._depth -= 1
                return
            self.conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:  # SQLite has already rolled back after some errors (a full disk)
                    self.conn.execute("ROLLBACK")
                raise
            finally:
                self._depth = 0

    def execute(self, sql: str, params: "tuple | dict" = ()) -> sqlite3.Cursor:
        """Run one statement. Outside `transaction()` it commits on its own (autocommit)."""
        with self._lock, self._disk_errors():
            return self.conn.execute(sql, params)

    def one(self, sql: str, params: "tuple | dict" = ()) -> "dict | None":
        with self._lock, self._disk_errors():
            row = self.conn.execute(sql, params).fetchone()
        return dict(row) if row is not None else None

    def all(self, sql: str, params: "tuple | dict" = ()) -> list[dict]:
        with self._lock, self._disk_errors():
            return [dict(r) for r in self.conn.execute(sql, params).fetchall()]

    @contextlib.contextmanager
    def _disk_errors(self) -> Iterator[None]:
        """A full or failing disk as a StoreError naming the database (SQLite has rolled the write back)."""
        try:
            yield
        except sqlite3.OperationalError as e:
            if _code(e) == sqlite3.SQLITE_FULL:
                raise StoreError(f"The disk holding the Muse database {self.path} is full: the change was not "
                                 "saved (earlier ones are intact). Free some space "
                                 f"(`df -h {self.path.parent}`) and try again.") from None
            if _code(e) == sqlite3.SQLITE_IOERR:
                raise StoreError(f"Cannot use the Muse database {self.path} ({e}): its disk may be full, read-only "
                                 "or failing. Nothing was changed (earlier changes are intact).") from None
            raise

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _code(e: sqlite3.Error) -> int:
    """SQLite's primary result code (SQLITE_FULL, SQLITE_BUSY, …) of an error; 0 if it has none."""
    return (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF


# -- migrations (append only) ----------------------------------------------------------


def _script(db: sqlite3.Connection, sql: str) -> None:
    """Run several statements inside the caller's transaction (executescript would COMMIT first)."""
    stmt = ""
    for line in sql.splitlines(keepends=True):
        stmt += line
        if sqlite3.complete_statement(stmt):
            db.execute(stmt)
            stmt = ""
    if stmt.strip():
        raise ValueError(f"incomplete SQL statement in migration: {stmt.strip()[:80]}")


@migration
def m001_assistant(db: sqlite3.Connection) -> None:
    _script(db, """
        CREATE TABLE personas (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            system_prompt TEXT NOT NULL,
            created_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
        );
        CREATE TABLE conversations (
            id TEXT PRIMARY KEY,                 -- short random hex, shown to users
            title TEXT NOT NULL DEFAULT '',
            persona_id INTEGER REFERENCES personas(id) ON DELETE SET NULL,
            model TEXT,
            summary TEXT,                        -- summary of turns dropped from the context
            summarized_through INTEGER,          -- last messages.id the summary covers
            created_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0),
            updated_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
        );
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
            content TEXT NOT NULL,
            meta TEXT,                           -- JSON: citations, token counts, finish reason
            created_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
        );
        CREATE INDEX messages_by_conversation ON messages (conversation_id, id);
        CREATE TABLE memories (
            id INTEGER PRIMARY KEY,
            content TEXT NOT NULL,
            conversation_id TEXT REFERENCES conversations(id) ON DELETE SET NULL,
            created_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
        );
    """)


@migration
def m002_knowledge_base(db: sqlite3.Connection) -> None:
    _script(db, """
        CREATE TABLE documents (
            id INTEGER PRIMARY KEY,
            path TEXT NOT NULL UNIQUE,           -- absolute path, or 'upload:NAME' for uploads
            title TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            mtime REAL,
            meta TEXT,
            added_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0),
            updated_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
        );
        CREATE TABLE chunks (
            id INTEGER PRIMARY KEY,
            document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,                -- position in the document
            text TEXT NOT NULL,
            start INTEGER NOT NULL,              -- character offsets into the extracted text
            end INTEGER NOT NULL,
            embedding BLOB,                      -- float32 vector, or NULL when BM25 only
            UNIQUE (document_id, seq)
        );
    """)


@migration
def m003_writing_feedback_runs(db: sqlite3.Connection) -> None:
    _script(db, """
        CREATE TABLE versions (
            id INTEGER PRIMARY KEY,
            key TEXT NOT NULL,                   -- absolute file path, or a name for pasted text
            seq INTEGER NOT NULL,                -- 1, 2, 3 … per key
            content TEXT NOT NULL,
            action TEXT,                         -- what produced it ('original', 'rewrite', 'restore 2', …)
            created_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0),
            UNIQUE (key, seq)
        );
        CREATE TABLE feedback (
            id INTEGER PRIMARY KEY,
            message_id INTEGER REFERENCES messages(id) ON DELETE SET NULL,
            prompt TEXT NOT NULL,                -- JSON list of messages the answer replied to
            response TEXT NOT NULL,
            rating INTEGER NOT NULL CHECK (rating IN (-1, 1)),
            comment TEXT,
            created_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
        );
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,                  -- 'eval', 'train', …
            config TEXT NOT NULL,                -- JSON
            result TEXT,                         -- JSON, NULL while running
            created_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
        );
    """)


@migration
def m004_message_search(db: sqlite3.Connection) -> None:
    # Full-text index over message content for `Assistant.search`. The trigram tokenizer finds any
    # substring of 3+ characters, so Chinese (no spaces between words) is searchable like English;
    # triggers keep it in step with `messages`, including rows removed by ON DELETE CASCADE.
    _script(db, """
        CREATE VIRTUAL TABLE messages_fts USING fts5(
            content, content='messages', content_rowid='id', tokenize='trigram');
        CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
            INSERT INTO messages_fts (rowid, content) VALUES (new.id, new.content);
        END;
        CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
            INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
        END;
        CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages BEGIN
            INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
            INSERT INTO messages_fts (rowid, content) VALUES (new.id, new.content);
        END;
        INSERT INTO messages_fts (messages_fts) VALUES ('rebuild');
    """)


@migration
def m005_feedback_corrections(db: sqlite3.Connection) -> None:
    # The answer the user wanted instead (a thumbs-down with a correction): fine-tuning data and the
    # reference of the eval item the rating becomes (`muse.apps.feedback`).
    db.execute("ALTER TABLE feedback ADD COLUMN correction TEXT")
