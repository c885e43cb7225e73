"""`muse chat`: talk with a model, turn by turn."""

from __future__ import annotations

from typing import Optional

import typer

from muse.cli.common import MODEL_HELP, PRECISION_HELP, MaxTokens, MinP, RepPenalty, Seed, Temperature, TopK, TopP, _params, _stats, _stream_to_stdout, app, console, err, friendly


CHAT_HELP = "Commands: /system TEXT sets the system prompt, /reset starts over, /exit quits."


@app.command("chat", help="Talk with a model, turn by turn, with its chat template. Replies stream as they are generated. In the chat: /system TEXT sets the system prompt, /reset starts over, /exit quits.")
@friendly
def chat_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System prompt."),
    message: Optional[list[str]] = typer.Option(
        None, "--message", help="Send this message instead of asking interactively (repeatable)."),
    max_tokens: int = MaxTokens, temperature: float = Temperature, top_k: int = TopK, top_p: float = TopP,
    min_p: float = MinP, repetition_penalty: float = RepPenalty, seed: Optional[int] = Seed,
    precision: str = typer.Option("auto", help=PRECISION_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print token counts and speed."),
):
    import muse

    params = _params(max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, None, 1)
    m = muse.load(model, precision=precision)
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    scripted = list(message) if message else None
    if scripted is None:
        err.print(f"[bold]Chatting with {m.name}.[/] [dim]{CHAT_HELP}[/]")
    while True:
        if scripted is not None:
            if not scripted:
                return
            line = scripted.pop(0)
            console.print(f"[bold cyan]you>[/] {line}", highlight=False)
        else:
            try:
                line = console.input("[bold cyan]you>[/] ")
            except EOFError:
                return
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = [h for h in history if h["role"] == "system"]
            err.print("[dim]conversation cleared[/]")
            continue
        if line.startswith("/system"):
            text = line[len("/system"):].strip()
            history = [h for h in history if h["role"] != "system"]
            if text:
                history.insert(0, {"role": "system", "content": text})
            err.print(f"[dim]system prompt {'set' if text else 'cleared'}[/]")
            continue
        if line.startswith("/"):
            err.print(f"[yellow]Unknown command {line.split()[0]}.[/] {CHAT_HELP}")
            continue
        history.append({"role": "user", "content": line})
        console.print("[bold green]muse>[/] ", end="")
        reply = []

        def collect(chunks):
            for c in chunks:
                reply.append(c.text)
                yield c

        try:
            _stats(_stream_to_stdout(collect(m.stream_chat(history, params))), verbose)
        except muse.ContextLengthError as e:
            history.pop()
            err.print(f"[bold red]Error:[/] {e} Use /reset to start a new conversation.")
            continue
        history.append({"role": "assistant", "content": "".join(reply)})
