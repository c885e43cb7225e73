"""`muse write ACTION`: the writing partner on a text argument, standard input or a file, with versions."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from muse.cli.common import (
    MODEL_HELP, PRECISION_HELP, MuseGroup, MuseTyper, Seed, Stop, _stats, app, console, err, friendly,
    given_sampling, over, read_argument, sampling_option,
)
from muse.cli.progress import load_for


class WriteGroup(MuseGroup):
    """`muse write`: its actions are registered on first use, as their options come from
    muse.apps.writer, which imports torch; `muse --help` only needs the group's own help."""

    _loaded = False

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            self.commands = {**typer.main.get_group(_actions_app()).commands, **self.commands}

    def list_commands(self, ctx):
        self._load()
        return super().list_commands(ctx)

    def get_command(self, ctx, name):
        if name not in self.commands:  # history and restore need no writer
            self._load()
        return super().get_command(ctx, name)


write_app = MuseTyper(
    cls=WriteGroup,
    help="Write with the model: continue, rewrite, polish (proofread), expand, shorten, outline, titles, "
         "summarize, translate.\n\n"
         "The text comes from an argument, standard input (-) or a file (-i draft.md); the result streams "
         "to the terminal and, with -o FILE or --in-place, is written to a file — only if it passes its checks "
         "(see --check). Every change to a file "
         "keeps the previous version: `muse write history FILE` lists them, `muse write restore FILE SEQ` "
         "brings one back.\n\n"
         "Examples:\n\n"
         "  muse write rewrite \"hey, meeting moved to fri\" --tone formal\n\n"
         "  muse write polish -i draft.md --in-place\n\n"
         "  cat report.txt | muse write summarize - --length 60\n\n"
         "  muse write translate -i notes.md --to zh -o notes.zh.md -m qwen2.5-0.5b",
    no_args_is_help=True,
)
app.add_typer(write_app, name="write")

TEXT_HELP = "The text to work on ('-' reads standard input). Or use -i FILE."
CHECKS_HELP = ("Check the output before it counts as done: no repeated lines, no leftover \"Here is…\", no "
               "numbers or names the text does not have, shorten/expand/summarize lengths met, titles and "
               "outlines as lists, a translation into Chinese, Japanese or Korean in that script. A failing output is retried (up to 3 attempts, with a repair note); if it "
               "still fails, the problems are printed, the exit code is 1 and no file is written. On a "
               "terminal the first attempt streams as a draft. --no-check: one attempt, saved with a warning.")


def _writer_option(field: str):
    """The sampling option for `field`, its help showing the writer's default (`writer.default_params`)."""
    from muse.apps.writer import DEFAULT_PARAMS

    value = getattr(DEFAULT_PARAMS, field)
    return sampling_option(field, f"{value}, at most a quarter of the model's context" if field == "max_new_tokens"
                           else str(value))


def _command(act, tones, languages):
    def command(
        text: Optional[str] = typer.Argument(None, help=TEXT_HELP, show_default=False),
        input: Optional[Path] = typer.Option(None, "--input", "-i", help="Read the text from this UTF-8 file."),
        output: Optional[Path] = typer.Option(
            None, "--output", "-o", help="Also write the result to this file (its previous content is kept "
                                         "as a version)."),
        in_place: bool = typer.Option(False, "--in-place", help="Replace the -i file with the result "
                                                                "(the original is kept as a version)."),
        tone: Optional[str] = typer.Option(None, "--tone", hidden=not act.tone,
                                           help=f"Tone of voice: {', '.join(tones)}."),
        to: Optional[str] = typer.Option(None, "--to", hidden=act.name != "translate",
                                         help=f"Target language: {', '.join(languages)} (or its name)."),
        length: Optional[int] = typer.Option(None, "--length", hidden=act.name != "summarize",
                                             help="Target length: words for English, characters for Chinese "
                                                  "(default: about a quarter of the text)."),
        model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
        precision: str = typer.Option("auto", help=PRECISION_HELP),
        max_tokens: Optional[int] = _writer_option("max_new_tokens"),
        temperature: Optional[float] = _writer_option("temperature"), top_k: Optional[int] = _writer_option("top_k"),
        top_p: Optional[float] = _writer_option("top_p"), min_p: Optional[float] = _writer_option("min_p"),
        repetition_penalty: Optional[float] = _writer_option("repetition_penalty"), seed: Optional[int] = Seed,
        stop: Optional[list[str]] = Stop, num_beams: Optional[int] = _writer_option("num_beams"),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Print token counts and speed."),
        check: bool = typer.Option(True, "--check/--no-check", help=CHECKS_HELP),
    ):
        given = given_sampling(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop,
                               num_beams=num_beams)
        _run(act.name, text, input, output, in_place, given, model, precision, verbose, check,
             tone=tone, to=to, length=length)

    command.__doc__ = act.help + (" Long texts are worked on piece by piece, so nothing is cut."
                                  if act.kind == "pieces" else "")
    return friendly(command)


