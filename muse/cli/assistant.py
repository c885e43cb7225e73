"""The personal assistant on the command line: `muse chat`, and `muse conversations|persona|memory|feedback`.

Every command is a thin layer over `muse.apps.assistant.Assistant` and `muse.apps.feedback`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from muse.errors import MuseError
from muse.cli.common import (MuseTyper, MODEL_HELP, PRECISION_HELP, MaxTokens, MinP, RepPenalty, Seed, Temperature, TopK, TopP,
                             _stats, _stream_to_stdout, app, console, err, friendly, given_sampling, over)
from muse.cli.progress import load_for, load_model, model_for

CHAT_COMMANDS = {
    "/system TEXT": "set this conversation's system prompt (no text: back to the persona's)",
    "/remember TEXT": "remember a fact for every later conversation",
    "/memories": "list the remembered facts",
    "/forget N": "forget remembered fact N",
    "/title [TEXT]": "show or set the conversation's title",
    "/good [COMMENT]": "rate the last answer as good (liked answers can be exported for fine-tuning)",
    "/bad [COMMENT]": "rate the last answer as bad",
    "/fix TEXT": "rate the last answer as bad and give the answer you wanted (fine-tuning data, an eval item)",
    "/reset": "start a new conversation (this one stays saved)",
    "/help": "show these commands",
    "/exit": "quit (Ctrl-D works too; Ctrl-C while a reply streams stops just the reply)",
}
CHAT_HELP = "Commands: " + ", ".join(c.split()[0] for c in CHAT_COMMANDS) + " (/help explains them)."
CONTEXT_HELP = ("When the conversation outgrows the context window: 'summarize' the oldest turns with the model "
                "(kept as the conversation's summary) or 'drop' them from the prompt. Messages always stay saved.")


def _assistant(model=None, policy: str = "summarize"):
    from muse.apps.assistant import Assistant

    return Assistant(model, policy=policy)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def _when_short(ts: float) -> str:
    """'14:05' today, 'Mar 02 14:05' this year, '2024-03-02' before."""
    t, now = time.localtime(ts), time.localtime()
    if t[:3] == now[:3]:
        return time.strftime("%H:%M", t)
    return time.strftime("%b %d %H:%M" if t.tm_year == now.tm_year else "%Y-%m-%d", t)


# -- muse chat --------------------------------------------------------------------------


class ChatSession:
    """One `muse chat` run: the conversation (created at the first message), the in-chat commands."""

    def __init__(self, assistant, cid: Optional[str], persona: Optional[str], system: Optional[str], params,
                 verbose: bool, markdown: bool = False, reroute=None):
        self.a, self.cid, self.persona, self.system = assistant, cid, persona, system
        self.params, self.verbose = params, verbose
        self.markdown = markdown  # render replies as Markdown (a terminal); else raw text, as pipes want it
        self.warned_language = False
        # reroute(): (model, params) of the bilingual model for a first message the model cannot read, or
        # None; only when the user chose no model (`muse serve` and the apps route Chinese the same way).
        self.reroute = reroute

    def conversation(self) -> str:
        if self.cid is None:
            self.cid = self.a.new_conversation(persona=self.persona)
            if self.system:
                self.a.set_system(self.cid, self.system)
        return self.cid

    def handle(self, line: str) -> bool:
        """Act on one input line; False when the user asked to quit."""
        line = line.strip()
        if not line:
            return True
        if line in ("/exit", "/quit"):
            return False
        if line.startswith("/"):
            name, _, arg = line.partition(" ")
            handler = getattr(self, "cmd_" + name[1:], None) if name[1:].isidentifier() else None
            if handler is None:
                err.print(f"[yellow]Unknown command {escape(name)}.[/] {CHAT_HELP}", highlight=False)
            else:
                handler(arg.strip())
            return True
        self.send(line)
        return True

    def send(self, text: str) -> None:
        from muse.apps.language import LanguageError, check_language
        from muse.errors import ContextLengthError

        if not self.warned_language:
            try:
                check_language(self.a.model, text)
            except LanguageError as e:
                switched = self.reroute() if self.reroute else None
                if switched is None:
                    err.print(f"[yellow]{escape(str(e))}[/]", highlight=False)
                else:
                    self.a.model, self.params = switched  # it reads English too: the rest of the chat stays
                self.warned_language = True
        try:
            stream = self.a.stream_reply(self.conversation(), text, self.params)
        except ContextLengthError as e:
            err.print(f"[bold red]Error:[/] {escape(str(e))}", highlight=False)
            return
        except KeyboardInterrupt:  # while summarizing earlier turns
            err.print("[dim]stopped before the reply began[/]")
            return
        if stream.context.notice:
            err.print(f"[yellow]{escape(stream.context.notice)}[/]", highlight=False)
        # Markdown is redrawn in place below the prompt line; raw text follows it on the same line.
        console.print("[bold green]muse>[/]", end="\n" if self.markdown else " ")
        try:
            _stats(render_markdown(stream, console) if self.markdown else _stream_to_stdout(stream), self.verbose)
        except KeyboardInterrupt:
            stream.close()  # stores the partial reply, marked stopped
            sys.stdout.write("\n")
            err.print("[dim]stopped — the reply so far is saved[/]")

    # in-chat commands: cmd_NAME(arg) for /NAME

    def cmd_help(self, arg: str) -> None:
        for usage, what in CHAT_COMMANDS.items():
            err.print(f"  [bold]{usage:<16}[/] {what}", highlight=False)

    def cmd_system(self, arg: str) -> None:
        self.system = arg or None
        if self.cid is not None:
            self.a.set_system(self.cid, arg)
        err.print(f"[dim]system prompt {'set' if arg else 'cleared'}[/]")

    def cmd_reset(self, arg: str) -> None:
        old, self.cid = self.cid, None
        kept = f" (the old one is saved: muse chat --resume {old})" if old else ""
        err.print(f"[dim]conversation cleared — a new one starts{kept}[/]", highlight=False)

    def cmd_remember(self, arg: str) -> None:
        mid = self.a.remember(arg, self.cid)
        err.print(f"[dim]remembered (#{mid}); /forget {mid} undoes it[/]")

    def cmd_memories(self, arg: str) -> None:
        facts = self.a.memories()
        for f in facts:
            err.print(f"  #{f['id']}  {f['content']}", highlight=False, markup=False)
        if not facts:
            err.print("[dim]nothing remembered yet: /remember TEXT[/]")

    def cmd_forget(self, arg: str) -> None:
        if not arg.lstrip("#").isdigit():
            raise ValueError("usage: /forget N, with N from /memories")
        self.a.forget(int(arg.lstrip("#")))
        err.print(f"[dim]forgot #{arg.lstrip('#')}[/]")

    def cmd_title(self, arg: str) -> None:
        if arg:
            self.a.rename(self.conversation(), arg)
        title = self.a.get_conversation(self.cid)["title"] if self.cid else ""
        err.print(f"[dim]title: {escape(title or '(none yet)')}[/]", highlight=False)

    def cmd_good(self, arg: str) -> None:
        self._rate(+1, arg)

    def cmd_bad(self, arg: str) -> None:
        self._rate(-1, arg)

    def cmd_fix(self, arg: str) -> None:
        if not arg.strip():
            raise MuseError("Write the answer you wanted after /fix, e.g. /fix The capital of France is Paris.")
        self._rate(-1, "", correction=arg)

    def _rate(self, rating: int, comment: str, correction: str | None = None) -> None:
        if self.cid is None:
            raise MuseError("There is no answer to rate yet.")
        fid = self.a.rate(self.cid, rating, comment or None, correction=correction)
        err.print(f"[dim]thanks — feedback #{fid} saved[/]")


class _Tail:
    """The last screenful of a renderable, so a reply taller than the terminal streams with its
    newest lines in view (a live region taller than the screen cannot be redrawn)."""

    def __init__(self, renderable):
        self.renderable = renderable

    def __rich_console__(self, console, options):
        from rich.segment import Segment

        lines = console.render_lines(self.renderable, options.update(height=None), pad=False)
        for line in lines[-max(1, console.height - 1):]:
            yield from line
            yield Segment.line()


def render_markdown(chunks, out) -> object:
    """Show streamed `chunks` on console `out` as Markdown (bold, lists, code blocks), redrawn as
    text arrives, then the whole reply; returns the last chunk (None if there was none)."""
    from rich.live import Live
    from rich.markdown import Markdown

    text, last = "", None
    with Live(console=out, refresh_per_second=8) as live:
        try:
            for last in chunks:
                text += last.text
                live.update(_Tail(Markdown(text)))
        finally:  # also when stopped: the reply so far, whole
            live.update(Markdown(text), refresh=True)
    return last


def _chat_lines(messages: Optional[list[str]]):
    """The user's lines: the --message values (echoed), else what they type until EOF or Ctrl-C."""
    if messages is not None:
        for line in messages:
            console.print(Text.assemble(("you> ", "bold cyan"), line))
            yield line
        return
    while True:
        try:
            yield console.input("[bold cyan]you>[/] ")
        except (EOFError, KeyboardInterrupt):
            return


