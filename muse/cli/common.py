"""What every `muse` command shares: the typer app, consoles, error handling, sampling options."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

# `muse --help` lists the commands in these panels, in this order.
PANELS: dict[str, tuple[str, ...]] = {
    "Chat & documents": ("chat", "ask", "kb", "conversations", "persona", "memory", "feedback"),
    "Writing": ("write", "create", "generate"),
    "Analysis": ("classify", "sentiment", "extract"),
    "Training": ("data", "tokenizer", "train", "finetune", "lora"),
    "Trust": ("eval", "safety", "explain", "quantize", "prune"),
    "Serving": ("serve",),
    "Models": ("models", "info", "export"),
}
_ORDER = {name: i for i, name in enumerate(n for names in PANELS.values() for n in names)}
_PANEL = {name: panel for panel, names in PANELS.items() for name in names}


class _RichHelp:
    """Installs Muse's help formatting (muse.cli.help) only when help is shown: start-up stays fast."""

    def format_help(self, ctx, formatter):
        from muse.cli import help

        help.install()
        return super().format_help(ctx, formatter)


class MuseCommand(_RichHelp, TyperCommand):
    pass


class MuseGroup(_RichHelp, TyperGroup):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for command in self.commands.values():  # a docstring's line breaks are not the list's
            first = inspect.cleandoc(command.help or "").split("\n\n")[0]
            if command.short_help is None and first and not first.startswith("\b"):
                command.short_help = " ".join(first.split())


class RootGroup(MuseGroup):
    """The `muse` command: its subcommands in the panels of PANELS, in that order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name, command in self.commands.items():
            command.rich_help_panel = _PANEL.get(name) or getattr(command, "rich_help_panel", None)

    def list_commands(self, ctx):
        return sorted(self.commands, key=lambda n: _ORDER.get(n, len(_ORDER)))


class MuseTyper(typer.Typer):
    """A typer.Typer whose commands and groups use Muse's help layout (`muse.cli.help`)."""

    def __init__(self, *args, cls=MuseGroup, **kwargs):
        kwargs.setdefault("rich_markup_mode", "rich")
        super().__init__(*args, cls=cls, **kwargs)

    def command(self, *args, cls=MuseCommand, **kwargs):
        return super().command(*args, cls=cls, **kwargs)

    def callback(self, *args, cls=MuseGroup, **kwargs):
        return super().callback(*args, cls=cls, **kwargs)


