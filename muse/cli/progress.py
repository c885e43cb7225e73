"""What a long command is doing, shown on stderr so stdout stays clean for pipes.

`Activity` takes the library's progress callbacks, `activity(what, done, total)` (total 0 = a
step of unknown length), and steps set by the command itself (`activity.step("Searching…")`).
On a terminal it is one transient rich progress line: spinner, step, bar, count, elapsed, ETA.
Elsewhere it is silent, unless MUSE_PROGRESS=1 asks for one plain line per step (logs, CI);
MUSE_PROGRESS=0 silences it on a terminal too.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.markup import escape

from muse.cli.common import err

T = TypeVar("T")


class Activity:
    """A live view of one command's steps (a context manager; see the module docstring)."""

    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or err
        wanted = os.environ.get("MUSE_PROGRESS", "")
        self.live = self.console.is_terminal and wanted != "0" and not quiet
        self.lines = not self.live and wanted == "1" and not quiet
        self._progress = None  # a rich.progress.Progress while live
        self._task = None
        self._what: str | None = None

    def __enter__(self) -> "Activity":
        if self.live:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=24),
                _Known(MofNCompleteColumn()), TimeElapsedColumn(), _Known(TimeRemainingColumn()),
                console=self.console, transient=True,
                refresh_per_second=8)
            self._progress.start()  # draws at once: the first step shows within a refresh
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Take the progress line away (before the command writes its answer)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def step(self, what: str) -> None:
        """A step of unknown length: a spinner and the elapsed time."""
        self(what, 0, 0)

    def __call__(self, what: str, done: int, total: int, detail: str = "") -> None:
        """Step `what` is at `done` of `total` (0: unknown); `detail` is shown after it on a terminal.
        An empty `what` (`muse.checkpoints.HAND_OVER`) closes the line: the caller draws its own now."""
        if not what:
            return self.close()
        shown = f"{escape(what)} [dim]{escape(detail)}[/]" if detail else escape(what)
        if what != self._what:
            self._what = what
            if self.lines:
                self.console.print(f"{what}…", style="dim", highlight=False, soft_wrap=True, markup=False)
            if self._progress is not None:
                if self._task is not None:
                    self._progress.remove_task(self._task)
                self._task = self._progress.add_task(shown, total=total or None, completed=done)
                self._progress.refresh()
                return
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=done, total=total or None, description=shown)


class _Known:
    """A progress column shown only for steps of known length (no `0/?` or `-:--:--` for the rest)."""

    def __init__(self, column):
        self.column = column

    def __getattr__(self, name):
        return getattr(self.column, name)

    def __call__(self, task):
        return self.column(task) if task.total is not None else ""


@contextmanager
def loading(activity: Activity, name: str | None) -> Iterator[None]:
    """Show `Loading NAME…` and, on a first use, each step of converting it (`muse.load` inside)."""
    from muse.checkpoints import reporting  # light: muse.checkpoints imports no torch at the top
    from muse.checkpoints.registry import DEFAULT_MODEL

    activity.step(f"Loading {name or os.environ.get('MUSE_MODEL') or DEFAULT_MODEL}")
    with reporting(activity):
        yield


def until_first(items: Iterable[T], activity: Activity) -> Iterator[T]:
    """Yield `items`, closing `activity` as the first one arrives (and when they end or fail)."""
    try:
        for item in items:
            activity.close()
            yield item
    finally:
        activity.close()


BEAM_TAIL = 40  # characters of the best beam shown: enough to read it forming, short enough for 80 columns


@contextmanager
def showing_beams(activity: Activity, tokenizer, what: str, total: int) -> Iterator[None]:
    """Report each beam-search step as one step of `what` out of `total`, with the end of the
    best beam so far: beam search decides its text only at the end, so this shows it forming."""
    from muse.generation import watching_beams

    def watch(step: int, best: list[int]) -> None:
        text = " ".join(tokenizer.decode(best).split()) if tokenizer is not None and best else ""
        if len(text) > BEAM_TAIL:
            text = "…" + text[-BEAM_TAIL:]
        activity(what, step, total, f"best so far: {text}" if text else "")

    activity(what, 0, total)
    with watching_beams(watch):
        yield


def load_model(name: str | None, precision: str = "auto"):
    """`muse.load(name)` with `Loading NAME…` (and a first use's conversion steps) on stderr."""
    import muse

    with Activity() as activity, loading(activity, name):
        return muse.load(name, precision=precision)


def model_for(name: str | None, chinese: bool) -> str | None:
    """The model to load for a request, as `muse serve` routes it: `name` when the user gave one;
    otherwise the default, unless the request is in Chinese (or asks for Chinese output), the default
    is a bundled model that reads English only and the bundled bilingual model is installed.
    Decided without loading anything; a default that is not bundled is kept (its tokenizer decides later)."""
    from muse.checkpoints.registry import BUNDLED, DEFAULT_MODEL

    if name is not None or not chinese:
        return name
    default = BUNDLED.get(os.environ.get("MUSE_MODEL") or DEFAULT_MODEL)
    if default is None or "zh" in default.languages:
        return None
    bilingual = next((m for m in BUNDLED.values() if "zh" in m.languages), None)
    if bilingual is None or bilingual.installed_file() is None:
        return None  # check_language then says how to install it
    return bilingual.name


def routed(name: str | None, chinese: bool) -> str | None:
    """`model_for(name, chinese)`, saying on stderr when Chinese went to the bilingual model."""
    chosen = model_for(name, chinese)
    if chosen != name:
        err.print(f"[dim]Chinese: answered by {chosen} (the default model reads English only; "
                  "--model picks another)[/]", highlight=False)
    return chosen


def load_for(name: str | None, precision: str = "auto", chinese: bool = False):
    """`load_model` of the model `routed` picks."""
    return load_model(routed(name, chinese), precision)


class ModelsByLanguage:
    """The model for each language of a batch, loaded on first use (`model_for` decides)."""

    def __init__(self, name: str | None, precision: str):
        self.name, self.precision = name, precision
        self._loaded: dict[str | None, object] = {}

    def __call__(self, lang: str):
        chosen = model_for(self.name, lang == "zh")
        if chosen not in self._loaded:
            self._loaded[chosen] = load_for(self.name, self.precision, lang == "zh")
        return self._loaded[chosen]