def _open_conversation(a, resume: Optional[str], last: bool) -> Optional[str]:
    if resume and last:
        raise ValueError("give --resume ID or --continue, not both")
    if resume:
        return a.resolve(resume)
    if last:
        cid = a.last_conversation()
        if cid is None:
            raise MuseError("There is no conversation to continue yet; start one with `muse chat`.")
        return cid
    return None


def _load_for(conv: Optional[dict], model: Optional[str], precision: str):
    """The model asked for, else the one the resumed conversation used (the default if it is gone)."""
    from muse.errors import ModelNotFoundError

    if model is None and conv is not None and conv["model"]:
        try:
            return load_model(conv["model"], precision)
        except ModelNotFoundError:
            err.print(f"[yellow]{escape(conv['model'])} (this conversation's model) is not available; "
                      "using the default model.[/]", highlight=False)
    return load_model(model, precision)


def _show_resumed(conv: dict) -> None:
    err.print(f"[bold]Resuming {escape(conv['title'] or 'an untitled conversation')}[/] ({conv['id']}, "
              f"{len(conv['messages'])} messages)", highlight=False)
    for m in [m for m in conv["messages"] if m["role"] != "system"][-2:]:
        text = " ".join(m["content"].split())
        err.print(f"[dim]{m['role']}: {escape(text[:200] + ('…' if len(text) > 200 else ''))}[/]", highlight=False)


