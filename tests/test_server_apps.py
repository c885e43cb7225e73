"""The app endpoints of `muse serve` (/api/...): each one's happy path and a bad input.

Mechanics run on a tiny random model (its text is noise). Greedy results over HTTP must equal the
apps' own in-process results: those comparisons use the default model, whose argmax is not a near-tie
that batched arithmetic could flip.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from muse.apps import writer
from muse.apps.analysis import classify, sentiment
from muse.apps.embed import embedding_model
from muse.apps.assistant import Assistant
from muse.apps.diff import word_diff
from muse.apps.creative import create, default_params as creative_defaults
from muse.apps.kb import KnowledgeBase, ask
from muse.generation import SamplingParams
from muse.server import ServerThread, create_app
from muse.server.security import Limits
from muse.store import Store
from tests.helpers import LOCAL
from tests.test_server import sse

GREEDY = {"max_tokens": 8, "temperature": 0}
DOC = ("The Zorblax warranty lasts exactly seven years from the date of purchase. Repairs are free during "
       "that time.\n\nThe Zorblax factory is in Lyon and makes blue kettles.")


@pytest.fixture
def smol(default_model):
    """A fresh server on the default model (few tokens per request)."""
    with TestClient(create_app({"smollm2-135m": default_model}, embedder=None), base_url=LOCAL) as c:
        yield c


@pytest.fixture
def client(tiny):
    """A fresh server per test (its database lives in the test's own MUSE_HOME)."""
    app = create_app({"tiny": tiny}, embedder=None, limits=Limits(max_body_bytes=50_000, max_prompt_chars=5_000))
    with TestClient(app, base_url=LOCAL) as c:
        yield c


def error(r, status: int, param: str | None = "__any__") -> dict:
    """The OpenAI-shaped error of response `r`, after checking its status (and param)."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param != "__any__":
        assert err["param"] == param, err
    return err


def events(r) -> list[dict]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return sse(r.text)


def new_conversation(client, **body) -> str:
    r = client.post("/api/conversations", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


# -- conversations ----------------------------------------------------------------------

def test_conversations_are_created_listed_renamed_and_deleted(client):
    cid = new_conversation(client, title="First steps")
    assert [c["id"] for c in client.get("/api/conversations").json()["data"]] == [cid]
    r = client.post(f"/api/conversations/{cid}/rename", json={"title": "  Renamed   chat "})
    assert r.json() == {"id": cid, "title": "Renamed chat"}
    assert client.get(f"/api/conversations/{cid}").json()["title"] == "Renamed chat"
    assert client.delete(f"/api/conversations/{cid}").json()["deleted"] is True
    error(client.get(f"/api/conversations/{cid}"), 404, "conversation")
    assert client.get("/api/conversations").json()["data"] == []


def test_conversation_bad_input(client):
    cid = new_conversation(client)
    error(client.post(f"/api/conversations/{cid}/rename", json={"title": ""}), 400, "title")
    error(client.post("/api/conversations/nope/rename", json={"title": "x"}), 404, "conversation")
    error(client.delete("/api/conversations/nope"), 404, "conversation")
    error(client.post("/api/conversations", json={"persona": "ghost"}), 404, "persona")
    error(client.post("/api/conversations", json={"titel": "typo"}), 400, "titel")
    error(client.get("/api/conversations?limit=0"), 400, "query.limit")


def test_a_streamed_reply_is_saved_and_equals_the_in_process_reply(smol, default_model, tmp_path):
    client = smol
    cid = new_conversation(client)
    evs = events(client.post(f"/api/conversations/{cid}/messages", json={"content": "Hello there", **GREEDY}))
    assert [e["type"] for e in evs[:1]] == ["start"] and evs[-1]["type"] == "done"
    deltas = "".join(e["text"] for e in evs if e["type"] == "delta")
    done = evs[-1]
    assert done["content"] == deltas and 1 <= done["usage"]["completion_tokens"] <= 8
    stored = client.get(f"/api/conversations/{cid}").json()["messages"]
    assert [(m["role"], m["content"]) for m in stored] == [("user", "Hello there"), ("assistant", deltas)]
    assert stored[1]["id"] == done["message_id"]

    reference = Assistant(default_model, Store(tmp_path / "reference.db"))
    ref_cid = reference.new_conversation()
    assert reference.reply(ref_cid, "Hello there", SamplingParams(max_new_tokens=8, temperature=0.0)) == deltas
    # the second turn sees the first: the same history gives the same answer, also without streaming
    r = client.post(f"/api/conversations/{cid}/messages", json={"content": "And then?", "stream": False, **GREEDY})
    assert r.json()["content"] == reference.reply(ref_cid, "And then?", SamplingParams(max_new_tokens=8,
                                                                                        temperature=0.0))


def test_message_bad_input(client):
    cid = new_conversation(client)
    url = f"/api/conversations/{cid}/messages"
    error(client.post(url, json={"content": ""}), 400, "content")
    error(client.post(url, json={"content": "hi", "max_tokens": 0}), 400, "max_tokens")
    error(client.post(url, json={"content": "hi", "temperature": 3}), 400, "temperature")
    error(client.post(url, json={"content": "hi", "model": "gpt-9"}), 404, "model")
    error(client.post(url, json={"content": "x" * 5_001}), 413, "content")
    error(client.post(url, json={"content": "   "}), 400)  # only spaces: the assistant refuses it
    error(client.post("/api/conversations/nope/messages", json={"content": "hi"}), 404, "conversation")
    assert client.get(f"/api/conversations/{cid}").json()["messages"] == []  # nothing half-stored


def test_stopping_a_streamed_reply_frees_the_model_and_keeps_the_text_so_far(tiny):
    app = create_app({"tiny": tiny}, embedder=None)
    with ServerThread(app) as server:
        cid = httpx.post(server.url + "/api/conversations", json={}).json()["id"]
        received = ""
        with httpx.stream("POST", f"{server.url}/api/conversations/{cid}/messages",
                          json={"content": "Talk for a long time", "max_tokens": 400, "temperature": 0}) as r:
            for line in r.iter_lines():
                if '"delta"' in line:
                    received += json.loads(line[len("data: "):])["text"]
                    if len(received) >= 3:
                        break  # leaving the block closes the connection, as the web app's stop button does
        scheduler = app.state.service.scheduler("tiny")
        deadline = time.time() + 10
        while (scheduler.active or len(_messages(server, cid)) < 2) and time.time() < deadline:
            time.sleep(0.02)
        assert scheduler.active == 0
        reply = _messages(server, cid)[1]
    assert reply["meta"]["finish_reason"] == "stopped"
    assert reply["content"].startswith(received) and reply["meta"]["generation_tokens"] < 400


def test_concurrent_replies_share_the_scheduler_and_all_finish(tiny):
    """40 streamed and plain replies at once, more than the worker threads (32) and the batch (4)."""
    app = create_app({"tiny": tiny}, embedder=None, max_batch=4)

    async def load(url):
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            cids = [(await c.post("/api/conversations", json={})).json()["id"] for _ in range(40)]

            async def one(i, cid):
                r = await c.post(f"/api/conversations/{cid}/messages",
                                 json={"content": f"Message {i}", "stream": i % 2 == 0, **GREEDY})
                return r.status_code, (sse(r.text)[-1] if i % 2 == 0 else r.json())["usage"]["completion_tokens"]

            return await asyncio.gather(*(one(i, cid) for i, cid in enumerate(cids)))

    with ServerThread(app) as server:
        assert asyncio.run(load(server.url)) == [(200, 8)] * 40
        assert app.state.service.scheduler("tiny").active == 0


def _messages(server, cid: str) -> list[dict]:
    return httpx.get(f"{server.url}/api/conversations/{cid}").json()["messages"]


def test_export_then_import_gives_the_same_conversation(client):
    cid = new_conversation(client, title="Kept")
    client.post(f"/api/conversations/{cid}/messages", json={"content": "Keep me", "stream": False, **GREEDY})
    exported = client.get(f"/api/conversations/{cid}/export")
    assert exported.headers["content-type"].startswith("application/json")
    assert f"conversation-{cid}.json" in exported.headers["content-disposition"]
    r = client.post("/api/conversations/import", json={"text": exported.text})
    assert r.status_code == 201 and r.json()["id"] != cid
    assert client.get(f"/api/conversations/{r.json()['id']}/export").text == exported.text
    markdown = client.get(f"/api/conversations/{cid}/export?format=markdown")
    assert markdown.headers["content-type"].startswith("text/markdown") and "Keep me" in markdown.text
    error(client.get(f"/api/conversations/{cid}/export?format=xml"), 400, "query.format")
    error(client.post("/api/conversations/import", json={"text": "{not json"}), 400)


def test_search_finds_words_in_messages(client):
    cid = new_conversation(client)
    client.post(f"/api/conversations/{cid}/messages", json={"content": "My cat is called Mochi", "stream": False,
                                                           **GREEDY})
    other = new_conversation(client)
    client.post(f"/api/conversations/{other}/messages", json={"content": "Weather today?", "stream": False, **GREEDY})
    assert [c["id"] for c in client.get("/api/conversations/search?q=mochi").json()["data"]] == [cid]
    error(client.get("/api/conversations/search?q="), 400, "query.q")


# -- personas, memories, feedback ------------------------------------------------------

def test_personas(client):
    r = client.post("/api/personas", json={"name": "tutor", "system_prompt": "You are a patient tutor."})
    assert r.status_code == 201 and r.json()["name"] == "tutor"
    assert [p["name"] for p in client.get("/api/personas").json()["data"]] == ["tutor"]
    cid = new_conversation(client, persona="tutor")
    assert client.get(f"/api/conversations/{cid}").json()["persona"] == "tutor"
    assert client.post(f"/api/conversations/{cid}/persona", json={"persona": None}).json()["persona"] is None
    assert client.get(f"/api/conversations/{cid}").json()["persona"] is None
    error(client.post(f"/api/conversations/{cid}/persona", json={"persona": "ghost"}), 404, "persona")
    error(client.post("/api/personas", json={"name": "two words", "system_prompt": "x"}), 400)
    error(client.post("/api/personas", json={"name": "x", "system_prompt": ""}), 400, "system_prompt")
    assert client.delete("/api/personas/tutor").json()["deleted"] is True
    error(client.delete("/api/personas/tutor"), 404, "persona")


def test_memories(client):
    r = client.post("/api/memories", json={"fact": "I live in   Lyon."})
    assert r.status_code == 201
    mid = r.json()["id"]
    assert [(m["id"], m["content"]) for m in client.get("/api/memories").json()["data"]] == [(mid, "I live in Lyon.")]
    assert client.delete(f"/api/memories/{mid}").json()["deleted"] is True
    assert client.get("/api/memories").json()["data"] == []
    error(client.delete(f"/api/memories/{mid}"), 404, "memory_id")
    error(client.post("/api/memories", json={"fact": ""}), 400, "fact")
    error(client.post("/api/memories", json={"fact": "x", "conversation": "nope"}), 404, "conversation")


def test_feedback_on_an_answer_keeps_the_exchange(client):
    chat = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Lyon."}]
    conv = client.post("/api/conversations/import", json={"text": json.dumps({"messages": chat})}).json()
    cid, answer = conv["id"], conv["messages"][1]
    r = client.post("/api/feedback", json={"conversation": cid, "message_id": answer["id"], "rating": -1,
                                           "comment": "wrong city", "correction": "Paris."})
    assert r.status_code == 201
    [row] = client.get("/api/feedback").json()["data"]
    assert (row["rating"], row["comment"], row["response"], row["message_id"], row["correction"]) == (
        -1, "wrong city", "Lyon.", answer["id"], "Paris.")
    assert row["prompt"] == chat[:1]
    r = client.post("/api/feedback", json={"rating": 1, "response": "Paris.",
                                           "prompt": [{"role": "user", "content": "Capital of France?"}]})
    assert r.status_code == 201 and len(client.get("/api/feedback").json()["data"]) == 2
    error(client.post("/api/feedback", json={"conversation": cid, "rating": 2}), 400, "rating")
    error(client.post("/api/feedback", json={"conversation": cid, "message_id": 999, "rating": 1}), 404, "message_id")
    error(client.post("/api/feedback", json={"rating": 1}), 400, "conversation")
    error(client.post("/api/feedback", json={"rating": 1, "response": "x", "prompt": [{"role": "judge"}]}), 400)
    error(client.post("/api/feedback", json={"conversation": cid, "rating": 1, "correction": "Rome."}), 400)


# -- knowledge base ---------------------------------------------------------------------

def upload(client, name: str, data: bytes):
    return client.post("/api/kb/documents", files=[("files", (name, data, "text/plain"))])


def test_upload_search_ask_and_remove_a_document(client, muse_home):
    r = upload(client, "warranty.txt", DOC.encode())
    assert r.status_code == 201, r.text
    [doc] = r.json()["data"]
    saved = muse_home / "uploads" / "warranty.txt"
    assert doc["status"] == "added" and doc["path"] == str(saved.resolve()) and saved.read_text() == DOC
    assert upload(client, "warranty.txt", DOC.encode()).json()["data"][0]["status"] == "unchanged"
    assert [d["id"] for d in client.get("/api/kb/documents").json()["data"]] == [doc["id"]]
    hits = client.get("/api/kb/search?q=warranty years").json()["data"]
    assert hits and "seven years" in hits[0]["text"]

    evs = events(client.post("/api/kb/ask", json={"question": "How long is the Zorblax warranty?", **GREEDY}))
    first, done = evs[0], evs[-1]
    assert first["type"] == "citations" and first["found"] and "seven years" in first["citations"][0]["text"]
    # The tiny random model's reply is nonsense, which grounding.verify turns into the not-found answer
    # (then with no citations); whatever the answer cites comes from the passages sent first.
    assert done["type"] == "done"
    assert {c["chunk_id"] for c in done["citations"]} <= {c["chunk_id"] for c in first["citations"]}
    # a quoted answer (the model gave none it could back) is found and cites the one passage it quotes
    assert not done["quoted"] or (done["found"] and len(done["citations"]) == 1
                                  and done["text"][:20] in done["citations"][0]["text"])
    nothing = client.post("/api/kb/ask", json={"question": "Who painted the Mona Lisa?", "stream": False}).json()
    assert (nothing["found"], nothing["citations"]) == (False, [])

    assert client.delete(f"/api/kb/documents/{doc['id']}").json()["deleted"] is True
    assert not saved.exists() and client.get("/api/kb/documents").json()["data"] == []
    error(client.delete(f"/api/kb/documents/{doc['id']}"), 404, "doc_id")


def test_uploads_cannot_escape_and_bad_files_are_refused_whole(client, muse_home):
    error(upload(client, "../escape.txt", b"hello"), 400, "files")
    error(upload(client, "/etc/passwd", b"hello"), 400, "files")
    assert not (muse_home / "escape.txt").exists()
    r = client.post("/api/kb/documents", files=[("files", ("good.txt", b"Fine text.", "text/plain")),
                                                ("files", ("tool.exe", b"MZ\x90\x00", "application/octet-stream"))])
    assert "tool.exe" in error(r, 400, "files")["message"]
    assert client.get("/api/kb/documents").json()["data"] == [] and not (muse_home / "uploads" / "good.txt").exists()
    error(upload(client, "big.txt", b"a " * 30_000), 413)  # over this server's 50 kB body limit
    error(client.post("/api/kb/ask", json={"question": ""}), 400, "question")
    error(client.post("/api/kb/ask", json={"question": "x", "k": 0}), 400, "k")


def test_pasted_text_becomes_a_document(client):
    r = client.post("/api/kb/text", json={"name": "Notes", "text": DOC})
    assert r.status_code == 201 and r.json()["status"] == "added" and r.json()["chunks"] >= 1
    assert [d["title"] for d in client.get("/api/kb/documents").json()["data"]] == ["Notes"]
    error(client.post("/api/kb/text", json={"name": "Notes", "text": ""}), 400, "text")


def test_a_cited_answer_equals_the_in_process_answer(smol, default_model, tmp_path):
    upload(smol, "warranty.txt", DOC.encode())
    question = "How long does the Zorblax warranty last?"
    served = smol.post("/api/kb/ask", json={"question": question, "max_tokens": 16, "stream": False}).json()
    kb = KnowledgeBase(Store(tmp_path / "reference.db"), embeddings="none")
    kb.add_text("warranty", DOC)
    reference = ask(default_model, kb, question, SamplingParams(max_new_tokens=16, temperature=0.0))
    assert served["found"] and served["text"] == reference.text
    assert [c["text"] for c in served["citations"]] == [c.text for c in reference.citations]


# -- writing desk -----------------------------------------------------------------------

TEXT = "The meeting, which had been scheduled for Monday, has now been moved to Tuesday afternoon."


def reconstruct(ops: list[dict]) -> tuple[str, str]:
    old = "".join(o["text"] for o in ops if o["op"] != "insert")
    new = "".join(o["text"] for o in ops if o["op"] != "delete")
    return old, new


def test_a_writer_action_streams_saves_versions_diffs_and_restores(client):
    assert [a["name"] for a in client.get("/api/write/actions").json()["actions"]] == list(writer.ACTIONS)
    # The tiny random model writes nonsense that the output gates would refuse; this test is about
    # streaming, versions and the diff, so the gates are off here (tests/test_gates.py tests them).
    evs = events(client.post("/api/write", json={"action": "shorten", "text": TEXT, "document": "memo",
                                                 "check": False, **GREEDY}))
    done = evs[-1]
    assert done["type"] == "done" and done["output"] == "".join(e["text"] for e in evs if e["type"] == "delta")
    assert done["text"] == writer.new_text("shorten", TEXT, done["output"]) and done["version"] == 2
    assert reconstruct(done["diff"]["ops"]) == (TEXT, done["text"])

    versions = client.get("/api/write/versions?document=memo").json()["data"]
    assert [(v["seq"], v["action"]) for v in versions] == [(1, "original"), (2, "shorten")]
    assert client.get("/api/write/versions/2?document=memo").json()["content"] == done["text"]
    diff = client.get("/api/write/versions/2/diff?document=memo").json()
    assert diff["previous"] == 1 and reconstruct(diff["ops"]) == (TEXT, done["text"])
    restored = client.post("/api/write/versions/1/restore?document=memo").json()
    assert (restored["seq"], restored["content"]) == (3, TEXT)
    assert client.get("/api/write/versions?document=memo").json()["data"][-1]["action"] == "restore 1"
    assert client.get("/api/write/versions?document=other").json()["data"] == []

    # continue appends; running again from the same text does not save it twice
    done = client.post("/api/write", json={"action": "continue", "text": TEXT, "document": "memo", "stream": False,
                                           **GREEDY}).json()
    assert done["text"] == TEXT + done["output"] and done["version"] == 4


def test_writer_bad_input(client):
    error(client.post("/api/write", json={"action": "sing", "text": TEXT}), 400)
    error(client.post("/api/write", json={"action": "shorten", "text": TEXT, "tone": "formal"}), 400)
    error(client.post("/api/write", json={"action": "translate", "text": TEXT}), 400)
    error(client.post("/api/write", json={"action": "shorten", "text": ""}), 400, "text")
    error(client.post("/api/write", json={"action": "shorten", "text": "x" * 5_001}), 413, "text")
    error(client.get("/api/write/versions/9/diff?document=memo"), 404, "seq")
    error(client.post("/api/write/versions/9/restore?document=memo"), 404, "seq")
    assert client.get("/api/write/versions?document=draft").json()["data"] == []  # nothing saved by the failures


def test_an_empty_model_output_is_refused_not_saved_as_a_version(client, monkeypatch):
    # It used to be saved: a "shorten" that returned nothing became an empty newest version.
    from muse.generation import GenerationChunk

    def nothing(model, action, text, **options):
        yield GenerationChunk("  ", None)
        yield GenerationChunk("", None, finish_reason="stop")

    monkeypatch.setattr(writer, "stream_write", nothing)
    body = {"action": "shorten", "text": TEXT, "document": "memo"}
    err = error(client.post("/api/write", json={**body, "stream": False}), 400)
    assert "returned nothing" in err["message"] and "memo" in err["message"]
    last = events(client.post("/api/write", json=body))[-1]
    assert last["type"] == "error" and "returned nothing" in last["error"]["message"]
    versions = client.get("/api/write/versions?document=memo").json()["data"]
    assert [(v["seq"], v["action"]) for v in versions] == [(1, "original")]  # the text is kept, nothing else


def test_the_diff_works_word_by_word_and_character_by_character():
    ops = word_diff("The cat sat.", "The dog sat.")["ops"]
    assert [o for o in ops if o["op"] != "equal"] == [{"op": "delete", "text": "cat"}, {"op": "insert", "text": "dog"}]
    ops = word_diff("今天天气很好。", "今天天气不好。")["ops"]
    assert [o for o in ops if o["op"] != "equal"] == [{"op": "delete", "text": "很"}, {"op": "insert", "text": "不"}]
    unified = word_diff("a\nb\n", "a\nc\n")["unified"]
    assert "-b" in unified.splitlines() and "+c" in unified.splitlines()


# -- creative writing and analysis ------------------------------------------------------------

def test_create_equals_the_in_process_creation(smol, default_model, client):
    body = {"kind": "slogan", "topic": "fresh coffee", "attempts": 1, "max_tokens": 12, "temperature": 0}
    r = smol.post("/api/create", json=body).json()
    # Options given go over the creative app's defaults (its presence penalty, top-p), as on the CLI.
    expected = create(default_model, "slogan", "fresh coffee", attempts=1,
                      params=creative_defaults("slogan").replace(max_new_tokens=12, temperature=0.0))
    assert (r["text"], r["ok"], r["problems"], r["tries"], r["form"]) == (
        expected.text, expected.ok, expected.problems, 1, None)
    assert r["ok"] == (r["problems"] == [])
    error(client.post("/api/create", json={"kind": "essay", "topic": "x"}), 400, "kind")
    error(client.post("/api/create", json={"kind": "poem", "topic": "x", "form": "sonnet"}), 400, "form")
    error(client.post("/api/create", json={"kind": "poem", "topic": "x", "attempts": 0}), 400, "attempts")
    error(client.post("/api/create", json={"kind": "slogan", "topic": "coffee", "form": "haiku"}), 400)
    error(client.post("/api/create", json={"kind": "poem", "topic": " "}), 400)


def test_classify_and_sentiment_equal_the_python_api(client, tiny):
    text, labels = "The striker scored twice in the final.", ["sports", "politics"]
    r = client.post("/api/classify", json={"text": text, "labels": labels}).json()
    expected = classify(tiny, text, labels)
    assert r["scores"] == pytest.approx(expected) and r["label"] == max(expected, key=expected.get)
    assert sum(r["scores"].values()) == pytest.approx(1.0)
    r = client.post("/api/sentiment", json={"text": "I love it."}).json()
    expected = sentiment(tiny, "I love it.")
    assert r["label"] == expected["label"] and r["scores"] == pytest.approx(expected["scores"])
    r = client.post("/api/classify", json={"text": text, "labels": labels, "method": "constrained"}).json()
    expected = classify(tiny, text, labels, method="constrained")  # label scoring ran on the scheduler thread
    assert r["label"] == next(iter(expected)) and r["scores"] == pytest.approx(expected)
    r = client.post("/api/sentiment", json={"text": "I love it.", "method": "constrained"}).json()
    assert r["label"] == sentiment(tiny, "I love it.", method="constrained")["label"]
    if embedding_model():  # the probe alone: no language model runs
        r = client.post("/api/sentiment", json={"text": "I love it.", "method": "probe"}).json()
        assert r["scores"] == pytest.approx(sentiment(tiny, "I love it.", method="probe")["scores"])
        error(client.post("/api/classify", json={"text": text, "labels": labels, "method": "probe"}), 400, "method")
    error(client.post("/api/classify", json={"text": text, "labels": labels, "method": "vote"}), 400, "method")
    error(client.post("/api/classify", json={"text": text, "labels": ["only"]}), 400, "labels")
    error(client.post("/api/classify", json={"text": "", "labels": labels}), 400, "text")
    error(client.post("/api/sentiment", json={"text": "x" * 5_001}), 413, "text")


# -- the API description, the web app's files, the key ------------------------------------

def test_openapi_documents_every_app_endpoint(client):
    spec = client.get("/openapi.json").json()
    app_ops = [(path, op) for path, item in spec["paths"].items() if path.startswith("/api/") for op in item.values()]
    assert {p for p, _ in app_ops} >= {"/api/conversations", "/api/conversations/{cid}/messages", "/api/kb/ask",
                                       "/api/kb/documents", "/api/write", "/api/write/versions/{seq}/diff",
                                       "/api/feedback", "/api/classify", "/api/sentiment", "/api/personas",
                                       "/api/memories"}
    for path, op in app_ops:
        assert op.get("summary") and "400" in op["responses"] and "422" not in op["responses"], path
    assert "/" not in spec["paths"] and not any(p.startswith("/static") for p in spec["paths"])


def test_the_web_app_is_served_with_its_vendored_libraries(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for src in ("/static/app.js", "/static/app.css", "/static/i18n.js", "/static/vendor/marked.min.js",
                "/static/vendor/purify.min.js"):
        assert src in page.text and client.get(src).status_code == 200, src
    assert "http://" not in page.text and "https://" not in page.text  # nothing from the network
    vendor = Path(__file__).parents[1] / "muse" / "server" / "static" / "vendor"
    assert {"LICENSE.marked.md", "LICENSE.dompurify", "README.md"} <= {p.name for p in vendor.iterdir()}
    error(client.get("/static/../apps.py"), 404)
    error(client.get("/static/%2e%2e/apps.py"), 404)
    error(client.get("/static/nope.js"), 404)


def test_with_a_key_the_page_is_public_and_the_api_is_not(tiny):
    app = create_app({"tiny": tiny}, embedder=None, api_key="sekrit")
    with TestClient(app, base_url=LOCAL) as c:
        assert c.get("/").status_code == 200 and c.get("/static/app.js").status_code == 200
        error(c.get("/api/conversations"), 401)
        r = c.get("/api/conversations", headers={"Authorization": "Bearer sekrit"})
        assert r.status_code == 200 and r.json() == {"data": []}


# -- Chinese goes to a served bilingual model ---------------------------------------------

@pytest.fixture
def two(tiny):
    """A server with an English-only default (tiny) and a stand-in for the bilingual model."""
    from tests.helpers import tiny_model

    bilingual = tiny_model(tiny.tokenizer, seed=1)
    bilingual.info["name"] = "qwen2.5-0.5b"  # the registry says it reads Chinese
    app = create_app({"tiny": tiny, "qwen2.5-0.5b": bilingual}, embedder=None)
    with TestClient(app, base_url=LOCAL) as c:
        yield c


def _answered_by(client, content: str, **body) -> str:
    cid = new_conversation(client)
    r = client.post(f"/api/conversations/{cid}/messages", json={"content": content, "stream": False,
                                                                "max_tokens": 2, **body})
    assert r.status_code == 200, r.text
    return client.get(f"/api/conversations/{cid}").json()["messages"][1]["meta"]["model"]


def test_chinese_without_a_model_name_goes_to_the_served_bilingual_model(two):
    assert _answered_by(two, "你好，今天天气怎么样？") == "qwen2.5-0.5b"
    assert _answered_by(two, "Hello, how are you?") == "tiny"
    # a named model is kept, whatever the language
    assert _answered_by(two, "Hello", model="qwen2.5-0.5b") == "qwen2.5-0.5b"
    assert _answered_by(two, "你好，今天天气怎么样？", model="tiny") == "tiny"
    # the other app endpoints route the same way: Chinese is answered instead of refused
    r = two.post("/api/sentiment", json={"text": "这部电影非常好看，我很喜欢。"})
    assert r.status_code == 200 and r.json()["label"] in ("positive", "negative", "neutral")
    error(two.post("/api/sentiment", json={"text": "这部电影非常好看，我很喜欢。", "model": "tiny"}), 400)


def test_chinese_output_goes_to_the_bilingual_model_and_english_only_servers_still_refuse(two, client):
    from muse.apps.writer import into_chinese as _into_chinese  # one home, shared with `muse write`
    from muse.server.apps import _for_chinese

    service = two.app.state.service
    assert _for_chinese(service, True) == "qwen2.5-0.5b" and _for_chinese(service, False) is None
    assert _into_chinese("zh") and _into_chinese("中文") and not _into_chinese("fr") and not _into_chinese(None)
    assert not _into_chinese("klingon")  # the writer refuses it itself
    assert _for_chinese(client.app.state.service, True) is None  # nothing reads Chinese: the default answers
    error(client.post("/api/sentiment", json={"text": "这部电影非常好看，我很喜欢。"}), 400)
