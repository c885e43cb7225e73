"""The local server against web pages and abusive clients: Host names (DNS rebinding), cross-origin
state changes (CSRF), the web app's launch token, security headers, slow and oversized bodies,
bounded queues with 429 + Retry-After, and user mistakes answered with 400s (not 500s).

Raw sockets are used where an HTTP client would hide what is sent. Every wait is on an event
(a response arriving, a counter reaching a value), bounded by a generous limit.
"""

from __future__ import annotations

import re
import socket
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from muse.errors import MuseError
from muse.scheduler import SchedulerBusy
from muse.server import ServerThread, create_app
from muse.server.apps import Admission
from muse.server.errors import APIError, from_exception
from muse.fileio import safe_join
from muse.server.security import BodyLimitMiddleware, Limits, host_name
from muse.store import Store
from tests.helpers import LOCAL, tiny_model

EVIL = "https://evil.example"


@pytest.fixture(scope="module")
def app(tiny):
    return create_app({"tiny": tiny}, embedder=None)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, base_url=LOCAL) as c:
        yield c


def token_of(client) -> str:
    page = client.get("/").text
    return re.search(r'<meta name="muse-token" content="([^"]+)"', page).group(1)


def memories(client) -> list[str]:
    return [m["content"] for m in client.get("/api/memories").json()["data"]]


# -- Host names: DNS rebinding -------------------------------------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:8000", "localhost:8000", "[::1]:8000", "app.localhost",
                                  "127.9.9.9"])
def test_loopback_host_names_are_served(client, host):
    r = client.get("/v1/models", headers={"Host": host})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "192.168.1.5:8000",
                                  "", "localhost.evil.example"])
def test_other_host_names_are_refused_without_a_key(client, host):
    r = client.get("/api/conversations", headers={"Host": host})
    assert r.status_code == 403
    assert "DNS rebinding" in r.json()["error"]["message"] and "--allow-host" in r.json()["error"]["message"]
    assert client.post("/api/memories", json={"fact": "rebound"}, headers={"Host": host}).status_code == 403
    assert "rebound" not in memories(client)


def test_allowed_hosts_and_api_keys_open_other_names(tiny):
    with TestClient(create_app({"tiny": tiny}, embedder=None, allowed_hosts=["muse.lan"]), base_url=LOCAL) as c:
        assert c.get("/v1/models", headers={"Host": "muse.lan:8000"}).status_code == 200
        assert c.get("/v1/models", headers={"Host": "other.lan"}).status_code == 403
    # With a key the server may be reached by any name (e.g. on a LAN); the key guards it.
    with TestClient(create_app({"tiny": tiny}, embedder=None, api_key="k"), base_url="http://muse.lan") as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200


def test_host_name_parsing():
    assert host_name("127.0.0.1:8000") == "127.0.0.1"
    assert host_name("[::1]:80") == "::1" and host_name("[::1]") == "::1"
    assert host_name("LocalHost") == "localhost" and host_name("a.b:x") == "a.b:x"


# -- cross-origin state changes (CSRF) and the launch token --------------------------------------

@pytest.mark.parametrize("headers", [
    {"Origin": EVIL},
    {"Origin": "null"},  # sandboxed frames, file:// pages
    {"Origin": "http://127.0.0.1:9"},  # another local port is another origin
    {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"},  # a form POST that hides its Origin
])
def test_cross_origin_state_changes_are_refused(client, headers):
    r = client.post("/api/memories", json={"fact": "csrf"}, headers=headers)
    assert r.status_code == 403 and "--cors-origin" in r.json()["error"]["message"]
    # the attack the issue names: a cross-origin multipart upload into the knowledge base
    r = client.post("/api/kb/documents", files={"files": ("x.txt", b"planted text", "text/plain")}, headers=headers)
    assert r.status_code == 403
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1}, headers=headers)
    assert r.status_code == 403
    assert "csrf" not in memories(client)
    assert client.get("/api/kb/documents").json()["data"] == []


