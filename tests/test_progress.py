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
from muse.cli.progress import Activity, showing_beams, until_first

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


def test_a_hand_over_closes_the_line_for_the_callers_own_display():
    """The training loop reports HAND_OVER before its bar starts: the loading line must be gone."""
    from muse.checkpoints import HAND_OVER, reporter

    activity = Activity(Console(file=io.StringIO(), force_terminal=True))
    with activity, reporting(activity):
        reporter()("Reading chats.jsonl", 0, 0)
        assert activity._progress is not None
        reporter()(HAND_OVER, 0, 0)
        assert activity._progress is None


def test_until_first_closes_the_line_before_the_first_item():
    out = io.StringIO()
    activity = Activity(Console(file=out, force_terminal=True))
    with activity:
        activity.step("Thinking")
        seen = []
        for item in until_first(iter("ab"), activity):
            seen.append((item, activity._progress is None))
    assert seen == [("a", True), ("b", True)]


def test_beam_search_shows_each_step_and_the_best_beam_so_far(default_model):
    calls = []
    with showing_beams(lambda *a: calls.append(a), default_model.tokenizer, "Beam search, 3 beams", 6):
        out = default_model.generate("The capital of France is", max_new_tokens=6, num_beams=3, loop_guard=False)
    default_model.generate("Hello", max_new_tokens=2, num_beams=2)  # after the block: nobody is told
    assert calls[0] == ("Beam search, 3 beams", 0, 6)
    steps = [c[1] for c in calls[1:]]
    assert steps == list(range(1, len(steps) + 1)) and 1 <= len(steps) <= 5  # the 6th step finishes every beam
    assert all(c[3].startswith("best so far: ") for c in calls[1:])
    assert " ".join(out.split()).startswith(calls[-1][3].removeprefix("best so far: "))


def test_activity_shows_a_steps_detail_on_a_terminal():
    out = io.StringIO()
    with Activity(Console(file=out, force_terminal=True, width=120)) as activity:
        activity("Beam search, 2 beams", 3, 10, "best so far: [Paris] is")
    assert "best so far: [Paris] is" in out.getvalue()  # markup in the text is escaped, not applied


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


def test_cli_translation_into_english_shows_its_beams_on_stderr(default_model, monkeypatch):
    from muse.apps.writer import TRANSLATE_BEAMS

    monkeypatch.setenv("MUSE_PROGRESS", "1")
    r = runner.invoke(app, ["write", "translate", "--to", "en", "Bonjour tout le monde.", "-n", "8", "--no-check"],
                      catch_exceptions=False)
    assert r.exit_code == 0 and f"Beam search, {TRANSLATE_BEAMS} beams…" in r.stderr
    assert r.stdout.strip() and "Beam search" not in r.stdout


def test_commands_that_load_a_model_say_so_first(default_model, monkeypatch):
    """write, create and chat load a model before their first word: stderr says so, stdout stays the answer."""
    monkeypatch.setenv("MUSE_PROGRESS", "1")
    for args in (["write", "polish", "i has a apple", "-n", "4"], ["create", "slogan", "tea", "-n", "4"]):
        r = runner.invoke(app, args, catch_exceptions=False)
        assert r.exit_code == 0, r.output
        assert "Loading smollm2-135m…" in r.stderr and "Loading" not in r.stdout
    r = runner.invoke(app, ["chat", "-n", "4"], input="Hi\n", catch_exceptions=False)
    assert r.exit_code == 0 and "Loading smollm2-135m…" in r.stderr
