"""`muse serve`: an OpenAI-compatible HTTP API (FastAPI) over Muse's models.

    from muse.server import create_app, ServerThread
    app = create_app({"smollm2-135m": muse.load()})
    with ServerThread(app) as server:            # uvicorn on a free port, in a thread
        openai.OpenAI(base_url=server.url + "/v1", api_key="-").chat.completions.create(...)

Each model gets one `muse.scheduler.Scheduler` (one thread that owns the model and batches
every request); handlers reach it through `request.app.state.service` (a `Service`). The
routes live in one module per area, each an `APIRouter` that `create_app` includes with
one line: the OpenAI-compatible API in `openai.py`, the app endpoints and the web app in
`apps.py`. Safety (API key, size limits, CORS, safe paths) is in `security.py`; every error
leaves in OpenAI's JSON shape (`errors.py`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from muse.api import Model
from muse.errors import ModelNotFoundError
from muse.scheduler import Scheduler, release_openmp_pool
from muse.server import errors, metrics
from muse.server.security import (APIKeyMiddleware, BodyLimitMiddleware, BrowserGuardMiddleware, Limits,
                                  SecurityHeadersMiddleware, new_launch_token)


@dataclass
class Embedder:
    """An embedding model for /v1/embeddings: its name, texts → (N, D) float32, token counter."""

    name: str
    embed: Callable[[list[str]], np.ndarray]
    count_tokens: Callable[[list[str]], int] | None = None


def default_embedder() -> Embedder | None:
    """multilingual-e5 via `muse.apps.embed`, or None when no embedding model is installed."""
    try:
        from muse.apps import embed as e
    except ImportError:
        return None
    name = e.embedding_model()
    if name is None:
        return None
    return Embedder(name, lambda texts: e.embed(texts, kind="passage"), getattr(e, "count_tokens", None))


class Service:
    """The models a server runs (the first is the default), each with its scheduler."""

    def __init__(self, models: Mapping[str, Model], limits: Limits, embedder: Embedder | None,
                 max_batch: int = 16, prefix_cache_tokens: int = 2048):
        if not models:
            raise ValueError("models must name at least one model to serve")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer ≥ 1, got {max_batch!r}")
        if not isinstance(prefix_cache_tokens, int) or prefix_cache_tokens < 0:
            raise ValueError(f"prefix_cache_tokens must be an integer ≥ 0, got {prefix_cache_tokens!r}")
        self.prefix_cache_tokens = prefix_cache_tokens
        self.models = dict(models)
        self.default = next(iter(self.models))
        self.limits = limits
        self.embedder = embedder
        self.created = int(time.time())
        self.max_batch = max_batch
        self.schedulers: dict[str, Scheduler] = {}
        self._lock = threading.Lock()

    def resolve(self, name: str | None) -> str:
        """The served id for `name` (None → the default); 404 for a model this server does not run."""
        if name is None:
            return self.default
        if name in self.models:
            return name
        for served, m in self.models.items():  # also accept the loaded model's own name
            if m.name == name:
                return served
        raise ModelNotFoundError(
            f"The model '{name}' is not served here. Served: {', '.join(self.models)} "
            "(GET /v1/models lists them; start `muse serve --model NAME` to add one)."
        )

    def model(self, name: str | None = None) -> Model:
        return self.models[self.resolve(name)]

    def scheduler(self, name: str | None = None) -> Scheduler:
        """The model's scheduler, started on first use (and again after `close`)."""
        name = self.resolve(name)
        with self._lock:
            if name not in self.schedulers:
                self.schedulers[name] = Scheduler(self.models[name], max_batch=self.max_batch,
                                                  max_waiting=self.limits.max_queued,
                                                  prefix_cache_tokens=self.prefix_cache_tokens)
            return self.schedulers[name]

    def close(self) -> None:
        """Stop the schedulers (the app's shutdown); requests still running end with an error."""
        with self._lock:
            running, self.schedulers = self.schedulers, {}
        for s in running.values():
            s.close()


