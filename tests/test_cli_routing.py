"""Without --model, Chinese work goes to the bilingual model when it is installed (as `muse serve`
routes it), and the command says which model answered; --model always wins."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

import muse
from muse.checkpoints.registry import BUNDLED
from muse.cli import app
from muse.cli.progress import model_for

BILINGUAL = next(m for m in BUNDLED.values() if "zh" in m.languages)


@pytest.fixture
def bilingual_installed(monkeypatch):
    monkeypatch.setattr(type(BILINGUAL), "installed_file",
                        lambda self: Path("/x.gguf") if self.name == BILINGUAL.name else Path("/y.gguf"))


@pytest.fixture
def loads(monkeypatch):
    """Every name `muse.load` is asked for; the load then stops the command with a marker error."""
    names = []

    def fake(name=None, *args, **kwargs):
        names.append(name)
        raise muse.MuseError("stop after load")
    monkeypatch.setattr(muse, "load", fake)
    return names


def test_model_for_routes_only_chinese_and_only_without_a_model(monkeypatch, bilingual_installed):
    monkeypatch.delenv("MUSE_MODEL", raising=False)
    assert model_for(None, chinese=True) == BILINGUAL.name
    assert model_for(None, chinese=False) is None
    assert model_for("smollm2-135m", chinese=True) == "smollm2-135m"  # the user's choice stands
    monkeypatch.setenv("MUSE_MODEL", BILINGUAL.name)  # a default that reads Chinese already
    assert model_for(None, chinese=True) is None
    monkeypatch.setenv("MUSE_MODEL", "/my/own/model")  # not bundled: its tokenizer decides, later
    assert model_for(None, chinese=True) is None


def test_without_the_bilingual_model_nothing_is_rerouted(monkeypatch):
    monkeypatch.delenv("MUSE_MODEL", raising=False)
    monkeypatch.setattr(type(BILINGUAL), "installed_file", lambda self: None)
    assert model_for(None, chinese=True) is None  # check_language then says how to install it


@pytest.mark.parametrize("args, routed", [
    (["sentiment", "这家餐厅太棒了"], True),
    (["sentiment", "What a great place."], False),
    (["classify", "球队赢了", "--labels", "体育,财经"], True),
    (["write", "rewrite", "我们明天开会。"], True),
    (["write", "translate", "Good morning.", "--to", "zh"], True),  # Chinese output needs the bilingual model
    (["write", "translate", "早上好。", "--to", "en"], True),
    (["write", "rewrite", "See you tomorrow."], False),
    (["write", "rewrite", "我们明天开会。", "--model", "smollm2-135m"], False),
])
def test_commands_route_chinese_and_say_so(monkeypatch, bilingual_installed, loads, args, routed):
    monkeypatch.delenv("MUSE_MODEL", raising=False)
    r = CliRunner().invoke(app, args)
    assert "stop after load" in r.output and r.exit_code == 1
    given = args[args.index("--model") + 1] if "--model" in args else None
    assert loads == [BILINGUAL.name if routed else given]
    assert (f"answered by {BILINGUAL.name}" in r.output) == routed


def test_ask_routes_a_chinese_question(monkeypatch, bilingual_installed, loads, tmp_path):
    monkeypatch.delenv("MUSE_MODEL", raising=False)
    monkeypatch.setenv("MUSE_HOME", str(tmp_path))
    doc = tmp_path / "notes.txt"
    doc.write_text("The review is on Friday.\n", encoding="utf-8")
    assert CliRunner().invoke(app, ["kb", "add", str(doc), "--no-embeddings"]).exit_code == 0
    r = CliRunner().invoke(app, ["ask", "评审是哪天？", "--no-embeddings"])
    assert loads == [BILINGUAL.name] and f"answered by {BILINGUAL.name}" in r.output


def chat_model(name: str):
    from muse.sampling import SamplingParams

    return SimpleNamespace(name=name, info={"name": name}, params=lambda: SamplingParams(temperature=0.5))


@pytest.mark.parametrize("args, rerouted", [
    (["chat", "--message", "你好，请介绍一下你自己。"], True),
    (["chat", "--message", "Hello there."], False),
    (["chat", "--message", "你好", "--model", "smollm2-135m"], False),  # the user's choice stands
])
def test_chat_moves_to_the_bilingual_model_at_a_chinese_message(monkeypatch, bilingual_installed, args, rerouted):
    from muse.cli import assistant as chat_cli

    monkeypatch.delenv("MUSE_MODEL", raising=False)
    english = chat_model("smollm2-135m")
    replied_by = []

    def reply(self, cid, text, params):
        replied_by.append((self.model.name, params.temperature))
        return SimpleNamespace(context=SimpleNamespace(notice=None), __iter__=None)

    monkeypatch.setattr(chat_cli, "_load_for", lambda conv, model, precision: english)
    monkeypatch.setattr(chat_cli, "load_for", lambda name, precision, chinese: chat_model(BILINGUAL.name))
    monkeypatch.setattr(chat_cli, "_stats", lambda *a, **k: None)
    monkeypatch.setattr(chat_cli, "_stream_to_stdout", lambda stream: None)
    monkeypatch.setattr("muse.apps.assistant.Assistant.stream_reply", reply)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert replied_by == [(BILINGUAL.name if rerouted else "smollm2-135m", 0.5)]
    assert ("English-only model" in r.output) == (not rerouted and "你好" in args[2])


def test_a_batch_file_sends_its_chinese_records_to_the_bilingual_model(monkeypatch, bilingual_installed, tmp_path):
    """Each record goes to the model for its language (loaded once each, before the progress line)."""
    from muse.apps.analysis import embedding_model

    if embedding_model() is None:
        pytest.skip("no embedding model on this platform")
    monkeypatch.delenv("MUSE_MODEL", raising=False)
    loads = []

    def fake(name=None, *args, **kwargs):  # --method embedding runs no language model: a named stand-in will do
        loads.append(name)
        return SimpleNamespace(name=name or "smollm2-135m", info={"name": name or "smollm2-135m"}, config=None)
    monkeypatch.setattr(muse, "load", fake)
    path = tmp_path / "reviews.jsonl"
    path.write_text('{"text": "Terrible product, it broke."}\n{"text": "这家餐厅太棒了"}\n{"text": "Great, I love it."}\n',
                    encoding="utf-8")
    r = CliRunner().invoke(app, ["sentiment", "-i", str(path), "-o", str(tmp_path / "out.jsonl"), "--method", "embedding"])
    assert r.exit_code == 0, r.output
    assert loads == [None, BILINGUAL.name] and f"answered by {BILINGUAL.name}" in r.output
    assert "3 records" in r.output
