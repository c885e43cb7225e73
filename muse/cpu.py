"""How many threads Muse computes with: the CPUs other programs leave free, not all of them.

Torch's OpenMP threads meet at the end of every parallel region, and a decode step has
hundreds. When another program holds one of the cores, the thread that shares it runs in
time slices and every region waits for it: on a 2-core machine with a busy loop on one
core, 2 threads decoded SmolLM2 at 22 % of their idle speed and 1 thread at 55 %. So the
one generation path (`stream_generate`, the server's scheduler) calls `adapt_threads()`,
which counts, over the last half second or more, the CPU time of this machine's CPUs
(the ones this process may run on) minus this process's own, and sets
torch.set_num_threads to the CPUs left: never more than torch's own default (physical
cores, or OMP_NUM_THREADS), never fewer than 1.

MUSE_THREADS=N fixes the count instead. Where /proc/stat does not exist (macOS, Windows),
the count stays torch's default.
"""

from __future__ import annotations

import os
import threading
import time

import torch

INTERVAL_S = 0.5  # shortest window a decision is made from: shorter ones are mostly noise


def _fixed() -> int | None:
    raw = os.environ.get("MUSE_THREADS", "").strip().lower()
    if raw in ("", "auto"):
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"MUSE_THREADS must be a positive whole number or 'auto', got {raw!r}")
    return n


def _allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def read_busy_seconds(cpus: set[int], path: str = "/proc/stat") -> float | None:
    """CPU-seconds spent not idle on `cpus` since boot (all processes), or None if unknown."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    busy = 0
    seen = False
    for line in lines:
        name, _, rest = line.partition(" ")
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        # user nice system idle iowait irq softirq steal ...: idle and iowait are free time
        fields = [int(x) for x in rest.split()]
        busy += sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)
        seen = True
    return busy / os.sysconf("SC_CLK_TCK") if seen else None


def threads_for(free_cpus: float, ceiling: int) -> int:
    """The thread count for `free_cpus` idle CPUs: round to nearest, within 1..ceiling."""
    return max(1, min(ceiling, int(free_cpus + 0.5)))


class ThreadGovernor:
    """Samples the machine's load and sets torch's thread count in the calling thread
    (OpenMP's count is per thread: the scheduler's thread sets its own)."""

    def __init__(self, read=read_busy_seconds, clock=time.monotonic, own_cpu=lambda: sum(os.times()[:2])):
        self._read, self._clock, self._own = read, clock, own_cpu
        self._cpus = _allowed_cpus()
        self.ceiling = torch.get_num_threads()
        self._last: tuple[float, float, float] | None = None  # (clock, busy, own)
        self._lock = threading.Lock()
        self.threads = self.ceiling

    def _sample(self) -> tuple[float, float, float] | None:
        busy = self._read(self._cpus)
        return None if busy is None else (self._clock(), busy, self._own())

    def update(self) -> int:
        """Set and return the thread count; cheap (a clock read) until INTERVAL_S has passed."""
        fixed = _fixed()
        if fixed is not None:
            self.threads = fixed
        else:
            with self._lock:
                now = self._clock()
                if self._last is None or now - self._last[0] >= INTERVAL_S:
                    sample = self._sample()
                    if sample is not None and self._last is not None:
                        elapsed = sample[0] - self._last[0]
                        others = (sample[1] - self._last[1]) - (sample[2] - self._last[2])
                        free = len(self._cpus) - max(0.0, others) / elapsed
                        self.threads = threads_for(free, self.ceiling)
                    self._last = sample
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return self.threads


_governor: ThreadGovernor | None = None
_governor_lock = threading.Lock()


def adapt_threads() -> int:
    """Match torch's thread count (in this thread) to the CPUs free now; see the module doc."""
    global _governor
    if _governor is None:
        with _governor_lock:
            if _governor is None:
                _governor = ThreadGovernor()
    return _governor.update()
