"""Under bad input and load the server keeps working: fuzzing from its OpenAPI description, and
100 concurrent requests on loopback.

A tiny random model (64-token context) keeps every generated request cheap.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.python import asgi
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from muse.server import ServerThread, create_app
from muse.server.security import Limits
from tests.helpers import tiny_model
from tests.test_server import fake_embedder


FUZZED = ("/v1/",)  # path prefixes fuzzed here: the OpenAI-compatible API


@pytest.fixture(scope="module")
def app(default_model):
    # schemathesis's in-process client calls itself "testserver": a name the server must be told to answer to
    app = create_app({"tiny": tiny_model(default_model.tokenizer, block_size=64)}, embedder=fake_embedder(),
                     limits=Limits(max_body_bytes=64_000, max_prompt_chars=4_000, max_queued=100),
                     allowed_hosts=[asgi.HOST])
    yield app
    app.state.service.close()


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzed_requests_never_get_a_server_error(api_schema, mode):
    """Every operation, 30 generated requests each (valid ones, then invalid ones): never a 5xx,
    and every answer matches the schema documented for its status."""
    operations = [op for op in (result.ok() for result in api_schema.get_all_operations())
                  if op.path.startswith(FUZZED)]
    assert {op.path for op in operations} >= {"/v1/models", "/v1/chat/completions", "/v1/completions",
                                              "/v1/embeddings"}
    for op in operations:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case):
            if isinstance(case.body, dict) and isinstance(case.body.get("model"), str) and len(repr(case.body)) % 4:
                # most cases name a served model, so generation itself gets fuzzed, not only the 404
                case.body["model"] = "fake-embed" if op.path == "/v1/embeddings" else "tiny"
            case.call_and_validate(checks=[not_a_server_error, response_schema_conformance], timeout=120)

        try:
            check()
        except Unsatisfiable:  # no invalid input exists for this operation (GET /v1/models)
            assert mode is GenerationMode.NEGATIVE


def test_one_hundred_concurrent_requests_all_succeed(app):
    """Loopback load: 100 requests at once (more than the batch holds, within the queue): none lost, all 200."""
    async def load(url):
        async with httpx.AsyncClient(base_url=url, timeout=300,
                                     limits=httpx.Limits(max_connections=100, max_keepalive_connections=0)) as c:
            async def one(i):
                stream = i % 2 == 0
                r = await c.post("/v1/chat/completions", json={
                    "model": "tiny", "messages": [{"role": "user", "content": f"Request {i}"}],
                    "max_tokens": 4, "temperature": 0.5, "seed": i, "stream": stream})
                return r.status_code, r.text.rstrip().endswith("data: [DONE]") if stream else bool(
                    r.json()["choices"][0]["finish_reason"])

            return await asyncio.gather(*(one(i) for i in range(100)))

    with ServerThread(app) as server:
        results = asyncio.run(load(server.url))
    assert results == [(200, True)] * 100
    assert app.state.service.scheduler("tiny").active == 0
