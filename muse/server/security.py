"""The service's safety: who may call it, how much they may send, where files may go.

- Binding to anything but loopback requires an API key (`check_bind`); with a key, every
  request outside `PUBLIC_PATHS` needs `Authorization: Bearer KEY`, else 401.
- Bodies over `Limits.max_body_bytes` get 413 before the application sees them (the body is
  read in full, up to the limit, and replayed); prompts over `Limits.max_prompt_chars` get
  413 in the handlers.
- CORS stays off unless origins are configured (see `create_app`).
- A keyless server (loopback only) answers only to loopback `Host` names, so a web page cannot
  reach it by DNS rebinding (`BrowserGuardMiddleware`).
- A browser may change state only from the server's own origin (or a `--cors-origin`): a
  cross-origin form POST or fetch from a page the user visits is refused with 403; and a
  browser's calls to the API must carry the web app's per-launch token (`X-Muse-Token`, in a
  `<meta>` of the page the server renders), which no other page can read.
- Every response says `nosniff`; the web app gets a strict Content-Security-Policy and may not
  be framed (`SecurityHeadersMiddleware`).
- Bodies must arrive within `Limits.body_timeout_s` (else 408), and the bodies being received
  at once hold at most `Limits.max_buffered_bytes` (else 429 with `Retry-After`).
- `safe_join` (defined in `muse.fileio`, which the library's upload code uses too) keeps paths
  built from user input (upload names) inside a base directory.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from muse.fileio import safe_join
from muse.errors import MuseError
from muse.server.errors import error_body

API_KEY_ENV = "MUSE_API_KEY"
# The web app's files and the API description are readable without a key (they hold no data).
PUBLIC_PATHS = frozenset({"/", "/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
PUBLIC_PREFIXES = ("/static/",)


@dataclass(frozen=True)
class Limits:
    """Request size limits; over them the answer is 413."""

    max_body_bytes: int = 16 * 1024 * 1024  # uploads of documents included
    max_prompt_chars: int = 500_000  # all message contents / prompts of one request together
    # A body must arrive whole within this many seconds (slow senders would hold memory and a socket).
    body_timeout_s: float = 60.0
    # Bodies being received at once hold at most this much memory; a request beyond it gets 429.
    max_buffered_bytes: int = 64 * 1024 * 1024
    max_queued: int = 64  # requests waiting per model (generation) or for an app worker; more get 429
    max_connections: int = 256  # open connections and requests at once (uvicorn answers 503 beyond)

    def __post_init__(self):
        for name in ("max_body_bytes", "max_prompt_chars", "max_buffered_bytes", "max_queued", "max_connections"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
        if not isinstance(self.body_timeout_s, (int, float)) or not 0 < self.body_timeout_s <= 3600:
            raise ValueError(f"body_timeout_s must be in (0, 3600] seconds, got {self.body_timeout_s!r}")
        if self.max_buffered_bytes < self.max_body_bytes:
            raise ValueError(f"max_buffered_bytes ({self.max_buffered_bytes}) must be ≥ max_body_bytes "
                             f"({self.max_body_bytes}): one largest body must fit")


def api_key_from(value: str | None) -> str | None:
    """The key given on the command line, else $MUSE_API_KEY, else None (empty counts as none)."""
    key = value if value is not None else os.environ.get(API_KEY_ENV)
    return key or None


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost, *.localhost)."""
    host = host.strip().lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):  # browsers resolve *.localhost to loopback themselves
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname or interface we cannot vouch for


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to serve beyond this machine without an API key."""
    if not is_loopback(host) and not api_key:
        raise MuseError(
            f"Refusing to listen on {host} without an API key: anyone who can reach this machine could use it. "
            f"Pass --api-key KEY (or set {API_KEY_ENV}), or listen on 127.0.0.1 only."
        )


def muse_home_path(*parts: str) -> Path:
    """A path under MUSE_HOME built from user input (see `safe_join`)."""
    from muse.paths import muse_home

    return safe_join(muse_home(), *parts)


# -- ASGI middleware --------------------------------------------------------------------

async def _send_error(send, status: int, message: str, code: str, headers: list | None = None) -> None:
    body = json.dumps(error_body(status, message, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                + (headers or [])})
    await send({"type": "http.response.body", "body": body})


class APIKeyMiddleware:
    """401 unless `Authorization: Bearer <key>` matches (compared in constant time)."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or _is_public(scope["path"]):
            return await self.app(scope, receive, send)
        auth = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        message = ("Missing API key: send the header 'Authorization: Bearer YOUR_KEY'." if not auth
                   else "Invalid API key: check the key the server was started with (--api-key / MUSE_API_KEY).")
        await _send_error(send, 401, message, "invalid_api_key", [(b"www-authenticate", b"Bearer")])


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class BodyLimitMiddleware:
    """413 for a request body over `limit` bytes, whether or not it declares its length; 408 for
    one that has not arrived within `timeout` seconds; 429 while the bodies being received at
    once would hold more than `budget` bytes (so many slow uploads cannot exhaust memory)."""

    def __init__(self, app, limit: int, timeout: float = 60.0, budget: int | None = None):
        self.app, self.limit, self.timeout = app, limit, timeout
        self.budget = budget if budget is not None else 4 * limit
        self.buffered = 0  # bytes held by bodies of requests in progress (one event loop: no lock)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(send, int(declared))
        held = 0
        try:
            body = await self._read(receive, send)
            if body is None:
                return  # answered (408/413/429) or the client went away
            held = len(body)
            self.buffered += held
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # afterwards: http.disconnect, which streaming responses watch

            await self.app(scope, replay, send)
        finally:
            self.buffered -= held

    async def _read(self, receive, send) -> bytes | None:
        """The whole body (up to the limit, within the timeout and the budget), or None once answered."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        chunks, size, counted = [], 0, 0
        try:
            while True:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    await self._timed_out(send)
                    return None
                if message["type"] != "http.request":
                    return None  # the client went away before sending its body
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.limit:
                    await self._too_large(send, size)
                    return None
                if self.buffered + len(chunk) > self.budget:
                    await self._busy(send)
                    return None
                self.buffered += len(chunk)  # held while it arrives; the caller holds it while the app runs
                counted += len(chunk)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
        finally:
            self.buffered -= counted

    async def _busy(self, send) -> None:
        await _send_error(send, 429, "The server is receiving too many large requests at once; retry in a few seconds.",
                          "too_many_requests", [(b"retry-after", b"5"), (b"connection", b"close")])

    async def _too_large(self, send, size: int) -> None:
        await _send_error(send, 413, f"The request body is {size} bytes or more; the limit is {self.limit} bytes "
                                     "(muse serve --max-body-mb). Send less text per request.", "request_too_large")

    async def _timed_out(self, send) -> None:
        await _send_error(send, 408, f"The request body did not arrive within {self.timeout:g} s "
                                     "(muse serve --body-timeout). Send it at once, or send less.", "request_timeout",
                          [(b"connection", b"close")])


# -- who may call from a browser -----------------------------------------------------------

TOKEN_HEADER = "x-muse-token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def new_launch_token() -> str:
    """The web app's per-launch token: 256 random bits, new each time the server starts."""
    return secrets.token_urlsafe(32)


