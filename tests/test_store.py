"""The one SQLite database: WAL, named migrations applied once, atomic transactions, crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from muse import store as store_mod
from muse.store import MIGRATIONS, Store, StoreError


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "muse.db"


def test_default_location_and_pragmas(muse_home):
    with Store() as db:
        assert db.path == muse_home / "muse.db" and db.path.exists()
        assert db.one("PRAGMA journal_mode")["journal_mode"] == "wal"
        assert db.one("PRAGMA synchronous")["synchronous"] == 2  # FULL
        assert db.one("PRAGMA foreign_keys")["foreign_keys"] == 1


def test_migrations_applied_once_in_order_and_recorded(db_path, monkeypatch):
    names = [fn.__name__ for fn in MIGRATIONS]
    with Store(db_path) as db:
        assert db.applied_migrations() == names
        assert db.migrate() == []
    calls = []

    def m999_extra(conn):
        calls.append(1)
        conn.execute("CREATE TABLE extra (x INTEGER)")

    monkeypatch.setattr(store_mod, "MIGRATIONS", MIGRATIONS + [m999_extra])
    for _ in range(2):  # a later Muse adds a migration: applied on the next open, and only then
        with Store(db_path) as db:
            assert db.applied_migrations() == names + ["m999_extra"]
    assert calls == [1]
    with Store(db_path) as db:
        assert db.one("SELECT count(*) AS n FROM _migrations")["n"] == len(names) + 1


def test_failed_migration_changes_nothing(db_path, monkeypatch):
    Store(db_path).close()

    def m999_broken(conn):
        conn.execute("CREATE TABLE half (x INTEGER)")
        raise RuntimeError("bug in the migration")

    monkeypatch.setattr(store_mod, "MIGRATIONS", MIGRATIONS + [m999_broken])
    with pytest.raises(RuntimeError):
        Store(db_path)
    monkeypatch.setattr(store_mod, "MIGRATIONS", MIGRATIONS)
    with Store(db_path) as db:
        assert "m999_broken" not in db.applied_migrations()
        assert db.one("SELECT name FROM sqlite_master WHERE name = 'half'") is None


def test_database_from_a_newer_muse_is_refused(db_path):
    with Store(db_path) as db:
        db.execute("INSERT INTO _migrations (name, applied_at) VALUES ('m999_from_the_future', 0)")
    with pytest.raises(StoreError, match="newer Muse.*m999_from_the_future"):
        Store(db_path)


def test_damaged_file_gives_a_clear_error(db_path):
    db_path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="Cannot open the Muse database.*move it aside"):
        Store(db_path)


def test_transaction_that_raises_leaves_no_row(db_path):
    with Store(db_path) as db:
        with pytest.raises(RuntimeError):
            with db.transaction():
                db.execute("INSERT INTO conversations (id, title) VALUES ('c1', 'kept?')")
                with db.transaction():  # nested: joins the outer one, rolls back with it
                    db.execute("INSERT INTO messages (conversation_id, role, content) VALUES ('c1', 'user', 'hi')")
                raise RuntimeError("fail after both inserts")
        assert db.all("SELECT * FROM conversations") == [] and db.all("SELECT * FROM messages") == []
        with db.transaction():  # the connection is usable afterwards
            db.execute("INSERT INTO conversations (id) VALUES ('c2')")
        assert [r["id"] for r in db.all("SELECT id FROM conversations")] == ["c2"]


def test_upgrade_indexes_messages_written_before_the_search_migration(db_path, monkeypatch):
    search = [fn for fn in MIGRATIONS if fn.__name__ == "m004_message_search"]
    monkeypatch.setattr(store_mod, "MIGRATIONS", [fn for fn in MIGRATIONS if fn not in search])
    with Store(db_path) as db:  # an older Muse wrote this
        db.execute("INSERT INTO conversations (id) VALUES ('old')")
        db.execute("INSERT INTO messages (conversation_id, role, content) VALUES ('old', 'user', '我住在北京市朝阳区')")
    monkeypatch.setattr(store_mod, "MIGRATIONS", MIGRATIONS)
    with Store(db_path) as db:
        found = db.all("SELECT rowid FROM messages_fts WHERE messages_fts MATCH ?", ('"北京市"',))
        assert len(found) == 1


# The child writes conversations of 3 large messages, one transaction each, and prints the number of each
# one after it commits. With STALL set, it stops inside that transaction (after its inserts) and says so.
WRITER = textwrap.dedent("""
    import sys, time
    from muse.store import Store
    db = Store(sys.argv[1])
    stall = int(sys.argv[2])
    big = "x" * 200_000
    i = 0
    while True:
        i += 1
        with db.transaction():
            db.execute("INSERT INTO conversations (id, title) VALUES (?, ?)", (f"c{i}", str(i)))
            for j in range(3):
                db.execute("INSERT INTO messages (conversation_id, role, content) VALUES (?, 'user', ?)",
                           (f"c{i}", big + str(j)))
            if i == stall:
                print("inside", flush=True)
                time.sleep(120)
        print(i, flush=True)
