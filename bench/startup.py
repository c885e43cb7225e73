"""Start-up time of `muse` commands: how long a command takes when it has little to do.

    .venv/bin/python bench/startup.py                          # this checkout
    .venv/bin/python bench/startup.py --before /tmp/muse-before  # and another checkout side by side
    .venv/bin/python bench/startup.py --runs 9 --commands "--help" "kb list"

(`git worktree add --detach /tmp/muse-before <commit>` makes a checkout of an older commit; both run
with this venv's Python, each checkout first on PYTHONPATH and the working directory a temp dir, so
neither the editable install nor the current directory picks the code.)

Columns
  cold   the first run in a fresh process with a new, empty MUSE_HOME (the database and folders are
         created). The OS file cache is not dropped (that needs root), and .pyc files are kept: this
         is "first command of a new user", not "first command after a reboot".
  warm   median of --runs further runs with the same MUSE_HOME.
The target (issue 16) is ≤ 0.5 s for --help and the listing commands. The machine's load average
is printed: on a busy machine every figure grows alike.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["--help", "models", "kb list", "conversations list", "write --help", "chat --help", "serve --help",
            "train --help"]
TARGET = {"--help": 0.5, "models": 0.5, "kb list": 0.5, "conversations list": 0.5}
# Runs `muse ARGS` from the checkout on PYTHONPATH, like the installed `muse` script does.
RUN = "import sys; sys.argv[0] = 'muse'; from muse.cli import main; main()"


def once(checkout: Path, args: list[str], home: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout), "MUSE_HOME": str(home), "COLUMNS": "80"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", RUN, *args], env=env, cwd=home, capture_output=True, timeout=300)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"muse {shlex.join(args)} failed in {checkout}:\n{r.stderr.decode()[-2000:]}")
    return dt


def measure(checkout: Path, command: str, runs: int) -> tuple[float, float]:
    args = shlex.split(command)
    with tempfile.TemporaryDirectory(prefix="muse-startup-") as tmp:
        home = Path(tmp)
        cold = once(checkout, args, home)
        warm = statistics.median(once(checkout, args, home) for _ in range(runs))
    return cold, warm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, help="another checkout (e.g. the commit before a change) to compare")
    ap.add_argument("--runs", type=int, default=5, help="warm runs per command (median)")
    ap.add_argument("--commands", nargs="+", default=COMMANDS)
    a = ap.parse_args()

    checkouts = ([("before", a.before.resolve())] if a.before else []) + [("after" if a.before else "now", ROOT)]
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs · python {sys.version.split()[0]} · "
          f"warm = median of {a.runs}\n")
    head = "| command | " + " | ".join(f"{n} cold | {n} warm" for n, _ in checkouts) + " | target |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for command in a.commands:
        cells = []
        for _, checkout in checkouts:
            cold, warm = measure(checkout, command, a.runs)
            cells += [f"{cold:.2f} s", f"{warm:.2f} s"]
        target = f"≤ {TARGET[command]} s" if command in TARGET else ""
        print(f"| `muse {command}` | " + " | ".join(cells) + f" | {target} |", flush=True)


if __name__ == "__main__":
    main()