@app.command("chat", help="Talk with a model, turn by turn; conversations are saved and can be resumed "
                          "(--resume ID, --continue). Replies stream as they are generated. In the chat: /system "
                          "TEXT sets the system prompt, /reset starts over, /remember TEXT keeps a fact, /good and "
                          "/bad rate the last answer, /exit quits; /help lists every command.")
@friendly
def chat_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP + " Resuming: the conversation's."),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System prompt for this conversation."),
    message: Optional[list[str]] = typer.Option(
        None, "--message", help="Send this message instead of asking interactively (repeatable; /commands work)."),
    resume: Optional[str] = typer.Option(None, "--resume", "-r", help="Continue the conversation with this id "
                                                                      "(see `muse conversations list`)."),
    last: bool = typer.Option(False, "--continue", "-c", help="Continue the most recent conversation."),
    persona: Optional[str] = typer.Option(None, "--persona", "-p", help="Use this persona's system prompt "
                                                                        "(see `muse persona list`)."),
    context: str = typer.Option("summarize", "--context", help=CONTEXT_HELP),
    max_tokens: Optional[int] = MaxTokens, temperature: Optional[float] = Temperature,
    top_k: Optional[int] = TopK, top_p: Optional[float] = TopP, min_p: Optional[float] = MinP,
    repetition_penalty: Optional[float] = RepPenalty, seed: Optional[int] = Seed,
    precision: str = typer.Option("auto", help=PRECISION_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print token counts and speed."),
    markdown: bool = typer.Option(True, "--markdown/--plain", help="Render replies as Markdown in a terminal "
                                                                   "(--plain: raw text, as pipes always get)."),
):
    given = given_sampling(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                           repetition_penalty=repetition_penalty, seed=seed)
    a = _assistant(policy=context)
    cid = _open_conversation(a, resume, last)
    conv = a.get_conversation(cid) if cid else None
    if persona:
        a.get_persona(persona)  # fail before loading the model
    a.model = _load_for(conv, model, precision)
    params = over(a.model.params(), given)  # what was given, over the model's recommended sampling

    def reroute():
        chosen = model_for(None, chinese=True)
        if chosen is None:
            return None
        m = load_for(None, precision, chinese=True)  # says "Chinese: answered by …"
        return m, over(m.params(), given)

    chosen_by_user = model is not None or (conv is not None and conv["model"])
    session = ChatSession(a, cid, persona, system, params, verbose, markdown=markdown and console.is_terminal,
                          reroute=None if chosen_by_user else reroute)
    if conv is not None:
        _show_resumed(conv)
        if persona:
            a.set_persona(cid, persona)
        if system:
            a.set_system(cid, system)
    if message is None:
        err.print(f"[bold]Chatting with {a.model.name}.[/] [dim]{CHAT_HELP}[/]", highlight=False)
    for line in _chat_lines(message):
        try:
            if not session.handle(line):
                break
        except (MuseError, ValueError) as e:  # e.g. a bad /command argument: say so, keep chatting
            err.print(f"[bold red]Error:[/] {escape(str(e))}", highlight=False)
    if session.cid:
        err.print(f"[dim]Saved as conversation {session.cid}: `muse chat --resume {session.cid}` continues it.[/]",
                  highlight=False)