def _actions_app() -> MuseTyper:
    from muse.apps.writer import ACTIONS, LANGUAGES, TONES

    actions = MuseTyper()
    for name, act in ACTIONS.items():
        actions.command(name)(_command(act, TONES, LANGUAGES))
    actions.command("proofread", help="Same as polish.")(_command(ACTIONS["polish"], TONES, LANGUAGES))
    return actions


def _read_input(text: Optional[str], input: Optional[Path]) -> str:
    from muse.apps.writer import read_text

    if text is not None and input is not None:
        raise ValueError("give the text either as an argument or with -i FILE, not both")
    if input is not None:
        return read_text(input)
    if text == "-":
        return read_argument(text)
    if text is None:
        raise ValueError("no text given: pass it as an argument, '-' to read standard input, or -i FILE")
    return text


def _target(input: Optional[Path], output: Optional[Path], in_place: bool) -> Optional[Path]:
    if in_place and input is None:
        raise ValueError("--in-place changes the -i FILE; give one")
    if in_place and output is not None:
        raise ValueError("use either -o FILE or --in-place, not both")
    target = input if in_place else output
    if target is not None and not target.expanduser().parent.is_dir():
        raise ValueError(f"cannot write {target}: the folder {target.expanduser().parent} does not exist")
    if output is not None and output.exists():
        from muse.apps.writer import read_text

        read_text(output)  # fail now, not after generating, if its content could not be kept as a version
    return target


def _run(action, text, input, output, in_place, given, model, precision, verbose, check=True, **options) -> None:
    """Generate, check, retry, then print and save (see CHECKS_HELP). On a terminal the first attempt
    streams as it is generated; a retry's text is printed whole once it passed. Piped, only the
    final output is printed. An output that fails its checks is never written to a file."""
    from muse.apps.gates import summary
    from muse.apps.writer import ATTEMPTS, Checked, CheckFailedError, Retry, default_params, result_text, stream_checked

    source = _read_input(text, input)
    target = _target(input, output, in_place)
    m = load_for(model, precision, _chinese(source, options.get("to")))
    params = over(default_params(m, action, options.get("to")), given)  # the writer's defaults + what was given
    attempts = ATTEMPTS if check else 1
    live = _terminal()
    result, draft = None, []
    for item in _beams_shown(m, params, stream_checked(m, action, source, params=params, attempts=attempts, **options)):
        if isinstance(item, Retry):
            err.print(f"\n[yellow]✗ failed its checks[/] ({summary(item.problems)}); trying again "
                      f"({item.attempt}/{attempts})…", highlight=False)
        elif isinstance(item, Checked):
            result = item
        elif live:
            draft.append(item.text)
            sys.stdout.write(item.text)
            sys.stdout.flush()
    # The checks' repairs (a repeated line dropped, a name left in Chinese written in pinyin) change
    # the streamed draft: then the final text is printed too, as after a retry.
    repaired = live and result.attempts == 1 and result.output.strip() != "".join(draft).strip()
    if live and (result.attempts > 1 or repaired):
        err.print("\n[dim]repaired:[/]" if repaired else f"[dim]attempt {result.attempts}:[/]", highlight=False)
    if not live or result.attempts > 1 or repaired:
        sys.stdout.write(result.output)
    sys.stdout.write("\n")
    _stats(result.last, verbose)
    if result.last is not None and result.last.finish_reason == "length":
        err.print(f"[yellow]Warning:[/] the model stopped at --max-tokens ({params.max_new_tokens}) before "
                  "finishing (at least one piece); raise -n to get all of it.")
    if not result.ok and result.output.strip():  # an empty output: result_text says so, as before
        if check:
            raise CheckFailedError(result, str(target) if target is not None else None,
                                   "Try another --seed or --temperature, or pass --no-check to keep it anyway.")
        err.print(f"[yellow]Warning (--no-check):[/] {summary(result.problems)}", highlight=False)
    if target is not None:
        _save(target, result_text(action, source, result.output, str(target)), action)  # refuses an empty output


