"""Soak: `muse serve` under mixed, abusive and hostile traffic on loopback, bounded in time and count.

    .venv/bin/python bench/soak.py                       # 60 s, 8 well-behaved clients, default model
    .venv/bin/python bench/soak.py --duration 120 --clients 12 --json soak.json

It starts the real `muse serve` (a subprocess, a fresh MUSE_HOME, a free loopback port), then runs
for --duration seconds, all at once:

  well-formed   --clients threads, each looping over: chat completion (streamed or not), text
                completion, an assistant conversation message (streamed), a pasted document + a
                knowledge-base search, a remembered fact, GET /v1/models. A 429 is followed as a
                client should (wait Retry-After, send again); every other answer must be 2xx.
  abusive       slow bodies that never finish (must get 408), request heads that never finish
                (the connection is closed), bodies over the limit (413),
                malformed JSON (400), a NUL in a search (400), clients that leave mid-stream,
                idle connections held open, decompression bombs and deep HTML uploaded (400),
                a crafted checkpoint path is not reachable (the API has no such door).
  hostile       requests a web page could make: cross-origin POSTs and uploads, a rebinding
                Host name, a browser call without the launch token (all 403, nothing changed).

Every request is bounded (a client timeout), every loop stops at the deadline. The server's RSS is
sampled every second: the table shows it after warm-up, its peak, and at the end (flat memory:
end ≈ warm). Afterwards the database is checked: every message whose reply the clients saw finish
is stored, no message row is half-written, `PRAGMA integrity_check` is ok, and nothing the hostile
requests tried to plant exists.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MUSE = [sys.executable, "-c", "from muse.cli import main; main()"]


# -- the server ---------------------------------------------------------------------------------

def start_server(home: Path, body_timeout: float, log: Path) -> tuple[subprocess.Popen, int]:
    """`muse serve` on a free port; its log goes to `log` (read it for any 500)."""
    env = dict(os.environ, MUSE_HOME=str(home))
    proc = subprocess.Popen(MUSE + ["serve", "--port", "0", "--body-timeout", str(body_timeout),
                                    "--max-body-mb", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    out = log.open("w")
    for line in proc.stdout:  # the log line that names the port uvicorn bound
        out.write(line)
        m = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
        if m:
            threading.Thread(target=lambda: out.writelines(proc.stdout), daemon=True).start()  # keep draining
            return proc, int(m.group(1))
    raise SystemExit(f"muse serve exited with {proc.wait()} before listening")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# -- the clients ----------------------------------------------------------------------------------

class Tally:
    """What was sent and what came back, by kind of request (thread-safe)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.answers: dict[str, Counter] = defaultdict(Counter)
        self.unexpected: list[str] = []
        self.replies_seen: set[str] = set()  # assistant replies that finished on the client's side

    def add(self, kind: str, status: "int | str", ok: bool, detail: str = "") -> None:
        with self.lock:
            self.answers[kind][status] += 1
            if not ok:
                self.unexpected.append(f"{kind}: {status} {detail[:200]}")


def send(http: httpx.Client, tally: Tally, kind: str, method: str, path: str, deadline: float, **kw) -> httpx.Response | None:
    """One well-formed request, sent again after a 429 (as its Retry-After says) until the deadline."""
    while True:
        try:
            r = http.request(method, path, **kw)
        except httpx.HTTPError as e:
            tally.add(kind, type(e).__name__, False, str(e))
            return None
        if r.status_code == 429 and time.monotonic() < deadline:
            tally.add(kind, 429, True)
            time.sleep(float(r.headers.get("retry-after", "1")))
            continue
        tally.add(kind, r.status_code, r.is_success, r.text)
        return r


