"""Progress of long steps: the library's callback, and the CLI's status on stderr (never stdout)."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import muse
from muse.checkpoints import load_checkpoint, reporting
from muse.cli import app
from muse.cli.progress import Activity, counting_steps, until_first

pytest.importorskip("gguf")
from tests.test_checkpoints import write_tiny_gguf  # noqa: E402

runner = CliRunner()


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    return path


def _record():
    calls: list[tuple[str, int, int]] = []
    return calls, lambda what, done, total: calls.append((what, done, total))


def test_first_conversion_reports_each_tensor_then_cache_hits_report_none(tiny_gguf):
    calls, progress = _record()
    ckpt = load_checkpoint(tiny_gguf, progress=progress)
    assert ckpt.info["cached"] is False
    steps = list(dict.fromkeys(what for what, _, _ in calls))
    assert steps == ["Opening tiny.gguf", "Reading tensors", "Building the model",
                     "Saving the converted model to the cache"]
    counts = [(done, total) for what, done, total in calls if what == "Reading tensors"]
    n_tensors = 3 + 9 * 2  # embedding, output, final norm; 9 per layer
    assert counts == [(i, n_tensors) for i in range(n_tensors + 1)]  # from 0, one by one, to the end

    calls.clear()
    assert load_checkpoint(tiny_gguf, progress=progress).info["cached"] is True
    assert not any(what == "Reading tensors" for what, _, _ in calls)


def test_reporting_reaches_loads_through_muse_load(tiny_gguf):
    calls, progress = _record()
    with reporting(progress):
        muse.load(tiny_gguf)
    assert any(what == "Reading tensors" for what, _, _ in calls)
    calls.clear()
    muse.load(tiny_gguf, precision="fp32")  # outside the block: nobody is told
    assert calls == []


def test_activity_on_a_terminal_draws_a_progress_line_and_takes_it_away():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with Activity(console) as activity:
        assert activity.live
        activity.step("Loading smollm2-135m")
        activity("Reading tensors", 3, 10)
        activity("Reading tensors", 7, 10)
    text = out.getvalue()
    assert "Loading smollm2-135m" in text and "Reading tensors" in text and "7/10" in text


def test_activity_off_a_terminal_is_silent_unless_asked(monkeypatch):
    out = io.StringIO()
    with Activity(Console(file=out)) as activity:
        activity.step("Loading")
    assert out.getvalue() == ""
    monkeypatch.setenv("MUSE_PROGRESS", "1")
    with Activity(Console(file=out)) as activity:
        activity.step("Loading")
        activity("Reading tensors", 1, 2)
        activity("Reading tensors", 2, 2)  # one line per step, not per count
    assert out.getvalue() == "Loading…\nReading tensors…\n"


def test_until_first_closes_the_line_before_the_first_item():
    out = io.StringIO()
    activity = Activity(Console(file=out, force_terminal=True))
    with activity:
        activity.step("Thinking")
        seen = []
        for item in until_first(iter("ab"), activity):
            seen.append((item, activity._progress is None))
    assert seen == [("a", True), ("b", True)]


def test_counting_steps_reports_each_forward_pass():
    calls, progress = _record()
    net = torch.nn.Linear(2, 2)
    with counting_steps(progress, net, "Beam search, 2 beams", 3):
        for _ in range(5):
            net(torch.zeros(1, 2))
    net(torch.zeros(1, 2))  # after the block: the hook is gone
    assert calls == [("Beam search, 2 beams", n, 3) for n in (0, 1, 2, 3, 3, 3)]


def test_cli_info_shows_conversion_steps_on_stderr_only(tiny_gguf, monkeypatch):
    monkeypatch.setenv("MUSE_PROGRESS", "1")
    r = runner.invoke(app, ["info", str(tiny_gguf)], catch_exceptions=False)
    assert r.exit_code == 0
    assert "Loading " in r.stderr and "Reading tensors…" in r.stderr and "Building the model…" in r.stderr
    assert "Reading tensors" not in r.stdout and "parameters" in r.stdout


def test_cli_beam_search_says_so_on_stderr_and_keeps_stdout_clean(default_model, monkeypatch):
    monkeypatch.setenv("MUSE_PROGRESS", "1")
    r = runner.invoke(app, ["generate", "The capital of France is", "-n", "4", "--num-beams", "2"],
                      catch_exceptions=False)
    assert r.exit_code == 0
    assert "Loading smollm2-135m…" in r.stderr and "Beam search, 2 beams…" in r.stderr
    expected = default_model.generate("The capital of France is", max_new_tokens=4, num_beams=2)
    assert r.stdout == expected + "\n"  # the text and the newline after it, nothing else


def test_commands_that_load_a_model_say_so_first(default_model, monkeypatch):
    """write, create and chat load a model before their first word: stderr says so, stdout stays the answer."""
    monkeypatch.setenv("MUSE_PROGRESS", "1")
    for args in (["write", "polish", "i has a apple", "-n", "4"], ["create", "slogan", "tea", "-n", "4"]):
        r = runner.invoke(app, args, catch_exceptions=False)
        assert r.exit_code == 0, r.output
        assert "Loading smollm2-135m…" in r.stderr and "Loading" not in r.stdout
    r = runner.invoke(app, ["chat", "-n", "4"], input="Hi\n", catch_exceptions=False)
    assert r.exit_code == 0 and "Loading smollm2-135m…" in r.stderr
