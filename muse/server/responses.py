"""POST /v1/responses: OpenAI's Responses API over the same scheduler as chat completions.

Input: a string, or a list of items — messages ({role, content}: text or input_text/output_text
parts), `function_call` items (the model's earlier calls) and `function_call_output` items (their
results); `instructions` become a system message. Output: a `message` item with `output_text`,
and/or `function_call` items (`muse.tools`: the same Hermes format, grammar and parser as
chat). `text.format` takes text, json_object and json_schema. Streaming sends OpenAI's typed
events (response.created … output_text.delta … function_call_arguments.delta … response.completed)
that the official client's `responses.stream` helper accumulates.

Nothing is stored, so `previous_response_id` and `conversation` are a 400, as are built-in tools
(web search, files, computer use) and non-text input parts.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from muse import tools as tool_calls
from muse.sampling import Constraint
from muse.server.errors import APIError
from muse.server.openai import (
    _ERRORS, Job, Output, _cancel, _chat_ids, _collect_all, _parse, _reply_constraint, _submit, _unless_client_leaves,
)
from muse.server.schemas import ResponsesRequest
from muse.server.streaming import EventStreamResponse, check_chars, sse, stream_error

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], responses=_ERRORS)

_UNSUPPORTED = {
    "previous_response_id": "previous_response_id is not supported: this server stores no responses; send the "
                            "whole conversation as input.",
    "conversation": "conversation is not supported: this server stores no conversations; send them as input.",
    "prompt": "prompt (stored prompt templates) is not supported; send instructions and input.",
    "top_logprobs": "top_logprobs is not supported on /v1/responses; use /v1/chat/completions with logprobs.",
}


@router.post("/responses", summary="Respond to input (OpenAI's Responses API; nothing is stored)",
             responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream=true"}})
async def create_response(body: ResponsesRequest, request: Request):
    service = request.app.state.service
    name = service.resolve(body.model)
    model = service.models[name]
    _reject_unsupported(body)
    messages = _messages(body)
    check_chars(service.limits, sum(len(m.get("content") or "") for m in messages), "input", "prompt")
    tools = _parse(tool_calls.parse_tools, [_chat_tool(t, i) for i, t in enumerate(body.tools or [])], param="tools")
    choice = _chat_tool_choice(body.tool_choice)
    choice_name = _parse(tool_calls.choice_name, choice, tools, param="tool_choice")
    fmt = (body.text or {}).get("format") or {"type": "text"}
    if not isinstance(fmt, dict):
        raise APIError(400, "text.format must be an object: {type: text | json_object | json_schema}.", "text")
    if tools and choice_name != "none" and fmt.get("type") != "text":
        raise APIError(400, "text.format cannot be combined with tools (unless tool_choice is 'none').", "text")
    ids = await run_in_threadpool(_chat_ids, model, messages, tools)
    constraint = await _reply_constraint(model, tools, choice, choice_name, body.parallel_tool_calls,
                                         lambda: _format_constraint(fmt), "text")
    given = {"max_new_tokens": body.max_output_tokens, "temperature": body.temperature, "top_p": body.top_p,
             "seed": body.seed, "loop_guard": body.loop_guard}
    params = model.params(constraint=constraint, **{k: v for k, v in given.items() if v is not None})
    jobs = [Job(0, ids, params)]
    out = Output(chat=True, parse_tools=bool(tools) and choice_name != "none")
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    streams = await run_in_threadpool(_submit, service.scheduler(name), jobs, "input",
                                      body.max_output_tokens is not None, loop)
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        streams = [metrics.watch(name, streams[0], started)]
    shell = _shell(body, name, tools, choice)
    if body.stream:
        return EventStreamResponse(_events(shell, streams[0], out), on_close=lambda: _cancel(streams))
    results = await _unless_client_leaves(request, _collect_all(streams, out), streams)
    if results is None:
        return Response(status_code=499)
    [r] = results
    build = Builder(shell)
    build.feed(_parse_events(r.text, out))
    return JSONResponse(build.finish(r.last))


def _reject_unsupported(body: ResponsesRequest) -> None:
    for field, why in _UNSUPPORTED.items():
        if getattr(body, field) is not None:
            raise APIError(400, why, field, "unsupported_parameter")
    if body.background:
        raise APIError(400, "background responses are not supported; leave background out.", "background",
                       "unsupported_parameter")
    if body.include:
        raise APIError(400, f"include is not supported (asked for {body.include}); leave it out.", "include",
                       "unsupported_parameter")
    if body.truncation == "auto":
        raise APIError(400, 'truncation "auto" is not supported: an input longer than the context window is a '
                            "400; shorten it.", "truncation", "unsupported_parameter")


def _messages(body: ResponsesRequest) -> list[dict]:
    """instructions + input → chat messages (function calls and their outputs included)."""
    out: list[dict] = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if isinstance(body.input, str):
        return [*out, {"role": "user", "content": body.input}]
    for i, item in enumerate(body.input):
        kind = item.get("type", "message")
        where = f"input.{i}"
        if kind == "message" and item.get("role") in ("user", "system", "developer", "assistant"):
            role = "system" if item["role"] == "developer" else item["role"]
            out.append({"role": role, "content": _item_text(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": str(item.get("call_id") or item.get("id") or tool_calls.new_call_id()), "type": "function",
                    "function": {"name": _string(item, "name", where), "arguments": _string(item, "arguments", where)}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": str(item.get("call_id", "")),
                        "content": _item_text(item.get("output"), where)})
        else:
            raise APIError(400, f"{where}: items of type {kind!r} (role {item.get('role')!r}) are not supported; send "
                                "messages, function_call and function_call_output items.", where)
    if not out:
        raise APIError(400, "input holds no messages.", "input")
    return out


def _item_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in ("input_text", "output_text", "text")
                                         and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    raise APIError(400, f"{where}: only text content is supported (a string, or input_text parts).", where)


def _string(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise APIError(400, f"{where}.{key}: a string is required.", f"{where}.{key}")
    return value


def _chat_tool(tool: dict, i: int) -> dict:
    """A Responses tool ({type, name, description, parameters, strict}) → the chat shape."""
    if tool.get("type") != "function":
        raise APIError(400, f"tools.{i}: only function tools are supported, not {tool.get('type')!r} (this server "
                            "has no built-in tools).", "tools", "unsupported_parameter")
    fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
    return {"type": "function", "function": fn}


def _chat_tool_choice(choice):
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise APIError(400, "tool_choice must be none, auto, required or {type: function, name}.", "tool_choice")
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _format_constraint(fmt: dict) -> Constraint | None:
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint.json_object()
    if kind == "json_schema" and isinstance(fmt.get("schema"), dict):
        return Constraint.json_schema(tool_calls.strict_schema(fmt["schema"]) if fmt.get("strict") else fmt["schema"])
    raise APIError(400, "text.format must be {type: text}, {type: json_object} or {type: json_schema, name, schema}.",
                   "text")


def _shell(body: ResponsesRequest, model_id: str, tools: list, choice) -> dict:
    """The response object before any output: what every event's `response` carries."""
    return {"id": "resp_" + secrets.token_hex(24), "object": "response", "created_at": int(time.time()),
            "status": "in_progress", "model": model_id, "output": [], "error": None, "incomplete_details": None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "parallel_tool_calls": body.parallel_tool_calls is not False, "temperature": body.temperature,
            "top_p": body.top_p, "tool_choice": body.tool_choice or "auto",
            "tools": [{"type": "function", "name": t.name, "description": t.description or None,
                       "parameters": t.parameters, "strict": t.strict} for t in tools],
            "text": body.text or {"format": {"type": "text"}}, "store": False, "metadata": {}, "usage": None}