# -- muse conversations -----------------------------------------------------------------

conversations_app = MuseTyper(help="Saved conversations: list, show, search, rename, delete, export, import.",
                                no_args_is_help=True)
app.add_typer(conversations_app, name="conversations")


@conversations_app.command("list")
@friendly
def conversations_list(limit: int = typer.Option(50, "--limit", "-n", help="Show at most this many.")):
    """The most recently active conversations first."""
    rows = _assistant().list_conversations(limit)
    if not rows:
        console.print("No conversations yet; start one with `muse chat`.")
        return
    # One line per conversation at any width: ids, counts and dates whole; long titles, personas and model
    # names cut with "…" (the title gets what the other columns leave).
    cells = [(r["id"], escape(r["title"]), str(r["messages"]), escape(r["persona"] or ""),
              escape(r["model"] or ""), _when_short(r["updated_at"])) for r in rows]
    heads = ("id", "title", "msgs", "persona", "model", "last active")
    caps = (None, None, None, 14, 18, None)
    from rich.cells import cell_len

    widths = [min(max(cell_len(h), *(cell_len(c[i]) for c in cells)), caps[i] or 10**6) for i, h in enumerate(heads)]
    title_room = max(12, console.width - (sum(widths) - widths[1]) - 3 * len(heads) - 1)
    table = Table()
    for i, h in enumerate(heads):
        table.add_column(h, no_wrap=True, overflow="ellipsis", justify="right" if h == "msgs" else "left",
                         max_width=title_room if h == "title" else caps[i])
    for c in cells:
        table.add_row(*c)
    console.print(table)


@conversations_app.command("show")
@friendly
def conversations_show(cid: str = typer.Argument(..., help="Conversation id (or a unique prefix).")):
    """Every message of a conversation, numbered (the numbers `muse feedback add --message` takes)."""
    conv = _assistant().get_conversation(cid)
    about = [conv["id"], conv["model"] or "", f"persona {conv['persona']}" if conv["persona"] else "",
             _when(conv["created_at"])]
    title = escape(conv["title"] or "(untitled)")
    console.print(f"[bold]{title}[/]  [dim]{escape(' · '.join(filter(None, about)))}[/]", highlight=False)
    if conv["summary"]:
        console.print(f"[dim]summary of earlier turns: {escape(conv['summary'])}[/]", highlight=False)
    for m in conv["messages"]:
        stopped = " (stopped)" if (m["meta"] or {}).get("finish_reason") == "stopped" else ""
        console.print(f"\n[bold]{m['n']}. {m['role']}[/]{stopped}", highlight=False)
        console.print(m["content"], markup=False, highlight=False)