def _terminal() -> bool:
    """Whether stdout is a terminal: the first attempt streams there as a draft."""
    return sys.stdout.isatty()


def _beams_shown(m, params, items):
    """`items`, with beam search's steps shown on stderr until the first arrives (a translation into
    English searches beams, and a beam's text arrives whole when its piece is done)."""
    if params.num_beams == 1:
        yield from items
        return
    from muse.cli.progress import Activity, showing_beams, until_first

    with Activity() as activity, showing_beams(activity, m.tokenizer, f"Beam search, {params.num_beams} beams",
                                               params.max_new_tokens):
        yield from until_first(items, activity)


def _chinese(source: str, to: str | None) -> bool:
    """Whether the work needs a model that reads Chinese: the text is Chinese, or the output is to be."""
    from muse.apps.writer import into_chinese
    from muse.text import language

    return into_chinese(to) or language(source) == "zh"


def _save(target: Path, content: str, action: str) -> None:
    from muse.apps.writer import write_file
    from muse.store import Store

    with Store() as store:
        seq = write_file(store, target, content, action)
    err.print(f"[green]Saved[/] {target} (version {seq}; `muse write history {target}` lists them)", highlight=False)


@write_app.command("history")
@friendly
def history_cmd(file: Path = typer.Argument(..., help="The file whose versions to list.")):
    """List the kept versions of a file: number, action, time, size and first line."""
    from muse.apps.writer import history, version_key
    from muse.store import Store

    with Store() as store:
        rows = history(store, version_key(file))
    if not rows:
        console.print(f"No versions of {file} are kept yet. They are saved when `muse write ACTION -i {file} "
                      "--in-place` (or -o) changes it.", highlight=False)
        return
    table = Table(title=f"Versions of {file}")
    for col, justify in (("seq", "right"), ("action", "left"), ("time", "left"), ("size", "right"),
                         ("first line", "left")):
        table.add_column(col, justify=justify, overflow="ellipsis" if col == "first line" else "fold")
    for r in rows:
        first = r["first_line"] if len(r["first_line"]) <= 60 else r["first_line"][:59] + "…"
        table.add_row(str(r["seq"]), r["action"] or "", datetime.fromtimestamp(r["created_at"]).strftime("%Y-%m-%d %H:%M:%S"),
                      f"{r['size']} chars", first)
    console.print(table)


@write_app.command("restore")
@friendly
def restore_cmd(file: Path = typer.Argument(..., help="The file to restore."),
                seq: int = typer.Argument(..., help="The version number (see `muse write history FILE`).")):
    """Write a kept version back to the file. The restore is itself a new version, so it can be undone."""
    from muse.apps.writer import restore_file
    from muse.store import Store

    with Store() as store:
        new = restore_file(store, file, seq)
    console.print(f"[green]Restored[/] version {seq} of {file} (now version {new}; undo with "
                  f"`muse write restore {file} {new - 1}`)", highlight=False)
