"""The `muse` command starts fast and reads well at 80 columns.

Start-up: `--help` and the listing commands must not import torch (≈1 s of the 2.4 s every command
used to take) — checked in a fresh interpreter, as `sys.modules` of this test process already holds
torch. Help: commands in panels, in order; at 80 columns every word of every option's help whole.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from muse.cli import app
from muse.cli.common import PANELS

HEAVY = ("torch", "numpy", "transformers", "matplotlib", "fastapi", "uvicorn", "muse.generation", "muse.model")

# Runs `muse ARGS` in this interpreter, then prints which heavy modules it imported (stderr, last line).
PROBE = """
import json, sys
from muse.cli import main
sys.argv = ["muse", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
sys.stderr.write("\\nMODULES " + json.dumps([m for m in HEAVY if m in sys.modules]) + "\\n")
"""


def imported(*args: str) -> list[str]:
    code = f"HEAVY = {HEAVY!r}\n" + PROBE
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "80"})
    line = [x for x in r.stderr.splitlines() if x.startswith("MODULES ")]
    assert line, r.stderr[-2000:]
    return json.loads(line[-1][len("MODULES "):])


@pytest.mark.parametrize("args", [
    ["--help"], ["models"], ["kb", "list"], ["conversations", "list"], ["memory", "list"], ["persona", "list"],
    ["chat", "--help"], ["serve", "--help"], ["train", "--help"], ["kb", "--help"], ["write", "history", "--help"],
])
def test_help_and_listing_commands_import_nothing_heavy(args):
    heavy = imported(*args)
    assert "torch" not in heavy and "muse.model" not in heavy, f"muse {' '.join(args)} imported {heavy}"
    assert heavy == [], f"muse {' '.join(args)} imported {heavy}"  # numpy too: 0.1–0.2 s of a listing


def test_python_dash_m_muse_runs_the_command():
    r = subprocess.run([sys.executable, "-m", "muse", "models"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "120"})
    assert r.returncode == 0 and "smollm2-135m" in r.stdout, r.stderr[-2000:]


def test_write_help_does_not_import_the_model_code():
    """`muse write` imports apps.writer for its options; SamplingParams comes from the torch-free
    muse.sampling, and muse.text loads bm25s' stop words (numpy, scipy) only when it first needs them."""
    heavy = imported("write", "--help")
    assert not {"torch", "numpy", "muse.model", "muse.generation", "transformers"} & set(heavy), heavy


def test_import_muse_is_lazy_but_the_api_works():
    r = subprocess.run([sys.executable, "-c", "import sys, muse; a = 'torch' in sys.modules; "
                        "from muse import SamplingParams, load, Model, Transformer; "
                        "print(a, 'torch' in sys.modules, callable(load), sorted(muse.__all__) == muse.__all__)"],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["False", "True", "True", "True"], r.stderr[-2000:]


def help_text(*args: str, columns: int = 80) -> str:
    r = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": str(columns), "TERMINAL_WIDTH": None})
    assert r.exit_code == 0, r.output
    return r.output


def test_commands_are_grouped_in_panels_in_order():
    out = help_text()
    titles = re.findall(r"╭─ (.+?) ─", out)
    assert titles == ["Options", *PANELS], titles
    assert "╭─ Commands " not in out  # every command has its panel
    for panel, names in PANELS.items():
        body = out.split(f"╭─ {panel} ")[1].split("╰")[0]
        listed = re.findall(r"^│ (\S+)", body, re.M)
        assert listed == list(names), (panel, listed)


def all_commands():
    import typer.main

    def walk(cmd, path):
        yield path, cmd
        names = cmd.list_commands(None) if hasattr(cmd, "list_commands") else []
        for name in names:
            yield from walk(cmd.get_command(None, name), [*path, name])

    return list(walk(typer.main.get_command(app), []))


def test_help_at_80_columns_cuts_no_word_and_shows_flags_as_flags():
    commands = all_commands()
    assert len(commands) > 40 and ["write", "rewrite"] in [p for p, _ in commands]
    for path, cmd in commands:
        out = help_text(*path)
        shown = set(re.findall(r"\S+", out.replace("│", " ")))
        for p in cmd.params:
            if getattr(p, "hidden", False) or not getattr(p, "help", None):
                continue
            text = p.help.replace("\b", " ").replace("\\[", "[")  # click's no-rewrap mark, rich's escape
            cut = [w for w in re.findall(r"\S+", text) if w not in shown]
            assert not cut, f"muse {' '.join(path)} --help: {p.name}'s help cut at {cut}"
            if getattr(p, "is_flag", False):
                line = next(x for x in out.splitlines() if p.opts[0] in x)
                assert "<bool>" not in line, line
        assert all(len(x) <= 80 for x in out.splitlines())


def test_conversations_table_at_80_columns_one_line_each_with_whole_ids(monkeypatch):
    from muse.apps.assistant import Assistant

    a = Assistant(None)
    ids = [a.new_conversation("A rather long title about the history of the Roman empire and all its emperors"),
           a.new_conversation("短标题：关于中国古代诗歌的讨论以及唐诗宋词的比较和欣赏"), a.new_conversation("hi")]
    r = CliRunner().invoke(app, ["conversations", "list"], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    rows = [x for x in r.output.splitlines() if x.startswith("│")]
    assert len(rows) == 3 and all(len(x) <= 80 for x in r.output.splitlines())
    assert all(any(cid in row for row in rows) for cid in ids)
    assert any("A rather long title" in row and "…" in row for row in rows)
