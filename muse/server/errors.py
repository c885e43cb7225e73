"""Every error leaves the server in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

The status says whose fault it is — 400 a bad parameter (named in `param`), a prompt longer
than the context window or malformed JSON; 401 a missing or wrong API key; 404 an unknown
model or path; 413 a body or prompt over the limits; 429 too many waiting requests; 500 a
bug — and the message says how to fix it. Clients such as the `openai` package turn these
into their own exceptions (`BadRequestError`, `NotFoundError`, ...).
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from muse.errors import ContextLengthError, ModelNotFoundError, MuseError

log = logging.getLogger("muse.server")

# Muse's parameter names → the API's, so a message names what the client actually sent.
API_NAMES = {"max_new_tokens": "max_tokens"}

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error"}


class APIError(Exception):
    """An error to answer with: status, message, and optionally the parameter and a code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers  # e.g. Retry-After on a 429


RETRY_AFTER_S = 2  # what a 429 for a full queue tells the client to wait


def too_busy(message: str) -> APIError:
    """429 with Retry-After: the server is full right now, the request itself is fine."""
    return APIError(429, message, None, "too_many_requests", {"Retry-After": str(RETRY_AFTER_S)})


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def from_exception(e: Exception) -> APIError:
    """Map a Muse-side exception to the API error a client should see."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ContextLengthError):
        return APIError(400, str(e), "messages", "context_length_exceeded")
    if isinstance(e, ModelNotFoundError):
        return APIError(404, str(e), "model", "model_not_found")
    from muse.scheduler import SchedulerBusy, SchedulerClosed

    if isinstance(e, SchedulerBusy):
        return too_busy(str(e))
    if isinstance(e, SchedulerClosed):
        return APIError(503, str(e), None, "shutting_down")
    if isinstance(e, (MuseError, ValueError)):
        return _bad_parameter(str(e))
    log.exception("internal error", exc_info=e)
    return APIError(500, f"Internal error ({type(e).__name__}); see the server log.", None, "internal_error")


def _bad_parameter(message: str) -> APIError:
    """A ValueError such as "top_p must be in (0, 1], got 0" → 400 with param="top_p"."""
    m = re.match(r"(\w+) must", message)
    param = API_NAMES.get(m.group(1), m.group(1)) if m else None
    if m and param != m.group(1):
        message = param + message[len(m.group(1)):]
    return APIError(400, message, param, "invalid_parameter" if param else None)


def _validation_error(exc: RequestValidationError) -> APIError:
    """pydantic's complaint → 400 naming the parameter by its path (e.g. messages.0.role).

    For a value that matches no member of a union, each member complains; the one that got
    deepest into the value says the most ("stop.0: at least 1 character", not "not a string").
    """
    first = max(exc.errors(), key=lambda e: len(e.get("loc", ())), default={})
    if first.get("type") == "json_invalid":
        return APIError(400, f"The request body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}. "
                             "Send a JSON object with Content-Type: application/json.", None, "invalid_json")
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    # union members show up in the path as their type names (e.g. "str", "list[str]"): drop them
    loc = [x for x in loc if not re.match(r"^(str|int|list|function|constrained|json-or-python)\b", x)]
    param = ".".join(loc) or None
    where = f"{param}: " if param else "request body: "
    return APIError(400, where + str(first.get("msg", "invalid value")), param, "invalid_parameter")


def install(app: FastAPI) -> None:
    """Answer every error in OpenAI's shape (FastAPI's own 422 becomes a 400)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        err = _validation_error(e)
        return error_response(err.status, err.message, err.param, err.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        message = {404: f"No such endpoint: {request.method} {request.url.path}. See /docs for the API.",
                   405: f"{request.method} is not allowed on {request.url.path}."}.get(e.status_code, str(e.detail))
        return error_response(e.status_code, message, None, None, headers=getattr(e, "headers", None))

    @app.exception_handler(MuseError)
    @app.exception_handler(ValueError)
    async def _user_error(request: Request, e: Exception):
        err = from_exception(e)
        return error_response(err.status, err.message, err.param, err.code, err.headers)

    @app.exception_handler(Exception)  # a bug: logged with its traceback, answered as a 500
    async def _other(request: Request, e: Exception):
        err = from_exception(e)
        return error_response(err.status, err.message, err.param, err.code)
