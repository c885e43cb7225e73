"""Fault injection: kill -9 of a real `muse serve` in the middle of streamed replies and uploads.

After every kill the database passes SQLite's integrity check, holds every message and reply a
client saw committed, and no half row: each stored reply is whole (with its finish reason), each
document has all its chunks, the full-text index matches the messages. No partial file lies under
an upload's final name, no child process (an extraction worker) outlives the server, and the server
restarts clean on the same MUSE_HOME and answers again.

The servers are child processes on port 0 in the test's own MUSE_HOME. Every wait is for an event
(a log line, a server-sent event, a process exit), bounded by BOUND; kill moments are drawn from
seeded generators, counted in events where there are events to count.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from muse.store import Store

ROOT = Path(__file__).resolve().parents[1]
BOUND = 120.0  # the most any one wait may take on a loaded machine; reached only when something is wrong
RUNNING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")
WORDS = ("the kettle warranty lasts seven years from the date of purchase and repairs are free while "
         "the factory in Lyon makes blue kettles for every kitchen").split()


# -- the server under test ------------------------------------------------------------------

class Server:
    """`muse serve --port 0` in a child process on `home`; `kill()` is kill -9."""

    def __init__(self, home: Path):
        env = {**os.environ, "MUSE_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from muse.cli import main; main()", "serve", "--port", "0"],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace")
        self.log: list[str] = []
        ports: queue.Queue = queue.Queue()
        threading.Thread(target=self._read_log, args=(ports,), daemon=True).start()
        try:
            port = ports.get(timeout=BOUND)
        except queue.Empty:
            port = None
        if port is None:
            self.proc.kill()
            self.proc.wait(BOUND)
            pytest.fail("muse serve did not start:\n" + self.tail())
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=BOUND)

    def _read_log(self, ports: queue.Queue) -> None:
        for line in self.proc.stdout:  # drained to the end, so the pipe never fills
            self.log.append(line)
            if m := RUNNING.search(line):
                ports.put(int(m.group(1)))
        ports.put(None)  # the process is gone (before it said where it listens, if that came first)

    def tail(self, n: int = 60) -> str:
        return "".join(self.log[-n:])

    def kill(self) -> None:
        """kill -9; returns once the server and every process it started are gone."""
        children = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(BOUND)
        _wait_gone(children)

    def stop(self) -> None:
        """A clean shutdown (Ctrl-C) at the end of a test."""
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(BOUND)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(BOUND)
        assert "Traceback" not in self.tail(10_000), self.tail()


def _wait_gone(procs: list[psutil.Process]) -> None:
    """Wait until each process has exited (an orphan nobody reaps stays a zombie: that counts as exited)."""
    deadline = time.monotonic() + BOUND

    def running(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    while (alive := [p for p in procs if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive, f"processes outlived the killed server: {[p.cmdline() for p in alive]}"


@pytest.fixture
def servers(muse_home):
    """start() a server on this test's MUSE_HOME; whatever still runs at the end is killed."""
    started: list[Server] = []

    def start() -> Server:
        started.append(Server(muse_home))
        return started[-1]

    yield start
    for s in started:
        s.http.close()
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(BOUND)


# -- what the database must hold after a kill ------------------------------------------------

def check_database(home: Path, sources: dict[str, str] | None = None) -> dict:
    """Integrity after a kill; returns the rows ({"messages": [...], "documents": [...]}).

    `sources`: the text uploaded under each document title, to check chunks against.
    """
    with Store(home / "muse.db") as db:
        assert db.one("PRAGMA integrity_check")["integrity_check"] == "ok"
        assert db.all("PRAGMA foreign_key_check") == []
        # the full-text index is in step with the messages (raises SQLITE_CORRUPT_VTAB otherwise)
        db.execute("INSERT INTO messages_fts (messages_fts, rank) VALUES ('integrity-check', 1)")
        messages = db.all("SELECT * FROM messages ORDER BY id")
        for m in messages:
            assert m["content"].strip(), m
            if m["role"] == "assistant":  # a reply is stored whole, with why it ended
                meta = json.loads(m["meta"])
                assert meta["finish_reason"] in ("stop", "length", "stopped"), m
        documents = db.all("SELECT * FROM documents ORDER BY id")
        for d in documents:
            chunks = db.all("SELECT * FROM chunks WHERE document_id = ? ORDER BY seq", (d["id"],))
            assert [c["seq"] for c in chunks] == list(range(len(chunks))) and chunks, d  # all of them, in order
            chars = json.loads(d["meta"])["chars"]
            for c in chunks:
                assert 0 <= c["start"] < c["end"] <= chars and len(c["text"]) == c["end"] - c["start"], c
                assert c["embedding"] is None or len(c["embedding"]) == 384 * 4, c
                if sources and d["title"] in sources:
                    assert c["text"] in sources[d["title"]], c
            assert len({c["embedding"] is None for c in chunks}) == 1, d  # embedded all or none
    return {"messages": messages, "documents": documents}


