"""`muse explain`: attention heatmaps and next-token probabilities for a short text."""

from __future__ import annotations

import re
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from muse.cli.common import MODEL_HELP, PRECISION_HELP, app, console, friendly, read_argument


def _indices(spec: Optional[str], what: str) -> Optional[list[int]]:
    """'0,2,5-7' -> [0, 2, 5, 6, 7]; negative numbers count from the end."""
    if spec is None:
        return None
    out: list[int] = []
    for part in spec.replace(" ", "").split(","):
        match = re.fullmatch(r"(-?\d+)(?:-(\d+))?", part)
        if match is None:
            raise ValueError(f"--{what}s must be numbers or ranges like 0,2,5-7, got {spec!r}")
        first, last = match.group(1), match.group(2)
        out.extend(range(int(first), int(last) + 1) if last is not None else [int(first)])
    return out


def _read_text(text: str, ids: bool) -> "str | list[int]":
    text = read_argument(text)
    if not ids:
        return text
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--ids expects token ids like 5,17,3, got {text[:40]!r}") from None


def _table(rows: list[dict]) -> Table:
    k = len(rows[0]["top"])
    table = Table(title="Next-token probabilities", title_justify="left")
    table.add_column("#", justify="right", style="dim")
    table.add_column("token")
    table.add_column("actual next (p, rank)")
    for j in range(k):
        table.add_column(f"top {j + 1}")
    for r in rows:
        actual = f"{escape(r['next'])} [dim]{r['p_next']:.3f} #{r['rank_next']}[/]" if "next" in r else "[dim]—[/]"
        tops = []
        for c in r["top"]:
            hit = "next" in r and c["id"] == r["next_id"]
            cell = f"{escape(c['token'])} [dim]{c['p']:.3f}[/]"
            tops.append(f"[bold green]{cell}[/]" if hit else cell)
        table.add_row(str(r["position"]), escape(r["token"]), actual, *tops)
    return table


@app.command()
@friendly
def explain(
    text: str = typer.Argument(..., help="The text to look at ('-' reads standard input). Keep it short: "
                                         "at most 512 tokens."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    out: str = typer.Option("muse-explain", "--out", "-o", help="Directory for the PNG and JSON files."),
    layers: Optional[str] = typer.Option(None, help="Layers to plot, e.g. 0,5,10-12 (default: all)."),
    heads: Optional[str] = typer.Option(None, help="Heads to plot, e.g. 0,3 (default: all)."),
    k: int = typer.Option(5, "--top", "-k", help="How many likely next tokens to show at each position."),
    ids: bool = typer.Option(False, "--ids", help="TEXT is token ids (e.g. 5,17,3), not text."),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
):
    """Show what a model looks at: attention heatmaps per layer and head, their average, and the
    most likely next tokens at each position (a table here, PNG + JSON in --out).

    Chinese works too: a character that the tokenizer cuts into several tokens is shown on each
    piece with its number (字₁ 字₂).
    """
    from muse.cli.progress import load_model
    from muse.explain import explain as run

    source = _read_text(text, ids)
    layer_list, head_list = _indices(layers, "layer"), _indices(heads, "head")
    m = load_model(model, precision)
    with console.status("Computing attention and drawing heatmaps…"):
        result = run(m, source, out, layers=layer_list, heads=head_list, k=k)
    console.print(_table(result["rows"]))
    att = result["attention"]
    console.print(f"{len(att.ids)} tokens · {len(att.layers)} layer{'s' * (len(att.layers) != 1)} · wrote {len(result['files'])} files to "
                  f"[bold]{escape(out)}[/]: " + ", ".join(p.name for p in result["files"]), highlight=False)
