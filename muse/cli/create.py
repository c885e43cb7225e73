"""Creative writing and text analysis: create, classify, sentiment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from muse.cli.common import (
    MODEL_HELP, PRECISION_HELP, MaxTokens, MinP, RepPenalty, Seed, Temperature, TopK, TopP, app, console, err,
    friendly, given_sampling, over, read_argument, sampling_option,
)
from muse.cli.progress import ModelsByLanguage, load_for, load_model

FORM_HELP = ("Poem form: 五言绝句 (五绝, wujue), 七言绝句 (七绝, qijue), 五言律诗 (五律, wulv), 七言律诗 (七律, qilv) — "
             "Chinese, need --model qwen2.5-0.5b — or haiku (俳句, 5-7-5), free (自由诗, the default).")


@app.command()
@friendly
def create(
    kind: str = typer.Argument(..., help="poem, story, slogan or product (ad copy)."),
    topic: str = typer.Argument(..., help="What to write about; for product, the product's description. "
                                          "Chinese topics get Chinese text. '-' reads standard input."),
    form: Optional[str] = typer.Option(None, "--form", "-f", help=FORM_HELP),
    attempts: int = typer.Option(4, "--attempts", help="Tries (new seed each) before giving up on a form."),
    guided: bool = typer.Option(True, "--guided/--no-guided",
                                help="Build fixed forms line by line so each line has the right length "
                                     "(--no-guided: sample the whole poem, then repair and check)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    max_tokens: Optional[int] = MaxTokens, temperature: Optional[float] = Temperature,
    top_k: Optional[int] = TopK, top_p: Optional[float] = TopP, min_p: Optional[float] = MinP,
    repetition_penalty: Optional[float] = RepPenalty,
    presence_penalty: Optional[float] = sampling_option("presence_penalty"), seed: Optional[int] = Seed,
    precision: str = typer.Option("auto", help=PRECISION_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print {text, form, ok, problems, tries} as JSON."),
):
    """Write a poem, story, slogan or product ad copy, checking poem forms.

    Examples: muse create poem "autumn rain" --form haiku;
    muse create poem 春天 --form wujue --model qwen2.5-0.5b;
    muse create product "a steel water bottle that keeps drinks cold for 24 hours".
    """
    from muse.apps.creative import create as make, default_params

    given = given_sampling(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                           repetition_penalty=repetition_penalty, presence_penalty=presence_penalty, seed=seed)
    params = over(default_params(kind), given)  # an unknown kind fails here, before the model loads
    m = load_model(model, precision)
    with err.status(f"Writing a {kind}…"):
        c = make(m, kind, read_argument(topic), form=form, params=params, attempts=attempts, guided=guided)
    if as_json:
        print(json.dumps({"text": c.text, "form": c.form, "ok": c.ok, "problems": c.problems, "tries": c.tries},
                         ensure_ascii=False, indent=2))
    else:
        print(c.text)
    if not c.ok:
        err.print(f"[yellow]Warning: after {c.tries} tries this still does not conform:[/]", highlight=False)
        for problem in c.problems:
            err.print(f"[yellow]  - {problem}[/]", highlight=False)
        err.print("[dim]Try again (another --seed), allow more --attempts, or use the bilingual model.[/]")
    elif c.form not in (None, "free"):
        err.print(f"[dim]{c.form}: form checked ({c.tries} {'try' if c.tries == 1 else 'tries'})[/]")


# -- analysis ---------------------------------------------------------------------

def _run_file(models, path_in: Path, path_out: Optional[Path], **kwargs) -> None:
    """Score every record of `path_in`, each with the model for its language (`ModelsByLanguage`)."""
    from muse.apps.analysis import classify_file, read_rows, request_language

    if path_out is None:
        raise ValueError("--input needs --output (a .csv or .jsonl file for the results)")
    column = kwargs["column"]
    rows, _ = read_rows(path_in, column)
    for lang in dict.fromkeys(request_language(row[column], kwargs.get("labels")) for row in rows):
        models(lang)  # load what the records need before the progress line (as classify_file picks)
    with err.status(f"Scoring {path_in}…"):
        n = classify_file(models, path_in, path_out, **kwargs)
    err.print(f"[green]{n} records[/] → {path_out}", highlight=False)


def _chinese(text: str) -> bool:
    from muse.text import language

    return language(text) == "zh"


def _check_source(text: Optional[str], path_in: Optional[Path], path_out: Optional[Path]) -> None:
    if text is not None and path_in is not None:
        raise ValueError("give either TEXT or --input FILE, not both")
    if text is None and path_in is None:
        raise ValueError("give the TEXT to score, or --input FILE (.csv/.jsonl) with --output FILE")
    if path_out is not None and path_in is None:
        raise ValueError("--output goes with --input; for a single TEXT the result is printed")


def _show(probs: dict[str, float], as_json: bool, method: str = "auto") -> None:
    from muse.apps.analysis import top_label

    best = top_label(probs, method)  # constrained: the label the model wrote
    ranked = {best: probs[best], **dict(sorted(probs.items(), key=lambda kv: -kv[1]))}
    if as_json:
        print(json.dumps({"label": best, "score": ranked[best], "scores": ranked},
                         ensure_ascii=False, indent=2))
        return
    table = Table(show_header=True, box=None)
    table.add_column("label")
    table.add_column("probability", justify="right")
    table.add_column("")
    for label, p in ranked.items():
        style = "bold green" if label == best else ""
        table.add_row(f"[{style}]{label}[/]" if style else label, f"{p:.3f}", "█" * round(p * 30))
    console.print(table)


InputOpt = typer.Option(None, "--input", "-i", help="A .csv (with a header row) or .jsonl file to score row by row.")
OutputOpt = typer.Option(None, "--output", "-o",
                         help="Where to write the rows with label, score and p_<label> added (.csv or .jsonl).")
ColumnOpt = typer.Option("text", "--column", help="The field holding the text in --input.")
JsonOpt = typer.Option(False, "--json", help="Print the result as JSON.")
MethodOpt = typer.Option("auto", "--method",
                         help="auto (default): the method measured best for the model and language on Muse's "
                              "dev sets; likelihood: score each label as the answer; constrained: the model "
                              "answers in a chat, allowed to write only one of the labels (probabilities: "
                              "each label's likelihood as that reply); embedding: the label whose name is "
                              "nearest the text in the multilingual embedding model (no language model runs); "
                              "probe (sentiment only): a classifier over that embedding, trained on reviews "
                              "bundled with Muse (auto mixes it in: English into the model's likelihood, Chinese "
                              "into the embedding method).")


@app.command()
@friendly
def classify(
    text: Optional[str] = typer.Argument(None, help="The text to classify ('-' reads standard input)."),
    labels: str = typer.Option(..., "--labels", "-l", help="Comma-separated labels, e.g. sports,business,health."),
    path_in: Optional[Path] = InputOpt, path_out: Optional[Path] = OutputOpt, column: str = ColumnOpt,
    calibrate: Optional[bool] = typer.Option(
        None, "--calibrate/--no-calibrate", show_default=False,
        help="Correct the model's bias towards some labels (contextual calibration; likelihood only). "
             "Default: the method's own choice (on for topics)."),
    method: str = MethodOpt,
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
    as_json: bool = JsonOpt,
):
    """Classify text into your labels by how likely the model finds each label as the answer.

    Examples: muse classify "The striker scored twice" --labels sports,business,health;
    muse classify -i news.csv -o labelled.csv --labels sports,business --column headline.
    """
    from muse.apps.analysis import check_labels, check_method, classify as score

    _check_source(text, path_in, path_out)
    names = check_labels(labels)  # bad labels and methods fail before the model loads
    check_method(method)
    if path_in is not None:
        _run_file(ModelsByLanguage(model, precision), path_in, path_out, labels=names, task="classify",
                  column=column, calibrate=calibrate, method=method)
        return
    body = read_argument(text)
    m = load_for(model, precision, _chinese(body + " " + " ".join(names)))
    _show(score(m, body, names, calibrate=calibrate, method=method), as_json, method)


@app.command()
@friendly
def sentiment(
    text: Optional[str] = typer.Argument(None, help="The text to score ('-' reads standard input)."),
    path_in: Optional[Path] = InputOpt, path_out: Optional[Path] = OutputOpt, column: str = ColumnOpt,
    calibrate: Optional[bool] = typer.Option(
        None, "--calibrate/--no-calibrate", show_default=False,
        help="Apply contextual calibration. Default: the method's own choice (off for sentiment: it scored lower)."),
    method: str = MethodOpt,
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
    as_json: bool = JsonOpt,
):
    """Positive, negative or neutral, with a probability (Chinese text goes to qwen2.5-0.5b when installed).

    Examples: muse sentiment "Terrible service, never again."; muse sentiment -i reviews.jsonl -o scored.jsonl.
    """
    from muse.apps.analysis import check_method, sentiment as score

    _check_source(text, path_in, path_out)
    check_method(method)
    if path_in is not None:
        _run_file(ModelsByLanguage(model, precision), path_in, path_out, task="sentiment", column=column,
                  calibrate=calibrate, method=method)
        return
    body = read_argument(text)
    result = score(load_for(model, precision, _chinese(body)), body, calibrate=calibrate, method=method)
    _show(result["scores"], as_json, method)