def check_uploads(home: Path, documents: list[dict]) -> list[str]:
    """uploads/ and the database agree: each file under its final name is the stored version of its
    document, byte for byte, and each uploaded document has its file. Returns the names of temp files
    (.NAME.tmp-*), which a kill leaves while an upload is being indexed."""
    folder = (home / "uploads").resolve()
    stored = {d["path"]: d["sha256"] for d in documents if Path(d["path"]).resolve().parent == folder}
    files, temps = {}, []
    for f in sorted(folder.iterdir()) if folder.exists() else []:
        if f.name.startswith(".") and ".tmp-" in f.name:
            temps.append(f.name)
        else:
            files[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    assert files == stored
    return temps


# -- clients --------------------------------------------------------------------------------

def events(response: httpx.Response):
    """The JSON events of a server-sent event stream, as they arrive."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield json.loads(line[len("data: "):])


def new_conversation(server: Server) -> str:
    r = server.http.post("/api/conversations", json={})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def chat(server: Server, cid: str, text: str, **sampling) -> dict:
    """A whole streamed reply: its "done" event."""
    with server.http.stream("POST", f"/api/conversations/{cid}/messages",
                            json={"content": text, "stream": True, **sampling}) as r:
        assert r.status_code == 200, r.read()
        last = list(events(r))[-1]
    assert last["type"] == "done", last
    return last


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = f"muse-crash-{random.Random(name).getrandbits(64):x}"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def upload(server: Server, name: str, data: bytes) -> dict:
    body, kind = multipart(name, data)
    r = server.http.post("/api/kb/documents", content=body, headers={"Content-Type": kind})
    assert r.status_code == 201, r.text
    (doc,) = r.json()["data"]
    assert doc["chunks"] >= 1
    return doc


def raw_upload(server: Server, name: str, data: bytes) -> tuple[socket.socket, bytes]:
    """Open an upload on a raw socket with `Expect: 100-continue` and wait for the server's 100:
    the server is then reading the body. Returns the socket and the body still to send."""
    body, kind = multipart(name, data)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=BOUND)
    sock.sendall((f"POST /api/kb/documents HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                  f"Content-Type: {kind}\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n").encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        got = sock.recv(4096)
        assert got, f"the server closed the connection: {answer!r}"
        answer += got
    assert answer.startswith(b"HTTP/1.1 100"), answer
    return sock, body


def text_of(rng: random.Random, sentences: int) -> str:
    return " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))).capitalize() + "."
                    for _ in range(sentences))


# -- A: a kill in the middle of a streamed reply ----------------------------------------------

def test_kill_during_a_streamed_reply(servers, muse_home):
    server = servers()
    cid = new_conversation(server)
    question = "Tell me a long story about a dragon who guards a library."
    seen = []
    with server.http.stream("POST", f"/api/conversations/{cid}/messages",
                            json={"content": question, "stream": True, "max_tokens": 400, "temperature": 0}) as r:
        assert r.status_code == 200
        for event in events(r):
            seen.append(event)
            if sum(e["type"] == "delta" for e in seen) == 5:
                server.kill()
                break
    assert seen[0]["type"] == "start" and all(e["type"] == "delta" for e in seen[1:])

    rows = check_database(muse_home)
    # the question was committed before the reply began; the unfinished reply lived only in the killed
    # process, so no row holds part of it
    assert [(m["conversation_id"], m["role"], m["content"]) for m in rows["messages"]] == [(cid, "user", question)]

    server = servers()  # restarts clean on the same MUSE_HOME
    listed = server.http.get("/api/conversations").json()["data"]
    assert [(c["id"], c["messages"]) for c in listed] == [(cid, 1)]
    done = chat(server, cid, "Then tell me a short one.", max_tokens=12)
    assert done["content"] and done["message_id"]
    conv = server.http.get(f"/api/conversations/{cid}").json()
    assert [m["role"] for m in conv["messages"]] == ["user", "user", "assistant"]
    assert conv["messages"][-1]["content"] == done["content"]
    server.stop()
    check_database(muse_home)


# -- B: a kill in the middle of an upload, and while it is indexed ------------------------------

def test_kill_during_uploads(servers, muse_home):
    rng = random.Random(12)
    sources: dict[str, str] = {}  # the text of each document, by title

    # a kill while the body arrives: 1.5 MB of 3 MB sent, in pieces
    server = servers()
    big = text_of(rng, 30_000).encode()[:3_000_000]
    sock, body = raw_upload(server, "big.txt", big)
    with sock:
        for i in range(0, len(body) // 2, 64 * 1024):
            sock.sendall(body[i:i + 64 * 1024])
        server.kill()
    rows = check_database(muse_home)
    assert rows["documents"] == []
    assert check_uploads(muse_home, rows["documents"]) == []  # nothing is written before the body is in

    # restarts clean; uploads work, an HTML file too (read in an extraction worker, which the next
    # kill must take down with the server)
    server = servers()
    small = text_of(rng, 4)
    sources["big"] = small
    assert upload(server, "big.txt", small.encode())["status"] == "added"
    sources["Kettles"] = text_of(rng, 3)
    upload(server, "page.html", f"<html><head><title>Kettles</title></head><body><p>{sources['Kettles']}</p>"
                                "</body></html>".encode())

    # kills once the whole request was sent: while it is read, extracted, chunked, embedded, stored
    for round_, delay in enumerate([0.0] + [rng.uniform(0.0, 2.0) for _ in range(3)]):
        name = f"indexed-{round_}"
        sources[name] = text_of(rng, 400)  # ~40 KB: a few dozen chunks to embed
        sock, body = raw_upload(server, name + ".txt", sources[name].encode())
        with sock:
            sock.sendall(body)
            time.sleep(delay)  # the kill moment, drawn at random; nothing waits on it
            server.kill()
        rows = check_database(muse_home, sources)
        check_uploads(muse_home, rows["documents"])  # temp files may be left: the kill came mid-write
        titles = sorted(d["title"] for d in rows["documents"])
        assert {"big", "Kettles"} <= set(titles)

        server = servers()  # restarts clean: the listing is what was stored, the temp files are gone
        listed = server.http.get("/api/kb/documents").json()["data"]
        assert sorted(d["title"] for d in listed) == titles and all(d["chunks"] for d in listed)
        assert check_uploads(muse_home, rows["documents"]) == []

    # the same name again, to the end this time
    sources["indexed-0"] = text_of(rng, 6)
    assert upload(server, "indexed-0.txt", sources["indexed-0"].encode())["status"] in ("added", "updated")
    assert server.http.get("/api/kb/search", params={"q": "kettle warranty"}).json()["data"]
    server.stop()
    rows = check_database(muse_home, sources)
    assert check_uploads(muse_home, rows["documents"]) == []


# -- C: kills at random moments during mixed chat ------------------------------------------------

class ChatClient(threading.Thread):
    """Sends messages to one conversation until the server dies; records what it saw committed:
    a question once its "start" event came, a reply once its "done" event (or JSON answer) came."""

    def __init__(self, server: Server, cid: str, seed: int, stream: bool, deltas: threading.Condition,
                 counter: list[int]):
        super().__init__(daemon=True)
        self.server, self.cid, self.stream = server, cid, stream
        self.rng = random.Random(seed)
        self.deltas, self.counter = deltas, counter
        self.questions: list[str] = []
        self.replies: list[tuple[int, str]] = []  # (message id, content)
        self.error: BaseException | None = None

    def run(self) -> None:
        http = httpx.Client(base_url=self.server.url, timeout=BOUND)
        try:
            n = 0
            while True:
                n += 1
                text = f"{self.name} question {n}: {' '.join(self.rng.choice(WORDS) for _ in range(6))}?"
                body = {"content": text, "stream": self.stream, "max_tokens": self.rng.randint(3, 24),
                        "temperature": 0.8, "seed": self.rng.getrandbits(32)}
                if self.stream:
                    with http.stream("POST", f"/api/conversations/{self.cid}/messages", json=body) as r:
                        assert r.status_code == 200, r.read()
                        for event in events(r):
                            if event["type"] == "start":
                                self.questions.append(text)
                            elif event["type"] == "delta":
                                with self.deltas:
                                    self.counter[0] += 1
                                    self.deltas.notify_all()
                            elif event["type"] == "done":
                                self.replies.append((event["message_id"], event["content"]))
                            else:
                                raise AssertionError(event)
                else:
                    r = http.post(f"/api/conversations/{self.cid}/messages", json=body)
                    assert r.status_code == 200, r.text
                    self.questions.append(text)
                    self.replies.append((r.json()["message_id"], r.json()["content"]))
        except (httpx.TransportError, httpx.StreamError):
            pass  # the server was killed
        except BaseException as e:  # noqa: BLE001 — reported by the test
            self.error = e
        finally:
            http.close()
            with self.deltas:  # the test waits for deltas or for every client to be gone
                self.deltas.notify_all()


def test_kills_at_random_moments_during_chat(servers, muse_home):
    rng = random.Random(5)
    server = servers()
    cids = [new_conversation(server) for _ in range(3)]
    questions: dict[str, list[str]] = {cid: [] for cid in cids}
    replies: dict[int, str] = {}
    for round_ in range(5):
        deltas, counter = threading.Condition(), [0]
        clients = [ChatClient(server, cid, rng.getrandbits(32), stream=i < 2, deltas=deltas, counter=counter)
                   for i, cid in enumerate(cids)]
        for c in clients:
            c.start()
        kill_after = rng.randint(1, 40)  # the kill moment, in reply tokens streamed
        with deltas:
            assert deltas.wait_for(lambda: counter[0] >= kill_after or not any(c.is_alive() for c in clients),
                                   BOUND), server.tail()
        server.kill()
        for c in clients:
            c.join(BOUND)
            assert not c.is_alive() and c.error is None, (c.error, server.tail())
            questions[c.cid] += c.questions
            replies.update(c.replies)
        assert counter[0] >= kill_after, server.tail()

        rows = check_database(muse_home)
        stored = {m["id"]: m for m in rows["messages"]}
        for mid, content in replies.items():  # every reply a client saw complete, as it saw it
            assert stored[mid]["role"] == "assistant" and stored[mid]["content"] == content
        for cid, asked in questions.items():  # every question whose reply had begun, in order
            mine = [m["content"] for m in rows["messages"] if m["conversation_id"] == cid and m["role"] == "user"]
            assert [q for q in mine if q in asked] == asked
        server = servers()

    total = {cid: len(server.http.get(f"/api/conversations/{cid}").json()["messages"]) for cid in cids}
    assert sum(total.values()) >= sum(map(len, questions.values())) + len(replies)
    done = chat(server, cids[0], "One more question?", max_tokens=6)
    assert done["message_id"] not in replies
    server.stop()
    check_database(muse_home)


def test_remove_stale_temps_keeps_what_a_live_process_writes(tmp_path):
    from muse.fileio import remove_stale_temps

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {"stale": f".notes.txt.tmp-{dead.pid}-140000", "mine": f".notes.txt.tmp-{os.getpid()}-1",
             "final": "notes.txt", "other": ".notes.txt.tmp-draft"}
    for name in names.values():
        (tmp_path / name).write_text("x")
    (tmp_path / f".folder.tmp-{dead.pid}-1").mkdir()
    assert remove_stale_temps(tmp_path) == [tmp_path / names["stale"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [names["mine"], names["final"], names["other"], f".folder.tmp-{dead.pid}-1"])
    assert remove_stale_temps(tmp_path / "missing") == []
