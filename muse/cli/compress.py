"""`muse quantize` and `muse prune`: smaller models in Muse's format, usable with --model DIR."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from muse.cli.common import MODEL_HELP, app, console, err, friendly


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.1f} MB"


def _saved(out: str) -> None:
    console.print(f"[green]Saved[/] {escape(out)} — use it with `muse.load({out!r})` or "
                  f"`--model {escape(out)}` in any command.", highlight=False)


@app.command()
@friendly
def quantize(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    out: str = typer.Option(..., "--out", "-o", help="Directory to write the quantized model to."),
    bits: int = typer.Option(8, "--bits", "-b", help="8: int8, one scale per output channel; "
                                                   "4: int4, asymmetric, in groups along each row."),
    group_size: Optional[int] = typer.Option(None, "--group-size", "-g",
                                             help="Weights per scale (default: per channel for 8 bits, "
                                                  "32 for 4 bits). Smaller = more accurate, larger file."),
    embeddings: str = typer.Option("int8", help="The token embedding (also the output head when tied): "
                                                "int8 (default), same (as the layers) or fp32."),
):
    """Quantize a model's weights to int8 or int4 and save it (weights only; activations stay float).

    The model is loaded in fp32 first (a GGUF is dequantized), every linear layer is replaced by
    an int8/int4 layer with fast CPU kernels, and the result is saved in Muse's format.
    """
    import warnings

    from muse.compress import count_params, quantize as run, weight_bytes

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        with console.status(f"Quantizing to int{bits}…"):
            m = run(model, bits, group_size, out=out, embeddings=embeddings)
    for w in caught:
        err.print(f"[yellow]Note:[/] {escape(str(w.message))}", highlight=False)
    kinds = Counter(f"int{q['bits']} g{q['group_size']}" for q in m.info["quantization"].values())
    table = Table(show_header=False, title=f"{m.name} → int{bits}")
    table.add_row("layers", ", ".join(f"{n} × {kind}" for kind, n in sorted(kinds.items())))
    table.add_row("parameters", f"{count_params(m):,}")
    table.add_row("size", f"{_mb(count_params(m) * 4)} in fp32 → {_mb(weight_bytes(m))}")
    console.print(table)
    _saved(out)


def _fractions(spec: str) -> list[float]:
    try:
        return [float(x) for x in spec.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"--sweep takes sparsities like 0.1,0.2,0.3, got {spec!r}") from None


@app.command()
@friendly
def prune(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", "-s",
                                             help="Fraction to remove, in [0, 1), e.g. 0.3 (needs -o)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Directory to write the pruned model to."),
    method: str = typer.Option("magnitude", help="magnitude: zero the smallest weights (same shapes); "
                                                 "structured: remove whole MLP channels / attention heads "
                                                 "(a really smaller model)."),
    scope: str = typer.Option("layer", help="magnitude only: the same sparsity in each layer (layer) or "
                                            "the smallest weights of all layers together (global)."),
    parts: str = typer.Option("mlp,heads", help="structured only: what to prune, mlp and/or heads."),
    criterion: str = typer.Option("activation", help="structured only: rank channels / heads by the L2 norm of "
                                                     "their output on --calibration text (activation) or of "
                                                     "their weights alone (weight)."),
    calibration: Optional[Path] = typer.Option(None, help="structured only: UTF-8 text to measure activations on "
                                                          "(default: a built-in English + Chinese passage)."),
    sweep: Optional[str] = typer.Option(None, help="Instead of saving, measure perplexity at these "
                                                   "sparsities, e.g. 0.1,0.2,0.3,0.5 (needs --eval-text)."),
    eval_text: Optional[Path] = typer.Option(None, "--eval-text", help="UTF-8 text file to measure perplexity on."),
    eval_tokens: int = typer.Option(4096, "--eval-tokens", help="Score the first N tokens of --eval-text "
                                                               "(0 = all of it)."),
):
    """Prune a model and save it, or sweep sparsities to see what each costs in perplexity.

    muse prune --sparsity 0.3 --method structured -o smaller/
    muse prune --sweep 0.1,0.2,0.3,0.5 --method magnitude --eval-text book.txt
    """
    part_list = [p for p in parts.replace(" ", "").split(",") if p]
    options = dict(scope=scope, parts=part_list, criterion=criterion, calibration=_text(calibration, "--calibration"))
    if sweep is not None:
        if sparsity is not None or out is not None:
            raise ValueError("--sweep measures without saving: leave out --sparsity and -o (or drop --sweep)")
        return _sweep(model, _fractions(sweep), method, options, eval_text, eval_tokens)
    if sparsity is None or out is None:
        raise ValueError("give --sparsity S and -o DIR to prune and save, or --sweep LIST --eval-text FILE "
                         "to compare sparsities")
    from muse.compress import count_params, prune as run, sparsity_of, weight_bytes

    with console.status(f"Pruning ({method}, sparsity {sparsity})…"):
        m = run(model, sparsity, method, out=out, **options)
    c = m.config
    table = Table(show_header=False, title=f"{m.name} pruned ({method})")
    table.add_row("parameters", f"{count_params(m):,} ({count_params(m, nonzero=True):,} non-zero)")
    table.add_row("zero weights in the blocks", f"{sparsity_of(m):.1%}")
    table.add_row("shape", f"{c.n_head} heads (kv {c.n_kv_head}), MLP width {c.intermediate_size}")
    table.add_row("size", _mb(weight_bytes(m)))
    console.print(table)
    _saved(out)


def _text(path: Optional[Path], option: str) -> Optional[str]:
    from muse.errors import MuseError
    from muse.eval.perplexity import read_text

    if path is None:
        return None
    if not path.is_file():
        raise MuseError(f"No file at {path}; {option} takes a UTF-8 text file.")
    return read_text(path)


def _sweep(model, levels, method, options, eval_text, eval_tokens) -> None:
    from muse.compress import sweep as run

    if eval_text is None:
        raise ValueError("--sweep needs --eval-text FILE: a text to measure perplexity on")
    if eval_tokens < 0:
        raise ValueError(f"--eval-tokens must be >= 0 (0 = the whole file), got {eval_tokens}")
    text = _text(eval_text, "--eval-text")
    with console.status(f"Pruning and scoring {len(levels)} sparsities…"):
        rows = run(model, levels, method, text, max_tokens=eval_tokens or None, **options)
    table = Table(title=f"Pruning sweep ({method}) — perplexity on {escape(eval_text.name)}, {rows[0]['tokens']} tokens")
    for col in ("sparsity", "params (non-zero)", "size", "perplexity", "Δ"):
        table.add_column(col, justify="right")
    base = rows[0]["perplexity"]
    for r in rows:
        name = "original" if r is rows[0] else f"{r['sparsity']:g}"
        delta = "" if r is rows[0] else f"{r['delta']:+.2f} ({r['delta'] / base:+.1%})"
        table.add_row(name, f"{r['params']:,}", _mb(r["bytes"]), f"{r['perplexity']:.2f}", delta)
    console.print(table)
    if method == "magnitude":
        console.print("[dim]Magnitude pruning zeroes weights but keeps their shapes, so the file size does "
                      "not change; structured pruning makes the model really smaller.[/]")