def well_formed(url: str, tally: Tally, deadline: float, seed: int) -> None:
    rnd = random.Random(seed)
    with httpx.Client(base_url=url, timeout=120) as http:
        r = send(http, tally, "conversation", "POST", "/api/conversations", deadline, json={})
        cid = r.json()["id"] if r is not None and r.is_success else None
        i = 0
        while time.monotonic() < deadline:
            i += 1
            step = rnd.choice(["chat", "chat_stream", "completion", "message", "kb", "memory", "models"])
            if step == "chat":
                send(http, tally, step, "POST", "/v1/chat/completions", deadline, json={
                    "model": "smollm2-135m", "max_tokens": 12, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Say a word about the number {i}."}]})
            elif step == "chat_stream":
                stream_chat(http, tally, deadline, i)
            elif step == "completion":
                send(http, tally, step, "POST", "/v1/completions", deadline,
                     json={"model": "smollm2-135m", "prompt": f"Once upon a time {i}", "max_tokens": 10})
            elif step == "message" and cid:
                message(http, tally, cid, f"Give me one short tip number {i}.", deadline)
            elif step == "kb":
                send(http, tally, "kb_text", "POST", "/api/kb/text", deadline,
                     json={"name": f"note-{seed}-{i}", "text": f"Kettle number {seed}-{i} is blue and boils fast."})
                send(http, tally, "kb_search", "GET", "/api/kb/search", deadline, params={"q": "blue kettle"})
            elif step == "memory":
                send(http, tally, step, "POST", "/api/memories", deadline, json={"fact": f"I like tea {seed}-{i}"})
            else:
                send(http, tally, step, "GET", "/v1/models", deadline)


def stream_chat(http: httpx.Client, tally: Tally, deadline: float, i: int) -> None:
    body = {"model": "smollm2-135m", "max_tokens": 12, "stream": True,
            "messages": [{"role": "user", "content": f"Count to {i % 5 + 2}."}]}
    while True:
        try:
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code == 429 and time.monotonic() < deadline:
                    tally.add("chat_stream", 429, True)
                    time.sleep(float(r.headers.get("retry-after", "1")))
                    continue
                done = r.is_success and any(line == "data: [DONE]" for line in r.iter_lines())
                tally.add("chat_stream", r.status_code if done or not r.is_success else "no [DONE]", done)
                return
        except httpx.HTTPError as e:
            tally.add("chat_stream", type(e).__name__, False, str(e))
            return


def message(http: httpx.Client, tally: Tally, cid: str, text: str, deadline: float) -> None:
    """An assistant message, streamed; a reply whose "done" event arrived must be in the database."""
    while True:
        try:
            with http.stream("POST", f"/api/conversations/{cid}/messages",
                             json={"content": text, "max_tokens": 12}) as r:
                if r.status_code == 429 and time.monotonic() < deadline:
                    tally.add("message", 429, True)
                    time.sleep(float(r.headers.get("retry-after", "1")))
                    continue
                final = None
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        event = json.loads(line[6:])
                        if event.get("type") == "done":
                            final = event
                ok = r.is_success and final is not None
                tally.add("message", r.status_code if ok or not r.is_success else "no done", ok)
                if ok:
                    with tally.lock:
                        tally.replies_seen.add(text)
                return
        except httpx.HTTPError as e:
            tally.add("message", type(e).__name__, False, str(e))
            return


# -- abusive and hostile clients ------------------------------------------------------------------

def raw(port: int, data: bytes, hold: float = 0.0, timeout: float = 120) -> int | str:
    """Send raw bytes (maybe an unfinished request), keep the socket `hold` s, return the status."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(data)
            time.sleep(hold)
            head = b""
            while b"\r\n" not in head:
                chunk = s.recv(4096)
                if not chunk:
                    return "closed"
                head += chunk
            return int(head.split()[1])
    except OSError as e:
        return type(e).__name__


def post_head(port: int, path: str, length: int, ctype: str = "application/json") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def zip_bomb_docx() -> bytes:
    """A small .docx whose document.xml inflates to ~200 MB."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        with z.open("word/document.xml", "w") as f:
            block = b"<w:t>" + b"A" * (1 << 20) + b"</w:t>"
            for _ in range(200):
                f.write(block)
    return buf.getvalue()


def abusive(url: str, port: int, tally: Tally, deadline: float, seed: int) -> None:
    rnd = random.Random(seed)
    bomb, deep = zip_bomb_docx(), b"<div>" * 100_000 + b"x" + b"</div>" * 100_000
    with httpx.Client(base_url=url, timeout=120) as http:
        while time.monotonic() < deadline:
            what = rnd.choice(["slow", "slowhead", "huge", "json", "nul", "leave", "idle", "bomb", "deep"])
            if what == "slow":  # a body that never finishes: 408 after --body-timeout
                status = raw(port, post_head(port, "/api/memories", 1000) + b'{"fact": "sl')
                tally.add("slow body", status, status == 408)
            elif what == "slowhead":  # a request head that never ends: the server closes the connection
                status = raw(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                tally.add("unfinished request head", status, status == "closed")
            elif what == "huge":  # declares more than the 2 MB limit
                status = raw(port, post_head(port, "/v1/chat/completions", 50 * 1024 * 1024) + b"{")
                tally.add("oversized body", status, status == 413)
            elif what == "json":
                r = http.post("/v1/chat/completions", content=b'{"model": "smollm2-135m", "messages": [',
                              headers={"Content-Type": "application/json"})
                tally.add("malformed JSON", r.status_code, r.status_code == 400)
            elif what == "nul":
                r = http.get("/api/conversations/search", params={"q": "tea\x00"})
                tally.add("NUL in search", r.status_code, r.status_code == 400)
            elif what == "leave":  # reads two events of a long stream, then hangs up
                try:
                    with http.stream("POST", "/v1/completions", json={"model": "smollm2-135m", "prompt": "Tell a long story",
                                                                      "max_tokens": 400, "stream": True}) as r:
                        for n, _ in enumerate(r.iter_lines()):
                            if n >= 2:
                                break
                    tally.add("left mid-stream", r.status_code, r.status_code in (200, 429))
                except httpx.HTTPError as e:
                    tally.add("left mid-stream", type(e).__name__, False, str(e))
            elif what == "idle":  # connections that never send a request
                socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
                time.sleep(2)
                for s in socks:
                    s.close()
                tally.add("20 idle connections", "held 2 s", True)
            else:
                name, data = ("bomb.docx", bomb) if what == "bomb" else ("deep.html", deep)
                r = http.post("/api/kb/documents", files={"files": (name, data)})
                tally.add(f"upload {name}", r.status_code, r.status_code in (201, 400), r.text)


def hostile(url: str, port: int, tally: Tally, deadline: float) -> None:
    """What a web page in the user's browser could send."""
    planted = {"fact": "planted by a web page"}
    with httpx.Client(base_url=url, timeout=60) as http:
        while time.monotonic() < deadline:
            for kind, headers in (("cross-origin POST", {"Origin": "https://evil.example"}),
                                  ("cross-site form", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}),
                                  ("rebinding Host", {"Host": "evil.example"}),
                                  ("browser without token", {"Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "same-origin",
                                                             "Origin": url})):
                r = http.post("/api/memories", json=planted, headers=headers)
                tally.add(kind, r.status_code, r.status_code == 403)
            r = http.post("/api/kb/documents", files={"files": ("planted.txt", b"planted text")},
                          headers={"Origin": "https://evil.example"})
            tally.add("cross-origin upload", r.status_code, r.status_code == 403)
            time.sleep(0.5)


# -- the run ----------------------------------------------------------------------------------------

def check_database(home: Path, tally: Tally) -> dict:
    db = sqlite3.connect(f"file:{home / 'muse.db'}?mode=ro", uri=True)
    integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    # a user message whose reply the client saw finish, with the assistant's reply stored right after it
    answered = {r[0] for r in db.execute(
        "SELECT u.content FROM messages u JOIN messages a ON a.conversation_id = u.conversation_id "
        "AND a.id = (SELECT min(id) FROM messages WHERE conversation_id = u.conversation_id AND id > u.id) "
        "WHERE u.role = 'user' AND a.role = 'assistant' AND a.content != ''")}
    planted = db.execute("SELECT count(*) FROM memories WHERE content LIKE '%planted%'").fetchone()[0]
    planted += db.execute("SELECT count(*) FROM documents WHERE path LIKE '%planted%'").fetchone()[0]
    lost = sorted(tally.replies_seen - answered)
    return {"integrity": integrity, "messages": db.execute("SELECT count(*) FROM messages").fetchone()[0],
            "replies seen": len(tally.replies_seen), "lost": lost, "planted": planted}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of traffic (default 60)")
    ap.add_argument("--clients", type=int, default=8, help="well-behaved client threads (default 8)")
    ap.add_argument("--abusers", type=int, default=3, help="abusive client threads (default 3)")
    ap.add_argument("--body-timeout", type=float, default=5.0, help="the server's --body-timeout (default 5 s)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--log", default="soak-server.log", help="the server's log (default soak-server.log)")
    args = ap.parse_args()
    if not 1 <= args.duration <= 3600 or not 1 <= args.clients <= 64 or not 0 <= args.abusers <= 16:
        raise SystemExit("--duration must be 1..3600 s, --clients 1..64, --abusers 0..16")

    with tempfile.TemporaryDirectory(prefix="muse-soak-") as tmp:
        home = Path(tmp)
        started = time.monotonic()
        proc, port = start_server(home, args.body_timeout, Path(args.log))
        url = f"http://127.0.0.1:{port}"
        print(f"muse serve up on {url} in {time.monotonic() - started:.1f} s (pid {proc.pid}); "
              f"{args.duration:g} s of traffic; CPU: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
        tally = Tally()
        try:
            httpx.post(url + "/v1/completions", json={"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 4},
                       timeout=120)  # warm-up
            warm = rss_mb(proc.pid)
            deadline = time.monotonic() + args.duration
            threads = [threading.Thread(target=well_formed, args=(url, tally, deadline, i)) for i in range(args.clients)]
            threads += [threading.Thread(target=abusive, args=(url, port, tally, deadline, 100 + i))
                        for i in range(args.abusers)]
            threads.append(threading.Thread(target=hostile, args=(url, port, tally, deadline)))
            for t in threads:
                t.start()
            samples = [warm]
            while any(t.is_alive() for t in threads):
                time.sleep(1)
                samples.append(rss_mb(proc.pid))
            for t in threads:
                t.join()
            end = rss_mb(proc.pid)
            alive = proc.poll() is None
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        db = check_database(home, tally)
    report(tally, samples + [end], alive, db, args)


def report(tally: Tally, samples: list[float], alive: bool, db: dict, args) -> None:
    warm, peak, end = samples[0], max(samples), samples[-1]
    print("\n| request | answers | as expected |")
    print("|---|---|---|")
    for kind in sorted(tally.answers):
        answers = tally.answers[kind]
        shown = ", ".join(f"{k}: {v}" for k, v in sorted(answers.items(), key=lambda kv: -kv[1]))
        print(f"| {kind} | {shown} | {sum(answers.values())} |")
    total = sum(sum(c.values()) for c in tally.answers.values())
    print(f"\nrequests: {total}; unexpected answers: {len(tally.unexpected)}; server alive at the end: {alive}")
    for line in tally.unexpected[:20]:
        print("  unexpected:", line)
    quarters = [samples[min(len(samples) - 1, round(q * (len(samples) - 1)))] for q in (0.25, 0.5, 0.75)]
    print(f"server RSS: {warm:.0f} MB after warm-up; {' / '.join(f'{q:.0f}' for q in quarters)} MB at 1/4, 1/2, 3/4 "
          f"of the run; peak {peak:.0f} MB; {end:.0f} MB at the end, idle ({end - warm:+.0f} MB vs warm: what stays "
          f"is the embedding model and the knowledge-base index, loaded on first use)")
    print(f"database: integrity {db['integrity']}; {db['messages']} messages; {db['replies seen']} replies seen "
          f"finished, {len(db['lost'])} of them lost; {db['planted']} rows planted by hostile requests")
    if args.json:
        Path(args.json).write_text(json.dumps({"answers": {k: dict(v) for k, v in tally.answers.items()},
                                               "unexpected": tally.unexpected, "rss_mb": samples,
                                               "alive": alive, "database": db}, indent=1, default=str))
    ok = alive and not tally.unexpected and not db["lost"] and db["integrity"] == "ok" and not db["planted"]
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
