"""The thread governor: as many torch threads as the CPUs other programs leave free."""

from __future__ import annotations

import pytest
import torch

from muse import cpu


class Machine:
    """A fake clock, /proc/stat and process CPU time, advanced by the test."""

    def __init__(self):
        self.t = self.busy = self.own = 0.0

    def run(self, seconds: float, others: float, ours: float) -> None:
        """`seconds` pass with `others` CPUs busy in other processes and `ours` in this one."""
        self.t += seconds
        self.busy += seconds * (others + ours)
        self.own += seconds * ours

    def governor(self, ceiling: int, n_cpus: int) -> cpu.ThreadGovernor:
        g = cpu.ThreadGovernor(read=lambda cpus: self.busy, clock=lambda: self.t, own_cpu=lambda: self.own)
        g.ceiling = g.threads = ceiling
        g._cpus = set(range(n_cpus))
        return g


@pytest.fixture
def restore_threads(monkeypatch):
    monkeypatch.delenv("MUSE_THREADS", raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_follow_the_cpus_other_programs_leave_free(restore_threads):
    m = Machine()
    g = m.governor(ceiling=2, n_cpus=2)
    assert g.update() == 2  # first call: nothing measured yet, torch's default stands
    m.run(1.0, others=1.0, ours=1.0)  # a busy loop holds one core
    assert g.update() == 1 and torch.get_num_threads() == 1
    m.run(0.1, others=0.0, ours=1.0)
    assert g.update() == 1  # under INTERVAL_S: the last decision stands
    m.run(1.0, others=0.1, ours=2.0)  # the busy loop stopped
    assert g.update() == 2 and torch.get_num_threads() == 2
    m.run(1.0, others=2.0, ours=0.0)  # everything taken: still one thread, never zero
    assert g.update() == 1


def test_muse_threads_fixes_the_count(restore_threads, monkeypatch):
    m = Machine()
    g = m.governor(ceiling=2, n_cpus=2)
    monkeypatch.setenv("MUSE_THREADS", "1")
    m.run(1.0, others=0.0, ours=0.0)
    assert g.update() == 1 and torch.get_num_threads() == 1
    monkeypatch.setenv("MUSE_THREADS", "lots")
    with pytest.raises(ValueError, match="MUSE_THREADS must be a positive whole number"):
        g.update()


def test_threads_for_rounds_within_bounds():
    assert [cpu.threads_for(f, 4) for f in (0.0, 0.4, 1.4, 1.6, 3.9, 7.0)] == [1, 1, 1, 2, 4, 4]


def test_proc_stat_is_read_for_the_allowed_cpus_only(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  900 0 100 5000 40 0 0 0 0 0\n"
                    "cpu0 300 0 50 2000 20 0 0 0 0 0\n"
                    "cpu1 600 0 50 3000 20 0 0 0 0 0\n"
                    "intr 12345\n")
    hz = __import__("os").sysconf("SC_CLK_TCK")
    assert cpu.read_busy_seconds({0}, str(stat)) == pytest.approx(350 / hz)
    assert cpu.read_busy_seconds({0, 1}, str(stat)) == pytest.approx(1000 / hz)
    assert cpu.read_busy_seconds({5}, str(stat)) is None
    assert cpu.read_busy_seconds({0}, str(tmp_path / "missing")) is None