app = MuseTyper(
    cls=RootGroup,
    help="Muse — a local-first LLM workshop. Runs models on your own machine, offline.\n\n"
         "Start with `muse chat`, or `muse generate \"Once upon a time\"`. "
         "`muse models` lists the models you can use.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = MuseTyper(help="List and install models.", invoke_without_command=True)
app.add_typer(models_app, name="models")
console = Console()
err = Console(stderr=True)

MODEL_HELP = "Bundled model name (default: smollm2-135m), a .gguf file, or a Hugging Face / Muse model directory."
PRECISION_HELP = ("auto (keep the file's quantization), fp32, bf16, int8, int4, or w4a8 (auto's weights with "
                  "int8 activations: faster on CPUs without AVX-512, slightly less exact).")


def friendly(fn):
    """Turn user errors into one clear line and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from muse.errors import MuseError

        try:
            return fn(*args, **kwargs)
        except (MuseError, ValueError) as e:
            err.print(f"[bold red]Error:[/] {e}", highlight=False)
            raise typer.Exit(2 if isinstance(e, ValueError) and not isinstance(e, MuseError) else 1)
        except KeyboardInterrupt:
            err.print("\n[dim]interrupted[/]")
            raise typer.Exit(130)

    return wrapper


def read_argument(text: str) -> str:
    """A text argument as given, or standard input (UTF-8) when it is '-'."""
    if text != "-":
        return text
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"standard input is not UTF-8 text (bad byte at offset {e.start}); "
                         "convert it first, e.g. with `iconv -f GBK -t UTF-8`") from None


# -- sampling options ---------------------------------------------------------------------
# Every sampling option defaults to None, "not given": each app (muse.apps.*) owns its defaults and
# the CLI lays only what the user gave over them — as the server's `Sampling.params` does, so
# `muse write` and /api/write sample alike. `muse generate` (no app) uses SamplingParams' own defaults.

THE_APPS = "the app's"  # what --help shows as the default of an option the app chooses

# SamplingParams field → (the option's flags, its help)
_SAMPLING = {
    "max_new_tokens": (("--max-tokens", "-n"), "Most tokens to generate."),
    "temperature": (("--temperature", "-t"), "0 = greedy; higher = more varied."),
    "top_k": (("--top-k",), "Sample from the k most likely tokens (0 = off)."),
    "top_p": (("--top-p",), "Nucleus sampling: smallest set with this probability mass (1 = off)."),
    "min_p": (("--min-p",), "Drop tokens below min_p × the top token's probability (0 = off)."),
    "repetition_penalty": (("--repetition-penalty",), "> 1 discourages repeating tokens."),
    "presence_penalty": (("--presence-penalty",), "> 0 discourages reusing words already written (-2..2)."),
    "seed": (("--seed",), "Same seed, same text."),
    "stop": (("--stop",), "Stop before this text (repeatable)."),
    "num_beams": (("--num-beams",), "Beam search with this many beams (deterministic)."),
}


def sampling_option(field: str, default: str | None = THE_APPS):
    """The option for SamplingParams `field`, None unless given; its help ends with `default`
    (None: says nothing of a default)."""
    flags, help = _SAMPLING[field]
    return typer.Option(None, *flags, help=help if default is None else f"{help} Default: {default}.",
                        show_default=False)


def library_default(field: str) -> str:
    """The default of `field` when no app sets one (`muse generate`), as --help shows it: the model's
    recommended sampling where a checkpoint may recommend it, else SamplingParams' own default."""
    from muse.sampling import RECOMMENDABLE, SamplingParams  # torch-free

    value = {f.name: f for f in dataclasses.fields(SamplingParams)}[field].default
    shown = "none" if value is None else str(value)
    return f"the model's recommended (`muse info` shows it), else {shown}" if field in RECOMMENDABLE else shown


def given_sampling(**options) -> dict:
    """The sampling options the user gave (not None, not empty), under SamplingParams' names
    (max_tokens → max_new_tokens), checked now — before a model loads — against SamplingParams' ranges."""
    from muse.sampling import SamplingParams  # torch-free

    given = {("max_new_tokens" if k == "max_tokens" else k): (list(v) if k == "stop" else v)
             for k, v in options.items() if v is not None and not (k == "stop" and not v)}
    SamplingParams(**given)  # a bad value is a ValueError naming the option
    return given


def over(base, given: dict):
    """`given` (from `given_sampling`) over `base`, the app's defaults: nothing given → `base` itself
    (None: let the app choose); else base, or SamplingParams' defaults, with `given` replaced.
    The same rule as the server's `muse.server.apps.Sampling.params`."""
    if not given:
        return base
    from muse.sampling import SamplingParams

    return (base if base is not None else SamplingParams()).replace(**given)


MaxTokens = sampling_option("max_new_tokens")
Temperature = sampling_option("temperature")
TopK = sampling_option("top_k")
TopP = sampling_option("top_p")
MinP = sampling_option("min_p")
RepPenalty = sampling_option("repetition_penalty")
Seed = sampling_option("seed", None)
Stop = sampling_option("stop", None)
Beams = sampling_option("num_beams")


def _stream_to_stdout(chunks) -> object:
    last = None
    for chunk in chunks:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        last = chunk
    sys.stdout.write("\n")
    return last


def _stats(last, verbose: bool) -> None:
    if verbose and last is not None:
        drafts = (f" · prompt lookup: {last.accepted_tokens} of {last.drafted_tokens} drafted tokens accepted"
                  if last.drafted_tokens else "")
        err.print(f"[dim]{last.prompt_tokens} prompt tokens at {last.prompt_tps:.0f} tok/s · "
                  f"{last.generation_tokens} generated at {last.generation_tps:.1f} tok/s · "
                  f"finish: {last.finish_reason}{drafts}[/]")
