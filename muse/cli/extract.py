"""Information extraction: named entities with offsets, or fields from your JSON schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from muse.cli.common import (
    MODEL_HELP, PRECISION_HELP, THE_APPS, app, console, err, friendly, given_sampling, read_argument,
)
from muse.cli.progress import Activity, ModelsByLanguage

BATCH = (".csv", ".jsonl")


def _read_source(source: Optional[str], text: Optional[str]) -> str:
    if (source is None) == (text is None):
        raise ValueError("give a FILE (.txt, or .csv/.jsonl for one result per row), '-' for standard input, "
                         "or --text \"…\"")
    if text is not None:
        return text
    if source == "-":
        return read_argument("-")
    path = Path(source)
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder; give a text, .csv or .jsonl file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it first, "
                         "e.g. with `iconv -f GBK -t UTF-8`") from None


def _show(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return
    table = Table(show_header=True, box=None)
    for name in ("type", "text", "start", "end"):
        table.add_column(name, justify="right" if name in ("start", "end") else "left")
    for e in result["entities"]:
        table.add_row(e["type"], escape(e["text"]), str(e["start"]), str(e["end"]))
    if result["entities"]:
        console.print(table)
    else:
        console.print("[dim]No entities found.[/]")
    dropped = f" · {result['dropped']} dropped (not in the text)" if result["dropped"] else ""
    err.print(f"[dim]model: {result['model']}{dropped}[/]", highlight=False)


@app.command()
@friendly
def extract(
    source: Optional[str] = typer.Argument(
        None, help="A text file to read, '-' for standard input, or a .csv/.jsonl file: one result per row "
                   "(with --output)."),
    text: Optional[str] = typer.Option(None, "--text", help="The text itself, instead of a FILE."),
    types: Optional[str] = typer.Option(
        None, "--types", help="More entity types, comma-separated (e.g. product,drug), added to person, "
                              "organization, location, time and money."),
    only: bool = typer.Option(False, "--only", help="Extract only the --types given, not the five defaults."),
    schema: Optional[Path] = typer.Option(
        None, "--schema", "-s", help="A JSON schema file: extract these fields instead of entities; the "
                                     "answer is a JSON object valid against it."),
    path_out: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Write the result here: for a .csv/.jsonl FILE, the rows with 'entities' "
                                     "(or 'fields') and 'model' added (.csv or .jsonl); otherwise the JSON."),
    column: str = typer.Option("text", "--column", help="The field holding the text in a .csv/.jsonl FILE."),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help=MODEL_HELP + " Without it, Chinese text goes to qwen2.5-0.5b when installed."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", "-n", show_default=False,
                                             help=f"Most tokens for a --schema answer. Default: {THE_APPS}."),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print entities as JSON, not a table."),
):
    """Find names, places, organizations, times and money in text, with their character offsets, or fill
    the fields of your JSON schema. The model's answer is constrained to valid JSON.

    Examples: muse extract --text "Tim Cook visited Berlin on Monday.";
    muse extract news.txt --types product --json;
    muse extract --schema person.json bio.txt;
    muse extract reviews.csv -o entities.jsonl --column text.
    """
    from muse.apps.entities import check_text, extract_entities, extract_fields
    from muse.text import language

    kinds, user_schema = _check_request(types, only, schema)  # bad input fails before loading
    limit = given_sampling(max_tokens=max_tokens)  # {} (the app's FIELDS_TOKENS) or {"max_new_tokens": n}, checked
    models = ModelsByLanguage(model, precision)
    if source is not None and text is None and Path(source).suffix.lower() in BATCH:
        return _extract_batch(models, source, path_out, column, kinds, user_schema)

    body = check_text(_read_source(source, text))
    m = models(language(body))
    with err.status("Extracting…"):
        if user_schema is not None:
            result = extract_fields(m, body, user_schema, **limit)
        else:
            result = extract_entities(m, body, kinds).to_dict()
    if path_out is not None:
        from muse.fileio import write_text_atomic

        write_text_atomic(path_out, json.dumps(result, ensure_ascii=False, indent=2) + "\n")
        err.print(f"[green]{'fields' if user_schema is not None else 'entities'}[/] → {path_out} "
                  f"[dim](model: {m.name})[/]", highlight=False)
    elif user_schema is not None:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        err.print(f"[dim]model: {m.name}[/]", highlight=False)
    else:
        _show(result, as_json)


def _check_request(types, only: bool, schema: Path | None):
    """(entity kinds, the user's schema or None), checked before any model loads."""
    from muse.apps.entities import check_constraint, check_schema, check_types
    from muse.sampling import Constraint

    if only and not types:
        raise ValueError("--only needs --types (the types to extract)")
    kinds = check_types(types, None) if only else check_types(None, types)
    user_schema = check_schema(schema) if schema is not None else None
    if user_schema is not None:
        check_constraint(Constraint.json_schema(user_schema))  # a schema the engine rejects fails here too
    return kinds, user_schema


def _extract_batch(models, source: str, path_out: Path | None, column: str, kinds, user_schema) -> None:
    """One result per row of a .csv/.jsonl file, written to `path_out`."""
    from muse.apps.entities import extract_file, read_batch
    from muse.text import language

    if path_out is None:
        raise ValueError(f"{source} is a batch file: give --output (a .csv or .jsonl file for the results)")
    rows, _ = read_batch(source, column)
    for lang in dict.fromkeys(language(row[column]) for row in rows):
        models(lang)  # load what the rows need before the progress line
    with Activity() as activity:
        n = extract_file(models, source, path_out, column=column, types=kinds, schema=user_schema,
                         progress=lambda done, total: activity(f"Extracting from {source}", done, total))
    err.print(f"[green]{n} records[/] → {path_out}", highlight=False)
