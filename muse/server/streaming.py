"""What every route that generates shares: request size checks, token usage, server-sent events
and noticing a client that went away.

    check_chars(limits, len(text), "text")      # 413 over `muse serve --max-prompt-chars`
    usage(last_chunk)                           # {"prompt_tokens", "completion_tokens", "total_tokens"}
    EventStreamResponse(frames, on_close=stop)  # frames: sse({...}) strings; on_close runs however it ends

The OpenAI routes (`openai.py`, `responses.py`) and the app routes (`apps.py`) frame their own
events (OpenAI's chunks, the Responses API's typed events, the apps' {"type": ...} objects), but
all of them through `sse`, and a failure after the stream began goes out as `stream_error`.
"""

from __future__ import annotations

import json

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

from muse.generation import GenerationChunk
from muse.server.errors import APIError, error_body, from_exception

DONE = "data: [DONE]\n\n"  # the OpenAI routes' last frame


def sse(obj, event: str | None = None) -> str:
    """One server-sent event: `obj` as JSON on a `data:` line (after an `event:` line when named)."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def stream_error(e: BaseException) -> dict:
    """{"error": {message, type, param, code}} for an exception raised after the status was sent."""
    err = from_exception(e)
    return error_body(err.status, err.message, err.param, err.code)


def check_chars(limits, chars: int, param: str, what: str | None = None, unit: str = "characters") -> None:
    """413 naming `param` when a request's text is over the server's `limits.max_prompt_chars`
    (the message calls it `what`, by default `param`)."""
    if chars > limits.max_prompt_chars:
        raise APIError(413, f"The {what or param} is {chars} {unit}; this server accepts at most "
                            f"{limits.max_prompt_chars} (muse serve --max-prompt-chars).", param, "prompt_too_large")


def usage(last: GenerationChunk | None, cached: bool = False) -> dict:
    """OpenAI's usage of one generation, read from its last chunk (zeros when there was none);
    `cached` adds prompt_tokens_details.cached_tokens (the prompt tokens the prefix cache reused)."""
    return usage_of(last.prompt_tokens if last else 0, last.generation_tokens if last else 0,
                    (last.cached_tokens if last else 0) if cached else None)


def usage_of(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    """OpenAI's usage object from token counts (prompt_tokens_details only when `cached_tokens` is given)."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


async def client_gone(request: Request) -> None:
    """Returns once the client has disconnected. Only for a request whose body has been read: then
    the next message the server delivers is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class EventStreamResponse(StreamingResponse):
    """Server-sent events that notice a client leaving even between tokens.

    Starlette (ASGI ≥ 2.4) only notices a disconnect when a send fails; this also listens for
    `http.disconnect`, so a client that goes away while its tokens are still being computed
    frees its batch rows at the scheduler's next step (`on_close` runs either way).
    """

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            async with anyio.create_task_group() as tg:
                async def stream_then_stop():
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away mid-send
                        pass
                    tg.cancel_scope.cancel()

                async def listen_then_stop():
                    await self.listen_for_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream_then_stop)
                tg.start_soon(listen_then_stop)
        finally:
            self.on_close()
