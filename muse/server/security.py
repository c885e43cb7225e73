"""The service's safety: who may call it, how much they may send, where files may go.

- Binding to anything but loopback requires an API key (`check_bind`); with a key, every
  request outside `PUBLIC_PATHS` needs `Authorization: Bearer KEY`, else 401.
- Bodies over `Limits.max_body_bytes` get 413 before the application sees them (the body is
  read in full, up to the limit, and replayed); prompts over `Limits.max_prompt_chars` get
  413 in the handlers.
- CORS stays off unless origins are configured (see `create_app`).
- `safe_join` keeps paths built from user input (upload names) inside a base directory.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path

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

    def __post_init__(self):
        for name in ("max_body_bytes", "max_prompt_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")


class UnsafePathError(MuseError):
    """A user-supplied path that would leave the directory it must stay in."""


def api_key_from(value: str | None) -> str | None:
    """The key given on the command line, else $MUSE_API_KEY, else None (empty counts as none)."""
    key = value if value is not None else os.environ.get(API_KEY_ENV)
    return key or None


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
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


def safe_join(base: "str | Path", *parts: str) -> Path:
    """base / parts, guaranteed to stay inside `base` (for names that come from users).

    Rejects absolute parts, `..` that climbs out, NUL bytes, and symlinks that point outside;
    raises `UnsafePathError`. The directories need not exist yet.
    """
    root = Path(base).resolve()
    for part in parts:
        if not isinstance(part, str) or not part or "\x00" in part:
            raise UnsafePathError(f"invalid path component {part!r}: use a plain, non-empty file name")
        if Path(part).is_absolute() or part.startswith(("/", "\\")) or (part[1:2] == ":" and part[0].isalpha()):
            raise UnsafePathError(f"absolute paths are not allowed here: {part!r}; give a name relative to {root}")
    target = root.joinpath(*parts).resolve()  # resolves `..` and symlinks
    if target != root and root not in target.parents:
        raise UnsafePathError(f"{'/'.join(parts)!r} points outside {root}; use a name without '..' or links out")
    return target


def muse_home_path(*parts: str) -> Path:
    """A path under MUSE_HOME built from user input (see `safe_join`)."""
    from muse.checkpoints.registry import muse_home

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
    """413 for a request body over `limit` bytes, whether or not it declares its length."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(send, int(declared))
        chunks, size = [], 0
        while True:  # read the whole body (up to the limit), then replay it
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._too_large(send, size)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: http.disconnect, which streaming responses watch

        await self.app(scope, replay, send)

    async def _too_large(self, send, size: int) -> None:
        await _send_error(send, 413, f"The request body is {size} bytes or more; the limit is {self.limit} bytes "
                                     "(muse serve --max-body-mb). Send less text per request.", "request_too_large")