def test_browser_calls_need_the_launch_token(client):
    token = token_of(client)
    same = {"Origin": LOCAL, "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}
    for headers in (same, {**same, "X-Muse-Token": "guess"}, {"Sec-Fetch-Mode": "cors"}):
        r = client.post("/api/memories", json={"fact": "no token"}, headers=headers)
        assert r.status_code == 403 and "token" in r.json()["error"]["message"]
        assert client.get("/api/conversations", headers=headers).status_code == 403
    r = client.post("/api/memories", json={"fact": "with token"}, headers={**same, "X-Muse-Token": token})
    assert r.status_code == 201
    # the web app's own files need no token: the page is where the token comes from
    assert client.get("/", headers={"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Site": "cross-site"}).status_code == 200
    # programs (no Origin, no Sec-Fetch-*) need none
    assert client.post("/api/memories", json={"fact": "from a script"}).status_code == 201
    assert {"with token", "from a script"} <= set(memories(client)) and "no token" not in memories(client)


def test_the_token_is_new_for_each_launch(tiny, client):
    with TestClient(create_app({"tiny": tiny}, embedder=None), base_url=LOCAL) as other:
        assert token_of(other) != token_of(client)
        assert len(token_of(other)) >= 40
        r = other.get("/api/conversations", headers={"Sec-Fetch-Mode": "cors", "X-Muse-Token": token_of(client)})
        assert r.status_code == 403


def test_configured_cors_origins_may_call(tiny):
    app = create_app({"tiny": tiny}, embedder=None, cors_origins=["http://localhost:3000"])
    with TestClient(app, base_url=LOCAL) as c:
        r = c.post("/api/memories", json={"fact": "from my app"},
                   headers={"Origin": "http://localhost:3000", "Sec-Fetch-Mode": "cors"})
        assert r.status_code == 201 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert c.post("/api/memories", json={"fact": "x"}, headers={"Origin": EVIL}).status_code == 403


# -- security headers ------------------------------------------------------------------------------

def test_security_headers(client):
    page = client.get("/")
    csp = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "default-src 'self'" in csp
    assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["cache-control"] == "no-store"  # the page holds this launch's token
    for r in (client.get("/v1/models"), client.get("/static/app.js"), client.get("/nowhere"),
              client.get("/v1/models", headers={"Host": "evil.example"})):
        assert r.headers["x-content-type-options"] == "nosniff" and "frame-ancestors" in \
            r.headers["content-security-policy"]


# -- bodies: slow, oversized, too many at once ----------------------------------------------------

def raw_request(port: int, head: bytes, body: bytes = b"", wait: float = 120.0) -> tuple[int, dict, bytes]:
    """Send a request that may stop short, then read whatever the server answers (until it closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(head + body)
        return read_response(s)


def read_response(s: socket.socket) -> tuple[int, dict, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    status = int(lines[0].split()[1])
    want = int(headers.get("content-length", 0))
    while len(rest) < want and (chunk := s.recv(65536)):
        rest += chunk
    return status, headers, rest


def post_head(path: str, length: int, port: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def test_a_body_that_never_finishes_gets_408(tiny):
    app = create_app({"tiny": tiny}, embedder=None, limits=Limits(body_timeout_s=1.0))
    with ServerThread(app) as server:
        status, headers, body = raw_request(server.port, post_head("/api/memories", 100, server.port), b'{"text"')
        assert status == 408 and b"did not arrive within 1 s" in body and headers["connection"] == "close"
        # the server still answers others
        assert httpx.post(server.url + "/api/memories", json={"fact": "ok"}).status_code == 201


def test_connections_that_send_no_request_head_are_closed(tiny, monkeypatch):
    import muse.server.security as security

    monkeypatch.setattr(security, "HEAD_TIMEOUT_S", 1.0)
    with ServerThread(create_app({"tiny": tiny}, embedder=None)) as server:
        idle = socket.create_connection(("127.0.0.1", server.port), timeout=120)
        slow = socket.create_connection(("127.0.0.1", server.port), timeout=120)
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the head never ends
        assert idle.recv(100) == b"" and slow.recv(100) == b""  # closed by the server
        status, _, body = raw_request(server.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert status == 200 and body == b'{"status":"ok"}'


def find_body_limit(app) -> BodyLimitMiddleware:
    layer = app.middleware_stack
    while not isinstance(layer, BodyLimitMiddleware):
        layer = layer.app
    return layer


def test_bodies_received_at_once_are_bounded_in_memory(tiny):
    limits = Limits(max_body_bytes=10_000, max_buffered_bytes=20_000, body_timeout_s=120)
    app = create_app({"tiny": tiny}, embedder=None, limits=limits)
    with ServerThread(app) as server:
        held = []
        try:
            for _ in range(2):  # two slow uploads, each 9,000 of 10,000 bytes sent
                s = socket.create_connection(("127.0.0.1", server.port), timeout=120)
                s.sendall(post_head("/api/memories", 10_000, server.port) + b"x" * 9_000)
                held.append(s)
            middleware = find_body_limit(app)
            deadline = time.monotonic() + 60
            while middleware.buffered < 18_000 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert middleware.buffered == 18_000
            status, headers, body = raw_request(server.port, post_head("/api/memories", 5_000, server.port),
                                                b"y" * 5_000)
            assert status == 429 and headers["retry-after"] == "5" and b"too many large requests" in body
        finally:
            for s in held:
                s.close()
        deadline = time.monotonic() + 60
        while middleware.buffered and time.monotonic() < deadline:  # the slow senders' memory is given back
            time.sleep(0.01)
        assert middleware.buffered == 0
        assert httpx.post(server.url + "/api/memories", json={"fact": "after"}).status_code == 201


def test_limits_are_checked():
    with pytest.raises(ValueError, match="max_buffered_bytes"):
        Limits(max_body_bytes=100, max_buffered_bytes=50)
    with pytest.raises(ValueError, match="body_timeout_s"):
        Limits(body_timeout_s=0)
    with pytest.raises(ValueError, match="max_queued"):
        Limits(max_queued=0)


# -- bounded queues: 429 with Retry-After ---------------------------------------------------------

def test_app_requests_beyond_the_queue_get_429():
    admission = Admission(2)
    leaves = [admission.enter(), admission.enter()]
    with pytest.raises(APIError) as e:
        admission.enter()
    assert e.value.status == 429 and e.value.headers == {"Retry-After": "2"}
    leaves[0]()
    leaves[0]()  # giving a place back twice frees it once
    assert admission.active == 1
    admission.enter()
    with pytest.raises(APIError):
        admission.enter()


def test_generation_beyond_the_queue_gets_429_with_retry_after(tiny):
    assert from_exception(SchedulerBusy("full")).headers == {"Retry-After": "2"}
    long = tiny_model(tiny.tokenizer, block_size=8192)  # room for a request that runs while the others arrive
    app = create_app({"tiny": long}, embedder=None, max_batch=1, limits=Limits(max_queued=1))
    # greedy: the same tokens every run, and this tiny model's greedy text never reaches its end-of-text
    # (it repeats itself, so the loop guard, which would end it, is off)
    body = {"model": "tiny", "prompt": "a", "max_tokens": 8000, "temperature": 0, "stream": True,
            "loop_guard": False}
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=120) as http:
        with http.stream("POST", "/v1/completions", json=body) as running:
            assert running.status_code == 200
            lines = running.iter_lines()  # kept: a dropped iterator closes the connection, which cancels
            next(lines)  # it generates: the batch's one row is taken
            with http.stream("POST", "/v1/completions", json=body) as waiting:
                assert waiting.status_code == 200  # queued behind it
                scheduler = app.state.service.scheduler("tiny")
                assert (scheduler.active, scheduler.waiting) == (1, 1)
                r = http.post("/v1/completions", json=body)
                assert r.status_code == 429 and r.headers["retry-after"] == "2"
                assert r.json()["error"]["code"] == "too_many_requests"


# -- user mistakes are 400s, not 500s ------------------------------------------------------------

def test_conversation_search_with_a_nul_is_a_clear_400(client):
    r = client.get("/api/conversations/search", params={"q": "hello\x00world"})
    assert r.status_code == 400 and "NUL" in r.json()["error"]["message"]
    assert client.get("/api/conversations/search", params={"q": "hello"}).status_code == 200


def test_a_very_long_upload_name_is_a_clear_400(client):
    name = "a" * 250 + ".txt"
    r = client.post("/api/kb/documents", files={"files": (name, b"some text here", "text/plain")})
    assert r.status_code == 400 and "shorter name" in r.json()["error"]["message"]
    with pytest.raises(MuseError, match="shorter name"):
        safe_join("/tmp", "数" * 70)  # 210 bytes of UTF-8


def test_nul_search_in_the_library_is_a_value_error():
    from muse.apps.assistant import Assistant

    with pytest.raises(ValueError, match="NUL"):
        Assistant(None, Store()).search("a\x00b")
