"""Tool (function) calling: tools into the prompt, a grammar that keeps calls valid, calls out of the text.

Torch-free, shared by the server's OpenAI routes and any Python caller:

    tools = parse_tools([{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}])
    prompt = render_prompt(model.tokenizer, messages, tools)          # the chat template, tools included
    constraint = tool_constraint(tools, "auto", model.tokenizer)       # a Lark grammar (llguidance)
    text = model.generate(prompt, constraint=constraint, temperature=0)
    content, calls = parse_output(text)                                 # calls: [ToolCall(name, arguments)]

The call format is Hermes' (Qwen2.5, SmolLM3, Hermes, many fine-tunes), one block per call:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template that renders tools itself in this format (Qwen2.5's) gets them through
`apply_chat_template(tools=...)`; for one that does not (SmolLM2's), the tool descriptions and the
format go into the system message (`SYSTEM_PROMPT`), and assistant calls and tool results into
plain text the template can render. Where `<tool_call>` is one token of the vocabulary the grammar
asks for that token, as the model was trained to write it.

The grammar makes every call's `arguments` valid under the tool's parameter schema: with
tool_choice "auto" the model writes text (never containing `<tool_call>`) or text then calls;
"required" or a named function allows calls only (one, or several with `parallel_tool_calls`);
"none" leaves the output free and tools out of the prompt's grammar.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field

from muse.sampling import JSON_OPTIONS, Constraint

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
TOOL_CHOICES = ("none", "auto", "required")

SYSTEM_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, what it does, and a JSON schema of its arguments."""

    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool = False  # OpenAI's strict: objects without additionalProperties allow none

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            raise ValueError(f"tools must name each function with 1-64 letters, digits, _ or -, got {self.name!r}")
        if not isinstance(self.parameters, dict):
            raise ValueError(f"tools: the parameters of {self.name} must be a JSON schema object")

    @property
    def schema(self) -> dict:
        """The arguments' schema as the grammar enforces it (strict: no undeclared properties)."""
        return strict_schema(self.parameters) if self.strict else self.parameters

    def openai(self) -> dict:
        fn = {"name": self.name, "parameters": self.parameters}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


@dataclass
class ToolCall:
    """A call the model wrote: the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: new_call_id())
    complete: bool = True  # False: generation stopped inside the call (its arguments are cut short)

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def parse_tools(tools: "list[dict] | None") -> list[Tool]:
    """OpenAI's `tools` list → `Tool`s; ValueError (naming `tools`) for anything else."""
    out: list[Tool] = []
    for i, t in enumerate(tools or []):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise ValueError(f"tools must be a list of {{'type': 'function', 'function': {{'name': ...}}}}; "
                             f"tools[{i}] is not")
        params = fn.get("parameters")
        out.append(Tool(fn.get("name"), fn.get("description") or "",
                        {"type": "object", "properties": {}} if params is None else params,
                        bool(fn.get("strict"))))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ValueError(f"tools must have distinct names; {sorted(n for n in names if names.count(n) > 1)[0]!r} "
                         "appears twice")
    return out


def strict_schema(schema):
    """`schema` with `additionalProperties: false` on every object that leaves it unset (OpenAI's
    strict mode: only the declared properties), through properties, items, anyOf and definitions."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) if k in _SUBSCHEMAS else v for k, v in schema.items()}
    for k in ("properties", "patternProperties", "$defs", "definitions"):
        if isinstance(schema.get(k), dict):
            out[k] = {name: strict_schema(s) for name, s in schema[k].items()}
    is_object = schema.get("type") == "object" or (isinstance(schema.get("type"), list) and "object" in schema["type"])
    if (is_object or "properties" in schema) and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


_SUBSCHEMAS = ("items", "prefixItems", "anyOf", "oneOf", "allOf", "not", "if", "then", "else",
               "additionalProperties", "contains")


# -- the prompt -------------------------------------------------------------------------------

def template_renders_tools(tokenizer) -> bool:
    """Whether the chat template writes tools into the prompt in the `<tool_call>` format itself."""
    probe = Tool("muse_probe_tool", "probe")
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tools=[probe.openai()])
    except Exception:  # a template that chokes on tools cannot render them
        return False
    return probe.name in text and OPEN in text


def render_prompt(tokenizer, messages: list[dict], tools: "list[Tool] | None" = None,
                  native: bool | None = None) -> str:
    """The prompt for `messages` (OpenAI-style, assistant `tool_calls` and `tool` results included)
    with `tools` offered: through the template when it renders tools (`native`, probed when None),
    else in the system message."""
    if native is None:
        native = template_renders_tools(tokenizer)
    if native:
        msgs = [_native_message(m) for m in messages]
        return tokenizer.apply_chat_template(msgs, tools=[t.openai() for t in tools] if tools else None)
    return tokenizer.apply_chat_template(plain_messages(messages, tools))


def _native_message(m: dict) -> dict:
    """Templates write `arguments` with tojson: give them the object, not OpenAI's JSON string."""
    if not m.get("tool_calls"):
        return m
    calls = []
    for c in m["tool_calls"]:
        fn = dict(c.get("function") or {})
        if isinstance(fn.get("arguments"), str):
            try:
                fn["arguments"] = json.loads(fn["arguments"])
            except json.JSONDecodeError:
                pass
        calls.append({**c, "function": fn})
    return {**m, "tool_calls": calls}


