"""`muse eval`: perplexity, task suites and side-by-side comparison, with a saved report."""

from __future__ import annotations

from typing import Optional

import typer

from muse.cli.common import app, console, err, friendly
from muse.cli.progress import Activity

EVAL_HELP = """Evaluate one model, or compare several side by side (the first is the baseline).

Every task suite runs the app and raw prompting of the same model (chat template, greedy, a plain
instruction) side by side on held-out items, and marks where the app is below raw.

\b
Task suites (see --list):  muse eval -s sentiment-en -s kbqa-en
Both bundled models, dev:  muse eval -m smollm2-135m -m qwen2.5-0.5b -s all --split dev --limit 10
zh↔en translation:         muse eval -m qwen2.5-0.5b -s translate --limit 10
Your own items (feedback): muse feedback export --as eval -o mine.jsonl && muse eval -s mine.jsonl -m ./lora/adapter
Perplexity, bits per byte: muse eval -p book.txt
A quantized model against the float one, with KL divergence:
  muse eval -m smollm2-135m -m smollm2-135m@int8 -p book.txt

Prints a table and writes report.md, report.json (with every example) and report.png to --out \
(default MUSE_HOME/runs/eval-TIME); the run is also recorded in the Muse database.
"""


@app.command("eval", help=EVAL_HELP)
@friendly
def eval_command(
    model: Optional[list[str]] = typer.Option(
        None, "--model", "-m", help="NAME or NAME@PRECISION, repeatable: a bundled name, .gguf file or model directory, "
                                    "optionally @fp32/@bf16/@int8/@int4. The first is the baseline."),
    suite: Optional[list[str]] = typer.Option(
        None, "--suite", "-s", help="A suite or task (summarize, translate, sentiment, classify, kbqa, writer, all), or "
                                    "a .jsonl file of your own items; repeatable."),
    perplexity: Optional[list[str]] = typer.Option(
        None, "--perplexity", "-p", help="A text file, folder or prepared data directory to score; repeatable."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Items per suite (a fixed-seed sample; default all)."),
    split: Optional[str] = typer.Option(None, "--split", help="Held-out split: dev (for tuning) or test (for "
                                                                "reporting; never tune on it). Default: test."),
    window: Optional[int] = typer.Option(None, help="Perplexity window in tokens (default min(1024, context))."),
    stride: Optional[int] = typer.Option(None, help="Perplexity stride in tokens (default window / 2)."),
    kl: bool = typer.Option(True, "--kl/--no-kl", help="KL divergence from the baseline on the perplexity text."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", "-n",
                                             help="Most tokens per generated answer; replaces the apps' own settings with plain greedy decoding."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Report directory."),
    list_suites: bool = typer.Option(False, "--list", help="List the suites and exit."),
):
    from muse.eval import compare, report, suites

    if list_suites:
        return _print_suites(suites)
    params = None
    if max_tokens is not None:
        from muse.generation import SamplingParams

        params = SamplingParams(temperature=0.0, max_new_tokens=max_tokens)
    with Activity() as activity:  # a spinner on a terminal; with MUSE_PROGRESS=1 a line per step, for logs
        activity.step("Evaluating")
        result = compare.evaluate(model or [None], suite or [], perplexity or [], limit=limit, window=window,
                                  stride=stride, kl=kl, params=params, split=split or suites.DEFAULT_SPLIT,
                                  on_event=activity.step)
    _print_report(result, report)
    out_dir, run_id = report.save(result, out)
    err.print(f"[dim]Report: {out_dir}/report.md (+ report.json, report.png) · run #{run_id}[/]")


def _print_suites(suites) -> None:
    from rich.table import Table

    t = Table(title="Evaluation suites")
    for col in ("suite", "task", "language", "what"):
        t.add_column(col)
    for s in suites.SUITES.values():
        t.add_row(s.name, s.task, s.language, s.description)
    console.print(t)
    console.print("[dim]Task names (" + ", ".join(suites.GROUPS) + ") pick all held-out suites of that task. "
                  "Data: muse/eval/data/heldout/TASK_LANG_{dev,test}.jsonl, chosen with --split.[/]")


def _print_report(result, report) -> None:
    from rich.markdown import Markdown

    if not result.rows:
        console.print(Markdown("_No results: every suite was skipped._"))
    else:
        short = len(result.models) > 1  # model names are long: the terminal table uses A, B, … and a legend
        if short:
            console.print(report.legend(result), highlight=False)
        if result.versus:
            console.print("App vs raw prompt (same model, greedy, a plain instruction):", highlight=False)
            console.print(Markdown(report.versus_table(result, short=short)))
            below = report.below_raw(result)
            console.print(f"App below raw: {', '.join(below)}" if below else "No app is below its raw prompt.",
                          highlight=False)
            console.print("Every metric:", highlight=False)
        console.print(Markdown(report.table(result, short=short)))
        if result.best:
            console.print("Best method per model:", highlight=False)
            console.print(Markdown(report.best_table(result, short=short)))
    for note in result.notes:
        console.print(f"[dim]• {note}[/]", highlight=False)
