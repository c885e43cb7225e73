"""The OpenAI surface beyond plain text, through the official `openai` client against `muse serve`:
response_format (json_object, json_schema, the client's pydantic `parse`), tools (tool_choice
required / named / auto / none, streamed and not, a tool-result round trip), logprobs and
top_logprobs, logit_bias, a 400 naming each unsupported field, /metrics, /tokenize and /detokenize.

SmolLM2 (whose template knows no tools: Muse describes them in the system message) runs most of
it greedily with few tokens; Qwen2.5 (whose template renders tools, `<tool_call>` one special
token) checks the template-native path in two requests.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
import torch
from pydantic import BaseModel

from muse import tools as tool_calls
from muse.constrain import ConstraintError, TokenMask
from muse.server import ServerThread, create_app

KEY = "test-key"
MODEL = "smollm2-135m"
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}
SUM = [{"role": "user", "content": "What is 2 plus 3? Use the add tool."}]


@pytest.fixture(scope="module")
def server(default_model):
    app = create_app({MODEL: default_model}, api_key=KEY, embedder=None)
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300) as c:
        yield c


def args_of(call, tool: dict) -> dict:
    """A call's arguments, parsed and checked against its tool's parameter schema."""
    assert call.function.name == tool["function"]["name"]
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


# -- response_format ------------------------------------------------------------------------

def test_json_object_reply_is_a_json_object(client):
    messages = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0,
                                           response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}}, "required": ["kind"]}},
    "required": ["name", "age", "pet"]}


def test_json_schema_strict_reply_conforms_and_has_no_other_keys(client, http):
    messages = [{"role": "user", "content": "Invent a person and their pet."}]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    person = json.loads(reply.choices[0].message.content)
    jsonschema.validate(person, tool_calls.strict_schema(PERSON))  # strict: no keys beyond those declared
    assert set(person) == {"name", "age", "pet"} and set(person["pet"]) == {"kind"}
    # /v1/completions takes it too (vLLM's extension)
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "A person as JSON:", "max_tokens": 60,
                                          "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {
                                              "name": "person", "schema": PERSON, "strict": True}}})
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), PERSON)


class City(BaseModel):
    name: str
    country: str
    population: int


def test_client_parse_returns_the_pydantic_object(client):
    reply = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Name a big city."}],
                                          max_tokens=60, temperature=0, response_format=City)
    city = reply.choices[0].message.parsed
    assert isinstance(city, City) and city.name


def test_unusable_schema_is_a_400_naming_response_format(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=SUM, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}})
    assert e.value.body["param"] == "response_format" and "strin" in e.value.body["message"]
    scheduler = server.server.config.app.state.service.scheduler(MODEL)
    assert scheduler.waiting == 0 and scheduler.active == 0


# -- tools ----------------------------------------------------------------------------------

def test_required_tool_call_parses_and_matches_its_schema(client):
    reply = client.chat.completions.create(model=MODEL, messages=SUM, tools=[WEATHER, ADD], tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=40, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert args_of(call, ADD) == {"a": 2, "b": 3}


def test_named_tool_choice_calls_that_tool(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=SUM, tools=[ADD, WEATHER], parallel_tool_calls=False, max_tokens=40, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    [call] = reply.choices[0].message.tool_calls
    assert isinstance(args_of(call, WEATHER)["city"], str)


def test_streamed_tool_calls_accumulate_to_the_same_calls(client):
    kw = dict(model=MODEL, messages=SUM, tools=[WEATHER, ADD], tool_choice="required", parallel_tool_calls=False,
              max_tokens=40, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls
    with client.chat.completions.stream(**kw) as stream:
        final = stream.get_final_completion()
    raw = list(client.chat.completions.create(**kw, stream=True))
    assert final.choices[0].finish_reason == "tool_calls"
    [call] = final.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == (whole[0].function.name, whole[0].function.arguments)
    pieces = [d.function.arguments for c in raw for d in (c.choices[0].delta.tool_calls or []) if c.choices]
    assert len(pieces) > 2 and "".join(pieces) == whole[0].function.arguments  # arguments really streamed
    assert raw[-1].choices[0].finish_reason == "tool_calls"


def test_auto_lets_the_model_answer_in_text_and_none_never_calls(client):
    messages = [{"role": "user", "content": "Say hello to me."}]
    for choice in ("auto", "none"):
        reply = client.chat.completions.create(model=MODEL, messages=messages, tools=[ADD], tool_choice=choice,
                                               max_tokens=12, temperature=0)
        assert reply.choices[0].message.tool_calls is None and reply.choices[0].message.content
        assert reply.choices[0].finish_reason in ("stop", "length")
    bare = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0)
    assert reply.usage.prompt_tokens > bare.usage.prompt_tokens + 50  # the tools were described to the model


def test_auto_grammar_keeps_calls_valid_and_text_free(default_model):
    """The auto grammar on SmolLM2's tokens: plain text, text then a call, a call; a call whose
    arguments break the schema is refused at the token that breaks it."""
    tok = default_model.tokenizer
    constraint = tool_calls.tool_constraint(tool_calls.parse_tools([ADD]), "auto", tok)

    def run(text: str) -> bool:
        mask = TokenMask(constraint, tok, default_model.config.vocab_size)
        for t in tok.encode(text, add_special_tokens=False):
            assert bool(mask.allowed()[t])
            mask.accept(t)
        return mask.accepting

    good = tool_calls.format_call("add", {"a": 1, "b": 2})
    assert run("Hello there!") and run(good) and run("Let me add.\n" + good)
    with pytest.raises((AssertionError, ConstraintError)):
        run(tool_calls.format_call("add", {"a": "one", "b": 2}))
    with pytest.raises((AssertionError, ConstraintError)):
        run(tool_calls.format_call("multiply", {"a": 1, "b": 2}))


def test_tool_result_round_trip_gives_a_text_answer(client, http):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [{"role": "user", "content": "What's the weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 degrees"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=16,
                                           temperature=0)
    assert reply.choices[0].message.content and reply.choices[0].message.tool_calls is None
    prompt = http.post("/detokenize", json={"tokens": http.post("/tokenize", json={"messages": messages}).json()[
        "tokens"]}).json()["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\nSunny, 24 degrees\n</tool_response>" in prompt


@pytest.fixture(scope="module")
def qwen_client(qwen):
    app = create_app({"qwen": qwen}, api_key=KEY, embedder=None)
    with ServerThread(app) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)


def test_qwen_writes_calls_with_its_own_tool_call_token(qwen_client):
    weather = [{"role": "user", "content": "What's the weather in Paris?"}]
    reply = qwen_client.chat.completions.create(model="qwen", messages=weather, tools=[WEATHER], tool_choice="required",
                                                parallel_tool_calls=False, max_tokens=30, temperature=0, logprobs=True)
    [call] = reply.choices[0].message.tool_calls
    assert args_of(call, WEATHER) == {"city": "Paris"} and reply.choices[0].finish_reason == "tool_calls"
    assert bytes(reply.choices[0].logprobs.content[0].bytes) == b"<tool_call>"  # one token, the template's own
    # auto: a call the model starts (here pushed by logit_bias) is kept valid by the grammar
    auto = qwen_client.chat.completions.create(model="qwen", messages=weather, tools=[WEATHER], max_tokens=30,
                                               temperature=0, parallel_tool_calls=False, logit_bias={"151657": 100})
    assert args_of(auto.choices[0].message.tool_calls[0], WEATHER)["city"]


# -- logprobs and logit_bias ----------------------------------------------------------------

def test_chat_logprobs_are_the_models_own(client, http, default_model):
    messages = [{"role": "user", "content": "Name a colour."}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    prompt = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    ids = [http.post("/tokenize", json={"prompt": t.token, "add_special_tokens": False}).json()["tokens"][0]
           for t in content]
    logp = torch.log_softmax(default_model.logits(prompt + ids).float(), dim=-1)[len(prompt) - 1:]  # (n, V)
    for step, (t, tid) in enumerate(zip(content, ids)):
        assert t.logprob == pytest.approx(float(logp[step, tid]), abs=1e-3)
        tops = [x.logprob for x in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and sum(map(torch.tensor, tops)).exp() <= 1
        assert t.top_logprobs[0].token == t.token  # greedy: the chosen token is the most likely
        assert bytes(t.bytes) == t.token.encode("utf-8")
    streamed = [c.choices[0].logprobs.content for c in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, stream=True)
        if c.choices and c.choices[0].logprobs]
    streamed = [t for part in streamed for t in part]
    assert [t.token for t in streamed] == [t.token for t in content]
    for a, b in zip(streamed, content):  # the stream's prompt came from the prefix cache: float noise only
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
        assert [x.token for x in a.top_logprobs] == [x.token for x in b.top_logprobs]


def test_completion_logprobs_shape(client):
    out = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0,
                                    logprobs=2).choices[0]
    lp = out.logprobs
    assert "".join(lp.tokens) == out.text and len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(top) == 2 and max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs,
                                                                                        lp.token_logprobs))


def test_echo_with_logprobs_scores_the_prompt_too(client, default_model):
    prompt = "The capital of France is"
    kw = dict(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=2)
    plain = client.completions.create(**kw).choices[0].logprobs
    echoed = client.completions.create(**kw, echo=True).choices[0]
    lp, ids = echoed.logprobs, default_model.tokenizer.encode(prompt)
    n = len(ids)
    assert "".join(lp.tokens) == echoed.text and echoed.text.startswith(prompt)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing comes before the first token
    logp = torch.log_softmax(default_model.logits(ids).float(), dim=-1)  # (n, V)
    assert lp.token_logprobs[1:n] == pytest.approx([float(logp[t - 1, ids[t]]) for t in range(1, n)], abs=1e-3)
    assert lp.tokens[n:] == plain.tokens and lp.token_logprobs[n:] == pytest.approx(plain.token_logprobs, abs=1e-3)
    streamed = [c.choices[0] for c in client.completions.create(**kw, echo=True, stream=True)]
    assert streamed[0].text == prompt and streamed[0].logprobs.tokens == lp.tokens[:n]


def test_logit_bias_bans_and_forces_tokens(client, http):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    kw = dict(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    plain = client.chat.completions.create(**kw, logprobs=True).choices[0]
    ids = [http.post("/tokenize", json={"prompt": t.token, "add_special_tokens": False}).json()["tokens"][0]
           for t in plain.logprobs.content]
    banned = client.chat.completions.create(**kw, logprobs=True, logit_bias={str(ids[0]): -100}).choices[0]
    assert banned.message.content != plain.message.content
    assert plain.logprobs.content[0].token not in [t.token for t in banned.logprobs.content]
    forced_id = http.post("/tokenize", json={"prompt": " banana", "add_special_tokens": False}).json()["tokens"][0]
    forced = client.chat.completions.create(**kw, logit_bias={str(forced_id): 100}).choices[0].message.content
    word = http.post("/detokenize", json={"tokens": [forced_id]}).json()["prompt"]
    assert forced == word * 8


# -- what is not supported says so ----------------------------------------------------------

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def chat(**kw):
    return {"model": MODEL, "messages": SUM, "max_tokens": 1, **kw}


@pytest.mark.parametrize("path,body,param", [
    (CHAT, chat(functions=[{"name": "add"}]), "functions"),
    (CHAT, chat(function_call="auto"), "function_call"),
    (CHAT, chat(audio={"voice": "alloy", "format": "wav"}), "audio"),
    (CHAT, chat(modalities=["text", "audio"]), "modalities"),
    (CHAT, chat(prediction={"type": "content", "content": "x"}), "prediction"),
    (CHAT, chat(web_search_options={}), "web_search_options"),
    (CHAT, chat(logit_bias={"99999999": 1}), "logit_bias"),
    (CHAT, chat(logit_bias={"abc": 1}), "logit_bias"),
    (CHAT, chat(logit_bias={"5": 101}), "logit_bias.5"),
    (CHAT, chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    (CHAT, chat(top_logprobs=2), "top_logprobs"),
    (CHAT, chat(tools=[ADD], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (CHAT, chat(tool_choice="required"), "tool_choice"),
    (CHAT, chat(tools=[ADD, ADD]), "tools"),
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}]), "tools"),
    (CHAT, chat(tools=[ADD], response_format={"type": "json_object"}), "response_format"),
    (CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format"),
    (CHAT, chat(messages=[{"role": "user", "content": None}]), "messages.0.content"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "logprobs": 6}, "logprobs"),
    (COMPLETIONS, {"model": MODEL, "prompt": "word " * 1100, "logprobs": 1, "echo": True}, "prompt"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "best_of": 2}, "best_of"),
])
def test_unsupported_or_bad_fields_are_a_400_naming_them(http, path, body, param):
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# -- /metrics, /tokenize, /detokenize -------------------------------------------------------

def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_move_with_requests(server, http):
    assert httpx.get(server.url + "/metrics").status_code == 401  # guarded like the API
    before = http.get("/metrics").text
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to three, slowly, please."}],
            "max_tokens": 3, "temperature": 0}
    for _ in range(2):  # the second one's prompt comes from the prefix cache
        assert http.post(CHAT, json=body).status_code == 200
    assert http.post(CHAT, json={**body, "temperature": 7}).status_code == 400
    after = http.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain; version=0.0.4")
    a, route = after.text, {"route": CHAT, "method": "POST"}
    assert metric(a, "muse_http_requests_total", **route, status=200) == metric(
        before, "muse_http_requests_total", **route, status=200) + 2
    assert metric(a, "muse_http_requests_total", **route, status=400) >= 1
    assert metric(a, "muse_completion_tokens_total", model=MODEL) == metric(
        before, "muse_completion_tokens_total", model=MODEL) + 6
    assert metric(a, "muse_prompt_tokens_total", model=MODEL) > metric(before, "muse_prompt_tokens_total", model=MODEL)
    assert metric(a, "muse_time_to_first_token_seconds_count", model=MODEL) == metric(
        before, "muse_time_to_first_token_seconds_count", model=MODEL) + 2
    assert metric(a, "muse_prefix_cache_hit_tokens_total", model=MODEL) > metric(
        before, "muse_prefix_cache_hit_tokens_total", model=MODEL)
    assert metric(a, "muse_http_request_duration_seconds_count", route=CHAT) >= 3
    assert f'muse_requests_waiting{{model="{MODEL}"}} 0' in a and f'muse_requests_running{{model="{MODEL}"}} 0' in a


def test_tokenize_detokenize_round_trip(http, default_model):
    text = "你好，世界！Hello, world 👍🏽"
    r = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert r["tokens"] == default_model.tokenizer.encode(text, add_special_tokens=False)
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == default_model.config.block_size
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": text}
    messages = [{"role": "user", "content": text}]
    ids = http.post("/tokenize", json={"model": MODEL, "messages": messages}).json()["tokens"]
    assert ids == default_model.tokenizer.encode(default_model.chat_prompt(messages), add_special_tokens=False)
    assert http.post("/detokenize", json={"tokens": [10**7]}).json()["error"]["param"] == "tokens"
    assert http.post("/tokenize", json={"prompt": "x", "messages": messages}).status_code == 400


def test_new_paths_are_guarded_like_the_api(server):
    """A web page cannot reach /tokenize, /detokenize or /metrics (cross-origin, or without the key)."""
    evil = {"Origin": "http://evil.example", "Authorization": f"Bearer {KEY}"}
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        assert httpx.post(server.url + path, json=body, headers=evil).status_code == 403
        assert httpx.post(server.url + path, json=body).status_code == 401
    assert httpx.get(server.url + "/metrics", headers={**evil, "Sec-Fetch-Site": "cross-site"}).status_code == 403


# -- /v1/responses --------------------------------------------------------------------------

ADD_FLAT = {"type": "function", **ADD["function"]}  # the Responses API's tool shape


def test_responses_text_streamed_and_not(client, default_model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.responses.create(model=MODEL, input=messages[0]["content"], max_output_tokens=8, temperature=0)
    want = default_model.chat(messages, max_new_tokens=8, temperature=0)
    assert r.output_text == want and r.usage.output_tokens > 0
    assert r.status in ("completed", "incomplete")
    with client.responses.stream(model=MODEL, input=messages, max_output_tokens=8, temperature=0) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == want and final.status == r.status


def test_responses_function_calls_and_their_outputs(client):
    kw = dict(model=MODEL, input="What is 2 plus 3?", tools=[ADD_FLAT], tool_choice="required",
              parallel_tool_calls=False, max_output_tokens=40, temperature=0)
    r = client.responses.create(**kw)
    [call] = r.output
    assert call.type == "function_call" and call.name == "add" and json.loads(call.arguments) == {"a": 2, "b": 3}
    with client.responses.stream(**kw) as stream:
        final = stream.get_final_response()
    assert [(o.type, o.name, o.arguments) for o in final.output] == [("function_call", "add", call.arguments)]
    after = client.responses.create(model=MODEL, tools=[ADD_FLAT], max_output_tokens=6, temperature=0, input=[
        {"role": "user", "content": "What is 2 plus 3?"},
        {"type": "function_call", "call_id": call.call_id, "name": "add", "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "5"}])
    assert after.output[0].type == "message" and after.output_text


@pytest.mark.parametrize("body,param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text"),
    ({"background": True}, "background"),
])
def test_responses_unsupported_fields_are_a_400_naming_them(http, body, param):
    r = http.post("/v1/responses", json={"model": MODEL, "input": "Hi", "max_output_tokens": 1, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# -- muse.tools from Python -----------------------------------------------------------------

def test_tools_from_the_python_api(default_model):
    tools = tool_calls.parse_tools([ADD, WEATHER])
    prompt = tool_calls.render_prompt(default_model.tokenizer, SUM, tools)
    assert '"name": "add"' in prompt and "<tool_call>" in prompt  # SmolLM2: described in the system message
    ids = default_model.tokenizer.encode(prompt, add_special_tokens=False)
    text = default_model.generate(ids, temperature=0, max_new_tokens=40,
                                  constraint=tool_calls.tool_constraint(tools, "required", default_model.tokenizer,
                                                                        parallel=False))
    content, [call] = tool_calls.parse_output(text)
    assert content is None and call.complete and json.loads(call.arguments) == {"a": 2, "b": 3}


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_parser_gives_the_same_calls_however_the_text_arrives(step):
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "n": {"a": 1}}}\n'
            '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {}}\n</tool_call>')
    p = tool_calls.ToolCallParser()
    events = [e for i in range(0, len(text), step) for e in p.feed(text[i:i + step])] + p.finish()
    assert "".join(e[1] for e in events if e[0] == "content") == "Let me check." == p.text
    args = ["".join(e[2] for e in events if e[0] == "arguments" and e[1] == i) for i in range(2)]
    assert args == ['{"city": "Paris", "n": {"a": 1}}', "{}"] == [c.arguments for c in p.calls]
    assert [c.name for c in p.calls] == ["get_weather", "add"]
    assert tool_calls.parse_output("  just text ") == ("just text", [])
    content, [cut] = tool_calls.parse_output('<tool_call>\n{"name": "add", "arguments": {"a": 1')
    assert content is None and not cut.complete and cut.arguments == '{"a": 1'