def plain_messages(messages: list[dict], tools: "list[Tool] | None" = None) -> list[dict]:
    """Messages any template renders (string content, roles system/user/assistant): the tools in
    the system message, assistant calls as `<tool_call>` blocks, tool results as a user turn of
    `<tool_response>` blocks (consecutive results in one turn)."""
    out: list[dict] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            blocks = [format_call(c["function"]["name"], c["function"].get("arguments") or "{}")
                      for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(([content] if content else []) + blocks)})
        elif role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": True})
        else:
            out.append({"role": role, "content": content})
    for m in out:
        m.pop("_tool", None)
    if tools:
        described = SYSTEM_PROMPT.format(tools="\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + described}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


def format_call(name: str, arguments: "str | dict") -> str:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f'{OPEN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {args}}}\n{CLOSE}'


# -- the grammar ------------------------------------------------------------------------------

def tool_constraint(tools: list[Tool], choice: "str | dict" = "auto", tokenizer=None,
                    parallel: bool = True) -> Constraint | None:
    """The Lark grammar (llguidance) for `choice`: "auto" (text, or text then calls), "required"
    (calls only), {"type": "function", "function": {"name": N}} (calls of N only), "none" (None:
    no constraint). Each call's arguments must match its tool's schema; `parallel` allows several
    calls, else exactly one (or none, with "auto")."""
    name = choice_name(choice, tools)
    if name == "none" or not tools:
        return None
    chosen = [t for t in tools if t.name == name] if name not in TOOL_CHOICES else tools
    open_, close = _marker(OPEN, tokenizer), _marker(CLOSE, tokenizer)
    rules = [f"body: {' | '.join(f'body_{i}' for i in range(len(chosen)))}"]
    for i, t in enumerate(chosen):
        head = '\n{"name": ' + json.dumps(t.name) + ', "arguments": '
        rules.append(f"body_{i}: {_lark_string(head)} args_{i} " + r'"}\n" ' + close)
        rules.append(f"args_{i}: %json " + json.dumps({**_schema_for_grammar(t.schema), "x-guidance": JSON_OPTIONS}))
    # calls one after another, a newline apart; a newline may end the output (a model that writes one
    # before its end token must not be pushed into a call it did not mean)
    more = (f' ("\\n" {open_} body)*' if parallel else "") + ' "\\n"?'
    if name != "auto":
        start = [f"start: {open_} body{more}"]
    elif open_.startswith("<["):  # the marker is one token: text never holds its text, then the token may follow
        start = [f"start: TEXT | TEXT? {open_} body{more}", r"TEXT: /(.|\n)+/ & ~/(.|\n)*<tool_call>(.|\n)*/"]
    else:  # text never holding the marker; or text up to the first marker, then calls
        start = [f"start: TEXT | head body{more}",
                 r"TEXT: /(.|\n)*/ & ~/(.|\n)*<tool_call>(.|\n)*/",
                 r"head[lazy]: /(.|\n)*<tool_call>/"]
    return Constraint.grammar("\n".join(start + rules))


def choice_name(choice: "str | dict | None", tools: list[Tool]) -> str:
    """tool_choice → "none" | "auto" | "required" | a tool's name; ValueError naming tool_choice."""
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise ValueError(f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or "
                             f"{{'type': 'function', 'function': {{'name': ...}}}}, got {choice!r}")
        if choice == "required" and not tools:
            raise ValueError("tool_choice must not be 'required' without tools")
        return choice
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise ValueError("tool_choice must be 'none', 'auto', 'required' or "
                         "{'type': 'function', 'function': {'name': ...}}")
    if name not in {t.name for t in tools}:
        raise ValueError(f"tool_choice must name one of the tools; {name!r} is not among them")
    return name


def _schema_for_grammar(schema: dict) -> dict:
    # JSON-schema keywords that only describe (llguidance warns on some); the grammar needs none of them
    return {k: v for k, v in schema.items() if k not in ("$schema", "title", "description", "x-guidance")}


def _marker(text: str, tokenizer) -> str:
    """A Lark reference to `text`: its token id where the vocabulary has it as one token (the model
    writes that token), else the string."""
    tid = tokenizer.token_to_id(text) if tokenizer is not None else None
    return f"<[{tid}]>" if tid is not None else _lark_string(text)


def _lark_string(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


# -- the output -------------------------------------------------------------------------------

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)', re.S)


class ToolCallParser:
    """Splits generated text, as it streams, into content and tool calls.

    `feed(text)` returns events: ("content", str), ("call", index, ToolCall) once a call's name is
    known (arguments still ""), ("arguments", index, str) as its arguments arrive; `finish()` the
    rest. The joined arguments of a call equal its `ToolCall.arguments` at the end. Content is the
    text outside the calls, with the whitespace around calls dropped.
    """

    def __init__(self):
        self.calls: list[ToolCall] = []
        self.content: list[str] = []
        self._buf = ""  # text not yet turned into events
        self._state = "text"  # text | head (after <tool_call>) | args
        self._sent_args = 0  # characters of the current call's arguments already sent
        self._ws = ""  # whitespace held back in content: dropped if a call follows

    def feed(self, text: str) -> list[tuple]:
        self._buf += text
        events: list[tuple] = []
        while True:
            before = (self._state, len(self._buf))
            getattr(self, "_" + self._state)(events, final=False)
            if (self._state, len(self._buf)) == before:
                return events

    def finish(self) -> list[tuple]:
        """Events for the text held back; a call cut short stays, marked incomplete."""
        events: list[tuple] = []
        if self._state == "text" and self.calls and OPEN.startswith(self._buf.strip() or "-"):
            self._buf = ""  # the start of one more call, cut short before its name: not content
        getattr(self, "_" + self._state)(events, final=True)
        if self._state == "head" and self._buf.strip():  # a call without a readable name: it was text
            self._content(events, OPEN + self._buf)
        elif self._state == "args" and self.calls:
            call = self.calls[-1]
            call.complete = False
            rest = self._buf[self._sent_args:]
            if rest:
                call.arguments += rest
                events.append(("arguments", len(self.calls) - 1, rest))
        self._buf = ""
        return events

    @property
    def text(self) -> str | None:
        """The content, or None when the model wrote only calls."""
        c = "".join(self.content).strip()
        return c or None

    def _content(self, events: list, text: str) -> None:
        """Send text as content, holding back trailing whitespace (dropped if a call follows)."""
        self._ws += text
        body = self._ws.rstrip()
        if not body:
            return
        if not self.content:
            body = body.lstrip()  # leading whitespace is never content
        self.content.append(body)
        events.append(("content", body))
        self._ws = self._ws[len(self._ws.rstrip()):]

    def _text(self, events: list, final: bool) -> None:
        at = self._buf.find(OPEN)
        if at >= 0:
            self._content(events, self._buf[:at])
            self._ws = ""
            self._buf, self._state = self._buf[at + len(OPEN):], "head"
            return
        keep = 0 if final else _partial_suffix(self._buf, OPEN)
        self._content(events, self._buf[:len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep:]

    def _head(self, events: list, final: bool) -> None:
        m = _HEAD.match(self._buf)
        if m is None:
            return
        try:
            name = json.loads(f'"{m.group(1)}"')
        except json.JSONDecodeError:
            name = m.group(1)
        self.calls.append(ToolCall(name, ""))
        events.append(("call", len(self.calls) - 1, self.calls[-1]))
        self._buf, self._state, self._sent_args = self._buf[m.end():], "args", 0

    def _args(self, events: list, final: bool) -> None:
        call, index = self.calls[-1], len(self.calls) - 1
        at = self._buf.find(CLOSE)
        if at >= 0:
            args = self._buf[:at].rstrip()
            args = args[:-1].rstrip() if args.endswith("}") else args  # the wrapper's closing brace
            rest = args[self._sent_args:]
            if rest:
                call.arguments += rest
                events.append(("arguments", index, rest))
            self._buf, self._state = self._buf[at + len(CLOSE):], "text"
            return
        if final:
            return
        # hold back what may still turn out to be the wrapper's end: "}", whitespace, part of </tool_call>
        s = self._buf
        k = len(s) - _partial_suffix(s, CLOSE)
        while k > self._sent_args and s[k - 1].isspace():
            k -= 1
        if k > self._sent_args and s[k - 1] == "}":
            k -= 1
            while k > self._sent_args and s[k - 1].isspace():
                k -= 1
        if k > self._sent_args:
            call.arguments += s[self._sent_args:k]
            events.append(("arguments", index, s[self._sent_args:k]))
            self._sent_args = k


def _partial_suffix(s: str, marker: str) -> int:
    """Length of the longest end of `s` that is a proper beginning of `marker`."""
    for k in range(min(len(marker) - 1, len(s)), 0, -1):
        if s.endswith(marker[:k]):
            return k
    return 0


def parse_output(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content or None, tool calls) of a whole generated text."""
    p = ToolCallParser()
    p.feed(text)
    p.finish()
    return p.text, p.calls
