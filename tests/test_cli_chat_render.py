"""`muse chat` replies: Markdown rendered with rich in a terminal, raw text anywhere else."""

from __future__ import annotations

from io import StringIO
from types import SimpleNamespace

from rich.console import Console

from muse.cli import assistant as cli
from muse.sampling import SamplingParams

REPLY = "Here is **bold** text and a list:\n\n- one\n- two\n\n```python\nprint('hi')\n```\n"


def chunks(text: str, size: int = 3):
    """The reply streamed a few characters at a time, as generation chunks carry it."""
    for i in range(0, len(text), size):
        yield SimpleNamespace(text=text[i:i + size], finish_reason=None)


def terminal(height: int = 25) -> Console:
    return Console(file=StringIO(), force_terminal=True, width=80, height=height, color_system=None)


def test_markdown_renders_bold_lists_and_code_without_the_markup():
    out = terminal()
    last = cli.render_markdown(chunks(REPLY), out)
    assert REPLY.endswith(last.text)
    shown = out.file.getvalue()
    final = shown[shown.rindex("Here is"):]  # the last redraw: the whole reply
    assert "**" not in final and "```" not in final
    assert "bold" in final and "print('hi')" in final
    assert "• one" in final and "• two" in final


def test_a_reply_taller_than_the_terminal_ends_whole():
    out = terminal(height=6)
    text = "".join(f"line {i}\n\n" for i in range(20))
    cli.render_markdown(chunks(text, size=8), out)
    final = out.file.getvalue().rsplit("\x1b[2K", 1)[1]  # after the live region is cleared the last time
    assert all(f"line {i}" in final for i in range(20))


def test_an_empty_reply_renders_nothing_and_returns_none():
    assert cli.render_markdown(iter(()), terminal()) is None


class Reply:
    context = SimpleNamespace(notice=None)

    def __iter__(self):
        return chunks(REPLY)

    def close(self):
        pass


def session(markdown: bool):
    a = SimpleNamespace(model=SimpleNamespace(name="fake", info={"name": "smollm2-135m"}),
                        new_conversation=lambda persona=None: "c1",
                        stream_reply=lambda cid, text, params: Reply())
    return cli.ChatSession(a, None, None, None, None, verbose=False, markdown=markdown)


def test_plain_session_writes_the_raw_reply(capsys):
    session(markdown=False).send("hello")
    assert REPLY in capsys.readouterr().out


def test_markdown_session_renders_on_the_console(monkeypatch):
    out = terminal()
    monkeypatch.setattr(cli, "console", out)
    session(markdown=True).send("hello")
    shown = out.file.getvalue()
    assert "muse>" in shown
    final = shown[shown.rindex("Here is"):]
    assert "**" not in final and "print('hi')" in final


def test_chat_outside_a_terminal_keeps_raw_text(monkeypatch):
    """CliRunner's stdout is not a terminal: the session is told to write raw text."""
    from typer.testing import CliRunner

    from muse.cli import app

    seen = {}

    class Session(cli.ChatSession):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["markdown"] = self.markdown

    monkeypatch.setattr(cli, "ChatSession", Session)
    fake = SimpleNamespace(name="fake", params=lambda: SamplingParams())  # chat starts from the model's sampling
    monkeypatch.setattr(cli, "_load_for", lambda conv, model, precision: fake)
    r = CliRunner().invoke(app, ["chat", "--message", "/help"])
    assert r.exit_code == 0, r.output
    assert seen == {"markdown": False}