def _parse_events(text: str, out: Output) -> list[tuple]:
    if not out.parse_tools:
        return [("content", text)] if text else []
    p = tool_calls.ToolCallParser()
    return p.feed(text) + p.finish()


class Builder:
    """`ToolCallParser` events → the response's output items, and the stream events that build them."""

    def __init__(self, shell: dict):
        self.response = shell
        self.events: list[dict] = []
        self.open: dict | None = None  # the output item being written
        self.calls: dict[int, dict] = {}  # parser call index → its function_call item

    def emit(self, kind: str, **fields) -> None:
        self.events.append({"type": kind, **fields})

    def feed(self, events: list[tuple]) -> None:
        for e in events:
            if e[0] == "content":
                item = self.open if self.open and self.open["type"] == "message" else self._message()
                item["content"][0]["text"] += e[1]
                self.emit("response.output_text.delta", item_id=item["id"], output_index=self._index(item),
                          content_index=0, delta=e[1], logprobs=[])
            elif e[0] == "call":
                self._close()
                call = e[2]
                item = {"type": "function_call", "id": "fc_" + secrets.token_hex(12), "call_id": call.id,
                        "name": call.name, "arguments": "", "status": "in_progress"}
                self.calls[e[1]] = item
                self._add(item)
            else:
                item = self.calls[e[1]]
                item["arguments"] += e[2]
                self.emit("response.function_call_arguments.delta", item_id=item["id"],
                          output_index=self._index(item), delta=e[2])

    def finish(self, last) -> dict:
        """Close the open item; the finished response (status, usage)."""
        self._close(complete=last.finish_reason != "length")
        r = self.response
        if last.finish_reason == "length":
            r["status"], r["incomplete_details"] = "incomplete", {"reason": "max_output_tokens"}
        else:
            r["status"] = "completed"
        r["usage"] = {"input_tokens": last.prompt_tokens, "input_tokens_details": {"cached_tokens": last.cached_tokens},
                      "output_tokens": last.generation_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": last.prompt_tokens + last.generation_tokens}
        return r

    def _index(self, item: dict) -> int:
        return next(i for i, x in enumerate(self.response["output"]) if x is item)

    def _message(self) -> dict:
        self._close()
        item = {"type": "message", "id": "msg_" + secrets.token_hex(12), "status": "in_progress",
                "role": "assistant", "content": []}
        self._add(item)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        item["content"].append(part)
        self.emit("response.content_part.added", item_id=item["id"], output_index=self._index(item),
                  content_index=0, part=dict(part))
        return item

    def _add(self, item: dict) -> None:
        self.response["output"].append(item)
        self.open = item
        self.emit("response.output_item.added", output_index=self._index(item), item=json.loads(json.dumps(item)))

    def _close(self, complete: bool = True) -> None:
        item, self.open = self.open, None
        if item is None:
            return
        index = self._index(item)
        item["status"] = "completed" if complete else "incomplete"
        if item["type"] == "message":
            part = item["content"][0]
            self.emit("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                      text=part["text"], logprobs=[])
            self.emit("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                      part=dict(part))
        else:
            self.emit("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                      name=item["name"], arguments=item["arguments"])
        self.emit("response.output_item.done", output_index=index, item=json.loads(json.dumps(item)))


async def _events(shell: dict, stream, out: Output):
    build = Builder(shell)
    seq = 0

    def send(event: dict) -> str:
        nonlocal seq
        seq += 1
        return sse({**event, "sequence_number": seq - 1}, event=event["type"])

    try:
        yield send({"type": "response.created", "response": json.loads(json.dumps(shell))})
        yield send({"type": "response.in_progress", "response": json.loads(json.dumps(shell))})
        parser = tool_calls.ToolCallParser() if out.parse_tools else None
        async for c in stream:
            if parser is not None:
                build.feed(parser.feed(c.text) + (parser.finish() if c.finish_reason else []))
            elif c.text:
                build.feed([("content", c.text)])
            if c.finish_reason:
                final = build.finish(c)
                kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
                build.emit(kind, response=final)
            for event in build.events:
                yield send(event)
            build.events.clear()
    except Exception as e:  # mid-stream: the error goes in the stream
        yield send({"type": "error", **stream_error(e)["error"]})
