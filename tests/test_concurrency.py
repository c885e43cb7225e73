"""Several processes opening the same fresh MUSE_HOME at the same moment: every one succeeds, and the
migrations are applied exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from muse.store import MIGRATIONS, Store

ROOT = Path(__file__).resolve().parents[1]

# Each child opens the store once per trial. It says "ready T" and then blocks reading the trial's
# barrier pipe; the parent closes the pipe's write end once every child is ready, so all of them
# wake at once (EOF) and race to open the same fresh MUSE_HOME.
OPENER = textwrap.dedent("""
    import json, os, sys
    from muse.store import Store
    homes, fds = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    for t, (home, fd) in enumerate(zip(homes, fds)):
        print("ready", t, flush=True)
        os.read(fd, 1)  # EOF when the parent releases the barrier
        os.environ["MUSE_HOME"] = home
        try:
            with Store() as db:
                print(json.dumps({"ok": db.applied_migrations()}), flush=True)
        except Exception as e:
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
""")


def _race(homes: list[Path], processes: int) -> list[list[dict]]:
    """Run `processes` openers through one barrier per home; return each trial's results."""
    pipes = [os.pipe() for _ in homes]
    reads = [r for r, _ in pipes]
    children = [subprocess.Popen([sys.executable, "-c", OPENER, json.dumps([str(h) for h in homes]),
                                  json.dumps(reads)], pass_fds=reads, stdout=subprocess.PIPE, text=True,
                                 cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
                for _ in range(processes)]
    for r in reads:
        os.close(r)
    results = []
    try:
        for t, (_, w) in enumerate(pipes):
            for c in children:
                line = c.stdout.readline()
                assert line.split() == ["ready", str(t)], f"a child failed before trial {t} (see its stderr): {line!r}"
            os.close(w)  # release: every child wakes up now
            results.append([json.loads(c.stdout.readline()) for c in children])
    finally:
        for c in children:
            c.kill()
            c.wait()
            c.stdout.close()
    return results


def test_processes_opening_a_fresh_home_at_once_all_succeed_and_migrate_once(tmp_path):
    names = [fn.__name__ for fn in MIGRATIONS]
    homes = [tmp_path / f"home{t}" for t in range(20)]
    for t, results in enumerate(_race(homes, processes=6)):
        assert results == [{"ok": names}] * 6, f"trial {t}: {results}"
        with Store(homes[t] / "muse.db") as db:
            rows = db.all("SELECT name, COUNT(*) AS n FROM _migrations GROUP BY name ORDER BY rowid")
            assert [(r["name"], r["n"]) for r in rows] == [(n, 1) for n in names]
            assert db.one("PRAGMA journal_mode")["journal_mode"] == "wal"
            assert db.one("PRAGMA integrity_check")["integrity_check"] == "ok"