def create_app(models: "Model | Sequence[Model] | Mapping[str, Model]", *, api_key: str | None = None,
               cors_origins: Sequence[str] = (), limits: Limits | None = None, max_batch: int = 16,
               embedder: "Embedder | None | str" = "auto", prefix_cache_tokens: int = 2048,
               allowed_hosts: Sequence[str] = ()) -> FastAPI:
    """The FastAPI application serving `models` (a name → Model mapping; a Model or a list
    is named by `Model.name`). The first model is the default.

    api_key: require `Authorization: Bearer KEY` on every API call; without one the server is
    for this machine only, and answers only to loopback Host names (and `allowed_hosts`).
    cors_origins: origins that browsers may call from (none: CORS off; other pages are refused
    state changes, see `security.BrowserGuardMiddleware`). embedder: "auto" uses
    `muse.apps.embed` when installed; None turns /v1/embeddings off (404). prefix_cache_tokens:
    prompt positions per model whose keys and values are kept for prompts that start the same
    way (0: off).
    """
    from muse.server import apps as app_routes, openai as openai_routes, responses as responses_routes

    if isinstance(models, Model):
        models = [models]
    if not isinstance(models, Mapping):
        models = {m.name: m for m in models}
    service = Service(models, limits or Limits(), default_embedder() if embedder == "auto" else embedder, max_batch,
                      prefix_cache_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPI(title="Muse", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible API over local models. Errors use OpenAI's error shape.")
    app.state.service = service
    app.state.launch_token = new_launch_token()  # the web app's page carries it (see security.py)
    errors.install(app)

    @app.get("/health", tags=["Server"], summary="200 while the server runs (no API key needed)")
    def health():
        return {"status": "ok"}

    app.include_router(openai_routes.router)
    app.include_router(responses_routes.router)  # /v1/responses
    app.include_router(openai_routes.tokens_router)  # /tokenize, /detokenize (vLLM's)
    app.include_router(app_routes.router)  # the app endpoints (/api/...) and the web app (/, /static/...)

    _add_middleware(app, service.limits, api_key, cors_origins, allowed_hosts)
    app.openapi = _openapi_without_422(app)
    return app


def _add_middleware(app: FastAPI, lim: Limits, api_key: str | None, cors_origins: Sequence[str],
                    allowed_hosts: Sequence[str]) -> None:
    """The last added runs first. Security headers go on every answer; CORS answers preflights; then
    the Host, Origin and web-app token are checked, then the key, and only then is a body read (up to
    the limit, within the timeout). Metrics count every answer (outermost)."""
    app.add_middleware(BodyLimitMiddleware, limit=lim.max_body_bytes, timeout=lim.body_timeout_s,
                       budget=lim.max_buffered_bytes)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(BrowserGuardMiddleware, token=app.state.launch_token, origins=cors_origins,
                       check_host=not api_key, allowed_hosts=allowed_hosts)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(SecurityHeadersMiddleware)
    metrics.install(app)  # /metrics, and its counting middleware


def _version() -> str:
    import muse

    return muse.__version__


def _openapi_without_422(app: FastAPI):
    """FastAPI documents validation failures as 422; this server answers them with 400."""
    from fastapi.openapi.utils import get_openapi

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def uvicorn_settings(app) -> dict:
    """uvicorn's settings for Muse (besides host and port): connections bounded (503 beyond
    `Limits.max_connections`), idle keep-alive connections closed after 5 s, connections that send
    no request head within `security.HEAD_TIMEOUT_S` closed, a quick graceful shutdown."""
    from muse.server.security import guarded_h11_protocol

    return dict(limit_concurrency=app.state.service.limits.max_connections, timeout_keep_alive=5,
                timeout_graceful_shutdown=5, http=guarded_h11_protocol())


class ServerThread:
    """Run an app with uvicorn in a background thread (tests, benchmarks); port 0 = any free port.

        with ServerThread(app) as server:
            httpx.get(server.url + "/v1/models")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    **uvicorn_settings(app)))
        self.thread = threading.Thread(target=self.server.run, name="muse-uvicorn", daemon=True)
        self.host = host
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "ServerThread":
        release_openmp_pool()  # the models were loaded on this thread; the scheduler threads compute now
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server failed to start; see the log above")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