@conversations_app.command("search")
@friendly
def conversations_search(query: list[str] = typer.Argument(..., help="Words to find (all of them; Chinese too).")):
    """Find conversations whose title or a message contains every word."""
    hits = _assistant().search(" ".join(query))
    if not hits:
        console.print("No conversation matches.")
        return
    table = Table()
    for col in ("id", "title", "matches", "where"):
        table.add_column(col)
    for h in hits:
        table.add_row(h["id"], escape(h["title"]), str(h["matches"]), escape(h["snippet"]))
    console.print(table)


@conversations_app.command("rename")
@friendly
def conversations_rename(cid: str = typer.Argument(..., help="Conversation id."),
                         title: str = typer.Argument(..., help="The new title.")):
    """Give a conversation a new title."""
    a = _assistant()
    a.rename(cid, title)
    console.print(f"Renamed {a.resolve(cid)}.")


@conversations_app.command("delete")
@friendly
def conversations_delete(cid: str = typer.Argument(..., help="Conversation id."),
                         yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation.")):
    """Delete a conversation and its messages (feedback given on them is kept)."""
    a = _assistant()
    conv = a.get_conversation(cid)
    if not yes and not typer.confirm(f"Delete {conv['id']} ({conv['title'] or 'untitled'}, "
                                     f"{len(conv['messages'])} messages)?"):
        raise typer.Exit(1)
    a.delete(conv["id"])
    console.print(f"Deleted {conv['id']}.")


@conversations_app.command("export")
@friendly
def conversations_export(
    cid: str = typer.Argument(..., help="Conversation id."),
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help="json or markdown (default: from the file's "
                                                                    "suffix, else json)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write to this file (default: print it)."),
):
    """Write a conversation as JSON or Markdown; `muse conversations import` reads either back."""
    from muse.fileio import write_text_atomic

    fmt = fmt or ("markdown" if out is not None and out.suffix.lower() in (".md", ".markdown") else "json")
    text = _assistant().export_conversation(cid, fmt)
    if out is None:
        sys.stdout.write(text)
        return
    write_text_atomic(out, text)
    err.print(f"Wrote {out}", highlight=False)