def host_name(host_header: str) -> str:
    """The name in a Host header, without its port: "127.0.0.1:8000" → "127.0.0.1", "[::1]:80" → "::1"."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    name, _, port = host.rpartition(":")
    return name if name and port.isdigit() else host


class BrowserGuardMiddleware:
    """Keeps web pages the user visits from driving the server (DNS rebinding, CSRF).

    - `check_host` (a keyless server, hence loopback only): the Host header must name this
      machine (loopback addresses, localhost, or `allowed_hosts`); else 403. A page that makes
      its own domain resolve to 127.0.0.1 (DNS rebinding) still sends its own name.
    - A request that changes state (POST, PUT, PATCH, DELETE) from a browser must come from the
      server's own origin or one of `origins` (--cors-origin): a browser names the page that
      made it in `Origin`, or at least says `Sec-Fetch-Site: cross-site`. Else 403.
    - A browser's call to the API (not the web app's files) from the server's own origin must
      carry `X-Muse-Token: <token>`, which only the web app's page holds; else 403. Clients that
      are not browsers (curl, SDKs: no `Origin` and no `Sec-Fetch-*` headers) need no token, and
      an API key, where one is set, is checked on every request anyway (`APIKeyMiddleware`).
    """

    def __init__(self, app, token: str, origins=(), check_host: bool = True, allowed_hosts=()):
        self.app, self.token = app, token.encode()
        self.origins = frozenset(o.rstrip("/").lower() for o in origins)
        self.check_host = check_host
        self.allowed_hosts = frozenset(h.lower() for h in allowed_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        problem = self._problem(scope, headers)
        if problem:
            return await _send_error(send, 403, problem, "forbidden")
        return await self.app(scope, receive, send)

    def _problem(self, scope, headers: dict) -> str | None:
        host = headers.get(b"host", b"").decode("latin-1")
        if self.check_host and not (is_loopback(host_name(host)) or host_name(host) in self.allowed_hosts):
            return (f"This server answers only to localhost names, not to Host {host!r} (a web page may be trying "
                    "to reach it through DNS rebinding). Open it as http://127.0.0.1:PORT, or start "
                    "`muse serve --allow-host NAME` to allow a name of your own.")
        origin = headers.get(b"origin", b"").decode("latin-1").rstrip("/").lower()
        site = headers.get(b"sec-fetch-site", b"").decode("latin-1").lower()
        own = f"{scope.get('scheme', 'http')}://{host.lower()}"
        allowed = origin in self.origins
        if scope["method"] in UNSAFE_METHODS and not allowed:
            if (origin and origin != own) or (not origin and site in ("cross-site", "same-site")):
                return (f"Cross-origin request refused: a web page at {origin or 'another site'} tried to change "
                        "data on this Muse server. Use Muse's own web app, a non-browser client, or start "
                        "`muse serve --cors-origin ORIGIN` to let that page in.")
        is_browser = bool(origin or site or headers.get(b"sec-fetch-mode"))
        if is_browser and not allowed and not _is_public(scope["path"]):
            given = headers.get(TOKEN_HEADER.encode(), b"")
            if not hmac.compare_digest(given, self.token):
                return ("This request came from a browser without the web app's token. Open Muse's web app at / "
                        "(it sends the token with each request), or call the API from a program.")
        return None


# -- security headers ------------------------------------------------------------------------

# The web app loads only its own files; nothing may frame it (clickjacking).
WEB_APP_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
               "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
               "frame-ancestors 'none'")
_DOCS_PATHS = ("/docs", "/redoc")  # FastAPI's API pages load their viewer from a CDN when online


class SecurityHeadersMiddleware:
    """nosniff on every response; CSP, no framing and no referrer on the web app and the API."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        csp = "frame-ancestors 'none'" if scope["path"].startswith(_DOCS_PATHS) else WEB_APP_CSP
        extra = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                 (b"referrer-policy", b"no-referrer"), (b"cross-origin-opener-policy", b"same-origin"),
                 (b"content-security-policy", csp.encode())]

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message = dict(message, headers=list(message.get("headers", []))
                               + [(k, v) for k, v in extra if k not in names])
            await send(message)

        await self.app(scope, receive, send_with_headers)


# -- connections that never send a request ---------------------------------------------------------

HEAD_TIMEOUT_S = 10.0  # a request's line and headers must arrive within this after a connection is idle


def guarded_h11_protocol():
    """uvicorn's h11 protocol, plus: a connection whose request head has not arrived within
    HEAD_TIMEOUT_S of opening (or of its last response) is closed.

    Why: uvicorn times out idle keep-alive connections only after a first response, and any byte
    resets that timer, so sockets that send nothing, or a header a byte at a time, were held
    for ever (a few hundred of them exhaust the server's file descriptors).
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_head_timer()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm_head_timer()

        def _arm_head_timer(self):
            self.loop.call_later(HEAD_TIMEOUT_S, self._head_timeout, self.conn.their_state, self.cycle)

        def _head_timeout(self, state, cycle):
            # still waiting for the same request head: no new request cycle began since armed
            if not self.transport.is_closing() and self.cycle is cycle and self.conn.their_state is h11.IDLE:
                self.transport.close()

    return GuardedH11Protocol
