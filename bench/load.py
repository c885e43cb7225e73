"""Load time of the bundled models: the first load (converts the GGUF into Muse's cache) and a
cached load, each in a fresh process, median of --runs.

    .venv/bin/python bench/load.py                          # smollm2-135m and qwen2.5-0.5b
    .venv/bin/python bench/load.py --models qwen2.5-0.5b --runs 5

Every first load gets a new, empty MUSE_HOME holding only the model's installed files (so
nothing is cached); the cached loads reuse the last one. Times are what `muse.load` reports
(`info["load_seconds"]`: reading, converting, writing the cache) and the process's wall time
(imports included). The OS file cache is warm: this is "a new user's first prompt", not "first
prompt after a reboot". The machine's load average is printed: on a busy machine all grow alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = ("import json, sys, muse; m = muse.load(sys.argv[1]); "
         "print(json.dumps({'load_s': m.info['load_seconds'], 'cached': bool(m.info.get('cached'))}))")


def installed_home(name: str, into: Path) -> Path:
    """A MUSE_HOME with only `name`'s installed files, copied from the user's MUSE_HOME if needed."""
    from muse.checkpoints.registry import find_bundled
    from muse.paths import muse_home

    home = into / "home"
    bundled = find_bundled(name)
    src = muse_home() / "models" / bundled.name
    if src.is_dir():  # installed under MUSE_HOME (not inside a pip package)
        shutil.copytree(src, home / "models" / bundled.name)
    home.mkdir(parents=True, exist_ok=True)
    return home


def one_load(name: str, home: Path) -> tuple[float, float, bool]:
    env = dict(os.environ, MUSE_HOME=str(home), PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, name], env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    info = json.loads(out.stdout.strip().splitlines()[-1])
    return info["load_s"], wall, info["cached"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-0.5b"])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
    print(f"{'model':<16} {'first load s':>13} {'(wall s)':>9} {'cached load s':>14} {'(wall s)':>9}")
    for name in args.models:
        first, cached = [], []
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="muse-load-") as tmp:
                home = installed_home(name, Path(tmp))
                load_s, wall, was_cached = one_load(name, home)
                assert not was_cached, "the first load found a cache"
                first.append((load_s, wall))
                load_s, wall, was_cached = one_load(name, home)
                assert was_cached, "the second load did not use the cache"
                cached.append((load_s, wall))
        med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
        print(f"{name:<16} {med(first, 0):>13.2f} {med(first, 1):>9.2f} {med(cached, 0):>14.2f} {med(cached, 1):>9.2f}")


if __name__ == "__main__":
    main()