""")


def _kill_writer(db_path, stall: int, after: int) -> list[int]:
    """Run the writer, SIGKILL it at 'inside' or after `after` commits; return the commits it reported."""
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(db_path), str(stall)], stdout=subprocess.PIPE,
                             text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    committed = []
    try:
        for line in child.stdout:
            if line.strip() == "inside" or len(committed) >= after:
                break
            committed.append(int(line))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    return committed


def _check_whole(db_path, committed: list[int]) -> set[str]:
    with Store(db_path) as db:
        convs = {r["id"] for r in db.all("SELECT id FROM conversations")}
        assert {f"c{i}" for i in committed} <= convs  # nothing committed is lost
        for cid in convs:  # and nothing is half-written
            rows = db.all("SELECT content FROM messages WHERE conversation_id = ? ORDER BY id", (cid,))
            assert [r["content"] for r in rows] == ["x" * 200_000 + str(j) for j in range(3)]
        assert db.one("PRAGMA integrity_check")["integrity_check"] == "ok"
    return convs


def test_sigkill_inside_a_transaction_leaves_no_row_and_loses_no_commit(db_path):
    committed = _kill_writer(db_path, stall=5, after=10**9)
    assert committed == [1, 2, 3, 4]
    assert _check_whole(db_path, committed) == {"c1", "c2", "c3", "c4"}  # c5 was never committed


def test_sigkill_at_any_moment_keeps_the_database_whole(db_path):
    committed = _kill_writer(db_path, stall=0, after=15)  # killed wherever the writer happens to be
    assert len(committed) == 15
    _check_whole(db_path, committed)


def test_a_full_database_is_a_clear_error_and_keeps_earlier_rows(db_path):
    with Store(db_path) as db:
        db.execute("INSERT INTO conversations (id) VALUES ('kept')")
        db.execute(f"PRAGMA max_page_count = {db.one('PRAGMA page_count')['page_count'] + 2}")  # SQLITE_FULL
        with pytest.raises(StoreError, match="disk holding the Muse database .*muse.db is full"):
            with db.transaction():
                db.execute("INSERT INTO conversations (id) VALUES ('lost')")
                db.execute("INSERT INTO messages (conversation_id, role, content) VALUES ('lost', 'user', ?)",
                           ("x" * 100_000,))
        assert not db.conn.in_transaction
        assert [r["id"] for r in db.all("SELECT id FROM conversations")] == ["kept"]
        db.execute("PRAGMA max_page_count = 1073741823")
        with db.transaction():  # usable again once there is room
            db.execute("INSERT INTO conversations (id) VALUES ('later')")
        assert db.one("PRAGMA integrity_check")["integrity_check"] == "ok"