@conversations_app.command("import")
@friendly
def conversations_import(path: str = typer.Argument(..., help="A file from `muse conversations export` "
                                                               "('-' reads standard input).")):
    """Add a conversation from an exported JSON or Markdown file (as a new conversation)."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8", newline="") as f:  # newline="": keep \r\n inside messages
                text = f.read()
    except FileNotFoundError:
        raise MuseError(f"{path}: no such file.") from None
    except UnicodeDecodeError as e:
        raise MuseError(f"{path} is not UTF-8 text ({e.reason}); export it again with Muse.") from None
    except OSError as e:
        raise MuseError(f"{path} cannot be read ({e.strerror}).") from None
    cid = _assistant().import_conversation(text)
    console.print(f"Imported as {cid}; `muse chat --resume {cid}` continues it.")


# -- muse persona -----------------------------------------------------------------------

persona_app = MuseTyper(help="Personas: named system prompts for `muse chat --persona NAME`.",
                          no_args_is_help=True)
app.add_typer(persona_app, name="persona")


@persona_app.command("add")
@friendly
def persona_add(name: str = typer.Argument(..., help="One word, e.g. tutor."),
                system_prompt: str = typer.Argument(..., help="The system prompt, e.g. 'You are a patient tutor.'")):
    """Add a persona (or replace the system prompt of an existing one)."""
    p = _assistant().add_persona(name, system_prompt)
    console.print(f"Persona {p['name']} saved; use it with `muse chat --persona {p['name']}`.", highlight=False)


@persona_app.command("list")
@friendly
def persona_list():
    """Every persona and its system prompt."""
    rows = _assistant().list_personas()
    if not rows:
        console.print('No personas yet; add one with `muse persona add tutor "You are a patient tutor."`')
        return
    table = Table()
    table.add_column("name")
    table.add_column("system prompt")
    for r in rows:
        table.add_row(escape(r["name"]), escape(r["system_prompt"]))
    console.print(table)


@persona_app.command("delete")
@friendly
def persona_delete(name: str = typer.Argument(..., help="The persona's name.")):
    """Delete a persona (its conversations are kept)."""
    _assistant().delete_persona(name)
    console.print(f"Deleted persona {name}.", highlight=False)


# -- muse memory ------------------------------------------------------------------------

memory_app = MuseTyper(help="Facts the assistant remembers (/remember in `muse chat`); the relevant ones join "
                              "every conversation's system prompt.", no_args_is_help=True)
app.add_typer(memory_app, name="memory")


@memory_app.command("list")
@friendly
def memory_list():
    """Every remembered fact with its number."""
    facts = _assistant().memories()
    if not facts:
        console.print("Nothing remembered yet; say /remember TEXT in `muse chat`, or `muse memory add TEXT`.")
        return
    table = Table()
    for col in ("#", "fact", "conversation", "added"):
        table.add_column(col)
    for f in facts:
        table.add_row(str(f["id"]), escape(f["content"]), f["conversation_id"] or "", _when(f["created_at"]))
    console.print(table)


@memory_app.command("add")
@friendly
def memory_add(fact: list[str] = typer.Argument(..., help="The fact, e.g. I live in Lyon.")):
    """Remember a fact."""
    console.print(f"Remembered (#{_assistant().remember(' '.join(fact))}).")


@memory_app.command("delete")
@friendly
def memory_delete(memory_id: int = typer.Argument(..., help="The fact's number (see `muse memory list`).")):
    """Forget a fact."""
    _assistant().forget(memory_id)
    console.print(f"Forgot #{memory_id}.")


# -- muse feedback ----------------------------------------------------------------------

feedback_app = MuseTyper(help="Ratings of answers and corrections: they export as fine-tuning data and eval items.",
                           no_args_is_help=True)
app.add_typer(feedback_app, name="feedback")


@feedback_app.command("add")
@friendly
def feedback_add(
    conversation: str = typer.Option(..., "--conversation", "-c", help="Conversation id."),
    message: Optional[int] = typer.Option(None, "--message", help="The answer's number in `muse conversations "
                                                                  "show` (default: the last answer)."),
    up: bool = typer.Option(False, "--up", help="A good answer."),
    down: bool = typer.Option(False, "--down", help="A bad answer."),
    comment: Optional[str] = typer.Option(None, "--comment", help="What was good or bad about it."),
    correction: Optional[str] = typer.Option(None, "--correction", help="The answer you wanted instead (with "
                                                                          "--down; implies it)."),
):
    """Rate an answer: --up or --down, with an optional comment and, for a bad one, the right answer."""
    if correction is not None and not up:
        down = True
    if up == down:
        raise ValueError("give exactly one of --up or --down")
    fid = _assistant().rate(conversation, 1 if up else -1, comment, message, correction)
    console.print(f"Saved feedback #{fid}.")


@feedback_app.command("list")
@friendly
def feedback_list():
    """Every rating, oldest first."""
    from muse.apps.feedback import list_feedback

    rows = list_feedback(_assistant().store)
    if not rows:
        console.print("No feedback yet; rate answers with /good or /bad in `muse chat`.")
        return
    table = Table()
    for col in ("#", "rating", "answer", "correction", "comment"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["id"]), "👍" if r["rating"] > 0 else "👎", escape(_short(r["response"])),
                      escape(_short(r["correction"] or "")), escape(r["comment"] or ""))
    console.print(table)


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text[:width] + ("…" if len(text) > width else "")


@feedback_app.command("export")
@friendly
def feedback_export(
    out: Path = typer.Option(..., "--out", "-o", help="The JSONL file to write, e.g. train.jsonl."),
    kind: str = typer.Option("finetune", "--as", help="finetune: liked answers and corrections as chats for "
                                                       "`muse finetune --data`; eval: the disliked answers as "
                                                       "items for `muse eval -s FILE`."),
):
    """Write the feedback as fine-tuning chats (liked answers, corrections) or as eval items (disliked answers)."""
    from muse.apps.feedback import export_feedback

    n = export_feedback(_assistant().store, out, kind)
    if kind == "eval":
        console.print(f"Wrote {n} eval item{'s' if n != 1 else ''} to {out}; score a model on them with "
                      f"`muse eval -s {out}`.", highlight=False)
    else:
        console.print(f"Wrote {n} chat{'s' if n != 1 else ''} to {out}; fine-tune with "
                      f"`muse finetune --data {out}`.", highlight=False)
