"""A full disk during a training checkpoint, a writer save, a knowledge-base add and a database write:
a clear error naming what could not be written, the previous copy intact, nothing half-written, and
everything works again once space is freed.

Each scenario runs in a child process on a really full disk: a small tmpfs mounted in the child's own
mount namespace (`unshare --mount`, or `--user --map-root-user` when not root), so the mount goes away
with the child. Where no namespace can be made, the child caps its file sizes instead (RLIMIT_FSIZE,
SIGXFSZ ignored: writes past the cap fail with EFBIG), so the scenarios still run.

MUSE_TEST_FULL_DISK=rlimit forces the fallback. Run one scenario by hand (as root, for tmpfs):
    unshare --mount python tests/test_disk_full.py SCENARIO DISK_DIR SRC_DIR tmpfs|rlimit
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNSHARE = ["unshare", "--mount", "--propagation", "private"]
if os.geteuid() != 0:
    UNSHARE[1:1] = ["--user", "--map-root-user"]


# ----------------------------------------------------------------------------- the child's full disk


class FullDisk:
    """The directory `path` on a disk the scenario can fill: a tmpfs of SIZE bytes, or capped file sizes."""

    SIZE = 8 * 2**20

    def __init__(self, path: Path, mode: str):
        self.path, self.mode, self.filler = path, mode, path / ".filler"
        if mode == "tmpfs":
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.SIZE}", "tmpfs", str(path)], check=True)
        else:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed

    def fill(self, headroom: int) -> None:
        """Leave `headroom` bytes: the tmpfs filled by one file and then that much freed, or (fallback)
        no file may grow past `headroom` bytes."""
        if self.mode == "rlimit":
            resource.setrlimit(resource.RLIMIT_FSIZE, (headroom, resource.RLIM_INFINITY))
            return
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT)
        size, chunk = 0, b"\0" * 65536
        try:
            while True:
                size += os.write(fd, chunk)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
        os.ftruncate(fd, max(size - headroom, 0))
        os.close(fd)

    def free(self) -> None:
        if self.mode == "rlimit":
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        else:
            self.filler.unlink()

    def names(self, folder: Path | None = None) -> list[str]:
        return sorted(p.name for p in (folder or self.path).iterdir() if p != self.filler)


def _attempt(fn: Callable[[], object]) -> dict | None:
    """What `fn` raised (type, message, whether a MuseError), or None if it succeeded."""
    from muse.errors import MuseError

    try:
        fn()
    except Exception as e:
        return {"type": type(e).__name__, "message": str(e), "muse_error": isinstance(e, MuseError)}
    return None


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _integrity(db) -> str:
    return db.one("PRAGMA integrity_check")["integrity_check"]


# ----------------------------------------------------------------------------- scenarios (run in the child)


def _resume_on_full_disk(disk: FullDisk, headroom: int) -> dict:
    """Train 2 steps (out/last at iter 2), fill the disk, resume to 4 steps; then free it and resume again."""
    from muse.training import TrainConfig, train
    from muse.training.state import load_training_state
    from tests.test_training import FixedRows, tiny_model

    def cfg(iters: int) -> TrainConfig:
        return TrainConfig(max_iters=iters, lr_decay_iters=4, batch_size=4, eval_iters=0, progress=False,
                           log_interval=1)

    run = disk.path / "run"
    train(tiny_model(), FixedRows(), cfg(2), run)
    before = _digests(run / "last")
    disk.fill(headroom)
    error = _attempt(lambda: train(tiny_model(), FixedRows(), cfg(4), run, resume=True))
    kept, names = _digests(run / "last") == before, disk.names(run)
    disk.free()
    result = train(tiny_model(), FixedRows(), cfg(4), run, resume=True)
    return {"error": error, "run": str(run), "kept": kept, "names": names, "resumed_to": result.iter,
            "state_iter": load_training_state(run / "last")["iter"]}


def scenario_checkpoint(disk: FullDisk, src: Path) -> dict:
    """Room for the metrics lines, not for the checkpoint at iter 4 (~0.5 MB)."""
    return _resume_on_full_disk(disk, headroom=64 * 1024)


def scenario_checkpoint_no_room(disk: FullDisk, src: Path) -> dict:
    """Not even room to rewrite metrics.jsonl when the resume starts."""
    return _resume_on_full_disk(disk, headroom=0)


def _versions(store, f: Path) -> list[list]:
    from muse.apps.writer import history, version_key

    return [[r["seq"], r["action"]] for r in history(store, version_key(f))]


def _writer(disk: FullDisk, f: Path, new: str) -> dict:
    from muse.apps.writer import write_file
    from muse.store import Store

    f.write_text("first draft\n", encoding="utf-8")
    with Store(disk.path / "muse.db") as store:
        write_file(store, f, "second draft\n", "rewrite")  # versions 1 (original) and 2
        disk.fill(headroom=16 * 1024)
        error = _attempt(lambda: write_file(store, f, new, "expand"))
        content, versions = f.read_text(encoding="utf-8"), _versions(store, f)
        names, integrity = disk.names(f.parent), _integrity(store)
        disk.free()
        seq = write_file(store, f, new, "expand")
    return {"error": error, "path": str(f), "content": content, "versions": versions, "names": names,
            "integrity": integrity, "seq_after": seq}


def scenario_writer(disk: FullDisk, src: Path) -> dict:
    """The file and the database on the full disk: writing the new text fails first."""
    return _writer(disk, disk.path / "draft.md", "x" * 400_000)


def scenario_writer_db(disk: FullDisk, src: Path) -> dict:
    """The file on a disk with room, the database on the full one: recording the version fails."""
    return _writer(disk, src / "draft.md", "y" * 100_000)


def scenario_kb(disk: FullDisk, src: Path) -> dict:
    """Add a small file, fill the disk, add a big one and another small one."""
    from muse.apps.kb import KnowledgeBase
    from muse.store import Store

    (src / "a.md").write_text("# Alpha\n\nThe first note, about apples.\n", encoding="utf-8")
    words = (" ".join(f"word{i}" for i in range(k, k + 50)) + "." for k in range(0, 100_000, 50))
    (src / "b.md").write_text("# Big\n\n" + "\n\n".join(words) + "\n", encoding="utf-8")  # ~0.7 MB
    (src / "c.md").write_text("# Gamma\n\nThe third note, about grapes.\n", encoding="utf-8")
    with Store(disk.path / "muse.db") as store:
        kb = KnowledgeBase(store, embeddings="none")
        kb.add([src / "a.md"])
        disk.fill(headroom=16 * 1024)
        error = _attempt(lambda: kb.add([src / "b.md", src / "c.md"]))
        docs = [d["title"] for d in kb.list()]
        orphans = store.one("SELECT COUNT(*) AS n FROM documents d "
                            "WHERE NOT EXISTS (SELECT 1 FROM chunks c WHERE c.document_id = d.id)")["n"]
        integrity = _integrity(store)
        disk.free()
        report = kb.add([src / "b.md", src / "c.md"])
        docs_after = sorted(d["title"] for d in kb.list())
    return {"error": error, "path": str(disk.path / "muse.db"), "docs": docs, "orphans": orphans,
            "integrity": integrity, "added_after": len(report.added), "docs_after": docs_after}


def scenario_db(disk: FullDisk, src: Path) -> dict:
    """Plain Store writes on a full disk: in a transaction, and one on its own (autocommit)."""
    from muse.store import Store

    path = disk.path / "muse.db"
    with Store(path) as db:
        for i in range(3):
            with db.transaction():
                db.execute("INSERT INTO conversations (id, title) VALUES (?, ?)", (f"c{i}", f"chat {i}"))
                db.execute("INSERT INTO messages (conversation_id, role, content) VALUES (?, 'user', 'hi')",
                           (f"c{i}",))
        disk.fill(headroom=16 * 1024)

        def big_transaction():
            with db.transaction():
                db.execute("INSERT INTO conversations (id, title) VALUES ('big', 'too big')")
                db.execute("INSERT INTO messages (conversation_id, role, content) VALUES ('big', 'user', ?)",
                           ("z" * 4_000_000,))

        in_transaction = _attempt(big_transaction)
        on_its_own = _attempt(lambda: db.execute(
            "INSERT INTO messages (conversation_id, role, content) VALUES ('c0', 'user', ?)", ("z" * 4_000_000,)))
        rows = [[r["id"], r["n"]] for r in db.all(
            "SELECT c.id, COUNT(m.id) AS n FROM conversations c LEFT JOIN messages m ON m.conversation_id = c.id "
            "GROUP BY c.id ORDER BY c.id")]
        integrity = _integrity(db)
        disk.free()
        with db.transaction():
            db.execute("INSERT INTO conversations (id) VALUES ('after')")
    with Store(path) as db:
        reopened = [_integrity(db), [r["id"] for r in db.all("SELECT id FROM conversations ORDER BY id")]]
    return {"errors": [in_transaction, on_its_own], "path": str(path), "rows": rows, "integrity": integrity,
            "reopened": reopened}


def scenario_db_open(disk: FullDisk, src: Path) -> dict:
    """A first start (a new, empty MUSE_HOME) on a disk that is already full."""
    from muse.store import MIGRATIONS, Store

    path = disk.path / "home" / "muse.db"
    path.parent.mkdir()
    disk.fill(headroom=0)
    error = _attempt(lambda: Store(path).close())
    disk.free()
    with Store(path) as db:
        migrated = db.applied_migrations() == [fn.__name__ for fn in MIGRATIONS]
    return {"error": error, "path": str(path), "migrated": migrated}


SCENARIOS = {name.removeprefix("scenario_"): fn for name, fn in globals().items() if name.startswith("scenario_")}


# ----------------------------------------------------------------------------- the tests (parent side)


@pytest.fixture(scope="module")
def mode(tmp_path_factory) -> str:
    """'tmpfs' where a private mount namespace can mount one, else 'rlimit' (capped file sizes)."""
    if os.environ.get("MUSE_TEST_FULL_DISK") == "rlimit":
        return "rlimit"
    where = tmp_path_factory.mktemp("probe")
    try:
        probe = subprocess.run(UNSHARE + ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
                               capture_output=True)
    except FileNotFoundError:  # no unshare(1)
        return "rlimit"
    return "tmpfs" if probe.returncode == 0 else "rlimit"


def _run(scenario: str, tmp_path: Path, mode: str) -> dict:
    disk, src = tmp_path / "disk", tmp_path / "src"
    disk.mkdir()
    src.mkdir()
    prefix = UNSHARE if mode == "tmpfs" else []
    proc = subprocess.run(prefix + [sys.executable, __file__, scenario, str(disk), str(src), mode],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("error, full", [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
    (Exception("Error while serializing: I/O error: No space left on device (os error 28)"), True),  # safetensors
    (OSError(errno.EACCES, "Permission denied"), False),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), False),
])
def test_disk_full_reason(error, full):
    from muse.fileio import disk_full_reason

    assert (disk_full_reason(error) is not None) == full
    wrapped = RuntimeError("writing failed")
    wrapped.__context__ = error  # raised while handling it, as torch.save does
    assert (disk_full_reason(wrapped) is not None) == full


def _full(error: dict | None, path: str, mode: str) -> None:
    """A MuseError that names `path` and (on a real full disk) says it is full."""
    assert error is not None and error["muse_error"], error
    assert path in error["message"], error
    if mode == "tmpfs":
        assert "is full" in error["message"], error


@pytest.mark.parametrize("scenario, target", [("checkpoint", "last"), ("checkpoint_no_room", "metrics.jsonl")])
def test_training_on_a_full_disk(tmp_path, mode, scenario, target):
    r = _run(scenario, tmp_path, mode)
    _full(r["error"], str(Path(r["run"]) / target), mode)
    assert r["error"]["type"] == "DiskFullError" and f"{target} is left as it was" in r["error"]["message"]
    assert r["kept"]  # out/last is byte for byte the iter-2 checkpoint
    assert not [n for n in r["names"] if n.startswith(".")], r["names"]  # no temp or half-swapped directory
    assert r["resumed_to"] == r["state_iter"] == 4  # and it resumes from it once there is room


def test_writer_save_on_a_full_disk(tmp_path, mode):
    r = _run("writer", tmp_path, mode)
    _full(r["error"], r["path"], mode)
    assert r["content"] == "second draft\n"
    assert r["versions"] == [[1, "original"], [2, "rewrite"]]  # no row for the failed save
    assert r["names"] == ["draft.md", "muse.db", "muse.db-shm", "muse.db-wal"]  # no temp file
    assert r["integrity"] == "ok" and r["seq_after"] == 3


def test_writer_save_when_only_the_database_disk_is_full(tmp_path, mode):
    if mode == "rlimit":
        pytest.skip("needs two disks, one full: a file size cap applies to every file")
    r = _run("writer_db", tmp_path, mode)
    _full(r["error"], str(tmp_path / "disk" / "muse.db"), mode)
    assert r["content"] == "second draft\n"  # not replaced by a text whose version was not recorded
    assert r["versions"] == [[1, "original"], [2, "rewrite"]]
    assert r["names"] == ["draft.md"]
    assert r["integrity"] == "ok" and r["seq_after"] == 3


def test_knowledge_base_add_on_a_full_disk(tmp_path, mode):
    r = _run("kb", tmp_path, mode)
    _full(r["error"], r["path"], mode)
    assert r["docs"] == ["Alpha"] and r["orphans"] == 0  # no document without its chunks
    assert r["integrity"] == "ok"
    assert r["added_after"] == 2 and r["docs_after"] == ["Alpha", "Big", "Gamma"]


def test_database_write_on_a_full_disk(tmp_path, mode):
    r = _run("db", tmp_path, mode)
    for error in r["errors"]:
        _full(error, r["path"], mode)
        assert error["type"] == "StoreError" and "Muse database" in error["message"]
    assert r["rows"] == [["c0", 1], ["c1", 1], ["c2", 1]]  # earlier rows intact, no half row
    assert r["integrity"] == "ok"
    assert r["reopened"] == ["ok", ["after", "c0", "c1", "c2"]]


def test_first_start_on_a_full_disk(tmp_path, mode):
    r = _run("db_open", tmp_path, mode)
    _full(r["error"], r["path"], mode)
    assert r["error"]["type"] == "StoreError" and r["migrated"]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # for `tests.test_training`
    name, disk_dir, src_dir, disk_mode = sys.argv[1:5]
    print(json.dumps(SCENARIOS[name](FullDisk(Path(disk_dir), disk_mode), Path(src_dir))))
