"""Hostile and careless input to document ingestion: every file ends as text or as "skipped: why",
within the limits (`muse.apps.extract.Limits`), and one bad file never stops a folder or an upload.

The hostile files are built in code (tests/hostile.py), a few hundred kilobytes each. No assertion
is on time: the limits are asserted by the reasons they give and by the worker's peak memory; a
hang is caught by a generous join, not measured.
"""

from __future__ import annotations

import io
import os
import socket
import threading
import time
import zipfile

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from muse.apps import extract as ex_mod
from muse.apps.extract import CANCELLED, LIMITS, ExtractError, Extractor, Limits, extract, extract_bytes, parse
from muse.apps.kb import KnowledgeBase
from muse.server import ServerThread, create_app
from muse.server.security import Limits as ServerLimits
from tests.helpers import LOCAL
from tests.hostile import W, docx_with_xml, flate_bomb_pdf, lying_docx, many_pages_pdf, nested_html, slow_html, \
    unclosed_tags_html

MB = 1_000_000


@pytest.fixture(scope="module")
def bombs():
    return {"bomb.docx": docx_with_xml(300 * MB), "flate.pdf": flate_bomb_pdf(), "pages.pdf": many_pages_pdf()}


def finishes(fn, seconds: float = 300):
    """fn() run in a thread; fails (instead of hanging the suite) if it never returns, e.g. on a FIFO."""
    result = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 — raised again in the test's thread
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn} did not finish: something blocked"
    if "error" in result:
        raise result["error"]
    return result["value"]


# -- each extractor is bounded ------------------------------------------------------------------


def test_deeply_nested_and_unclosed_html_is_read_in_one_pass():
    assert extract_bytes(nested_html(), "html").text == "Deep text."
    assert extract_bytes(unclosed_tags_html(), "html").text == "Before."
    # Malformations that make scanners backtrack: each gives its text or a clear reason.
    assert extract_bytes(b"<p>Kept.</p><!--" + b"<!--" * 100_000, "html").text == "Kept."
    assert extract_bytes(b"<p>Kept.</p>" + b'<a x="' * 100_000, "html").text == "Kept."
    assert extract_bytes(b"<p>Kept.</p>" + b"</" * 100_000, "html").text == "Kept."
    assert extract_bytes(b"<p>Kept &#" + b"9" * 100_000 + b";</p>", "html").text.startswith("Kept &#999")
    assert extract_bytes(b"<p>a < b</p><script>" + b"<p>x" * 10_000, "html").text == "a < b"


def test_html_keeps_paragraphs_lines_and_drops_hidden_markup():
    doc = parse(b"<title>Bike &amp; shop</title><p>Opens at <b>nine</b>.</p>before<br>after<br/>"
                b"<ul><li>Bells</li><li>Locks</li></ul><noscript>no</noscript><template><p>t</p></template>"
                b"<textarea>typed</textarea><div></div><div></div>end &lt;x&gt;", "html")
    assert doc.title == "Bike & shop"
    assert doc.text == "Opens at nine.\n\nbefore\nafter\n\nBells\n\nLocks\n\ntyped\n\nend <x>"


def test_a_zip_bomb_docx_is_refused_before_inflating(bombs):
    with Extractor() as ex:
        bomb = "this looks like a zip bomb"
        with pytest.raises(ExtractError, match=rf"inflates to 300 MB of XML \(limit 64 MB\); {bomb}"):
            ex.extract_bytes(bombs["bomb.docx"], "docx")
        # Under the size limit but inflating ~250-fold: refused by the ratio.
        with pytest.raises(ExtractError, match=rf"inflates \d+-fold, .* to 20 MB \(limit 200-fold\); {bomb}"):
            ex.extract_bytes(docx_with_xml(20 * MB), "docx")
        # Headers that lie are not trusted: reading stops at the declared size and the CRC fails.
        with pytest.raises(ExtractError, match="damaged Word document|zip bomb"):
            ex.extract_bytes(lying_docx(), "docx")
        # And a many-entry archive is refused from its end record, before the directory is parsed.
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for i in range(LIMITS.zip_entries + 1):
                z.writestr(f"{i}", b"")
        with pytest.raises(ExtractError, match=r"10,001 entries \(limit 10,000\)"):
            ex.extract_bytes(buf.getvalue(), "docx")
        assert ex.extract_bytes(docx_with_xml(200_000), "docx").text.startswith("AAAA")  # the worker is fine
    assert 0 < ex.peak_rss < 300 * MB  # nothing was inflated: the worker stayed small


def test_docx_xml_with_a_dtd_is_refused():
    xml = (b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">]>'
           b'<w:document xmlns:w="' + W.encode() + b'"><w:body><w:p><w:r><w:t>&b;</w:t></w:r></w:p></w:body>'
           b"</w:document>")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("word/document.xml", xml)
    with pytest.raises(ExtractError, match="DTD"):
        extract_bytes(buf.getvalue(), "docx")


def test_pdf_bombs_and_page_floods_are_refused(bombs):
    with Extractor() as ex:
        with pytest.raises(ExtractError, match=r"inflates past 64 MB in one stream .*decompression bomb"):
            ex.extract_bytes(bombs["flate.pdf"], "pdf")
        with pytest.raises(ExtractError, match=r"a PDF of 60,000 pages \(limit 2,000\)"):
            ex.extract_bytes(bombs["pages.pdf"], "pdf")
        with pytest.raises(ExtractError, match="page tree entry limit|more than 2,000 pages"):
            ex.extract_bytes(many_pages_pdf(60_000, count=1), "pdf")  # a page tree that lies about its size
        assert ex.extract_bytes(many_pages_pdf(20), "pdf").text.count("Page") == 20
    assert ex.peak_rss < 600 * MB


def test_text_and_file_size_caps():
    small = Limits(text_chars=1_000, file_bytes=10_000)
    with pytest.raises(ExtractError, match=r"holds 3,000 characters of text \(limit 1,000\); split it"):
        extract_bytes(b"x" * 3_000, "text", limits=small)
    with pytest.raises(ExtractError, match=r"more than 1,250 characters of text \(limit 1,000\)"):
        extract_bytes(b"x" * 5_000, "text", limits=small)  # refused from its size, before decoding
    with pytest.raises(ExtractError, match=r"characters of text \(limit 1,000\)"):
        extract_bytes(b"<p>" + b"word " * 1_500 + b"</p>", "html", limits=small)
    with pytest.raises(ExtractError, match=r"the file is 20,000 bytes \(limit 10,000 bytes per file\)"):
        extract_bytes(b"x" * 20_000, "text", limits=small)
    assert parse(b"a \t\n\n\n\n  b" + b" " * 1_000_000, "text").text == "a\n\n  b"  # tidying is linear


def test_the_worker_is_killed_past_its_time_and_memory_limits(bombs):
    with Extractor(Limits(seconds=0.2)) as ex:
        with pytest.raises(ExtractError, match=r"took longer than 0.2 s \(the limit\)"):
            ex.extract_bytes(slow_html(), "html")
        assert ex.extract_bytes(b"<p>Next file.</p>", "html").text == "Next file."  # a fresh worker
    hungry = Limits(memory_bytes=150 * MB, pdf_stream_bytes=1_000 * MB)  # the stream may inflate, memory not
    with pytest.raises(ExtractError, match="memory"):
        extract_bytes(bombs["flate.pdf"], "pdf", limits=hungry)


def test_cancel_kills_the_work_in_progress():
    ex = Extractor()
    errors = []

    def work():
        try:
            ex.extract_bytes(slow_html(), "html")
        except ExtractError as e:
            errors.append(str(e))

    thread = threading.Thread(target=work)
    thread.start()
    while ex._worker is None and thread.is_alive():
        threading.Event().wait(0.01)
    worker = ex._worker
    ex.cancel()
    thread.join(120)
    assert errors == [CANCELLED] and worker.proc.poll() is not None
    with pytest.raises(ExtractError, match=CANCELLED):
        ex.extract_bytes(b"<p>later</p>", "html")


def test_the_worker_loads_neither_torch_nor_numpy():
    """Its start and its memory stay small (the parser's own needs): muse/__init__ is not run there."""
    with Extractor() as ex:
        ex.extract_bytes(b"<p>x</p>", "html")
        maps = f"/proc/{ex._worker.proc.pid}/maps"
        if not os.path.exists(maps):
            pytest.skip("no /proc here")
        loaded = open(maps).read()
        assert "torch" not in loaded and "numpy" not in loaded


def test_limits_are_validated():
    with pytest.raises(ValueError, match="seconds must be a positive number"):
        Limits(seconds=0)
    with pytest.raises(ValueError, match="zip_ratio"):
        Limits(zip_ratio=0.5)


# -- a folder never stops on a bad file ---------------------------------------------------------


def test_fifos_devices_sockets_and_link_loops_are_skipped_never_opened(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a_notes.txt").write_text("The blue door is at the end of the hall.")
    os.mkfifo(folder / "pipe.txt")
    os.mkfifo(folder / "pipe")  # no document suffix: still reported, it is not a file at all
    os.symlink("/dev/null", folder / "null.md")
    os.symlink("loop.txt", folder / "loop.txt")
    os.symlink("..", folder / "sub" / "up")  # a folder link back to the folder being read
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "s.sock"))
    (folder / "z_last.md").write_text("# Last\n\nRead after all of them.")
    try:
        report = finishes(lambda: KnowledgeBase(embeddings="none").add(folder))
    finally:
        sock.close()
    assert sorted(os.path.basename(p) for p in report.added) == ["a_notes.txt", "z_last.md"]
    reasons = {os.path.basename(p): r for p, r in report.skipped}
    assert "FIFO (named pipe), not a regular file: not read" in reasons["pipe.txt"]
    assert "FIFO" in reasons["pipe"] and "character device" in reasons["null.md"]
    assert "socket" in reasons["s.sock"] and "symbolic link loop" in reasons["loop.txt"]
    assert "loop" in reasons["up"]
    # Named directly, the same; and extract() refuses a FIFO without opening it.
    again = finishes(lambda: KnowledgeBase(embeddings="none").add([folder / "pipe.txt", folder / "null.md"]))
    assert [r for _, r in again.skipped] == [reasons["pipe.txt"], reasons["null.md"]]
    with pytest.raises(ExtractError, match="FIFO"):
        finishes(lambda: extract(folder / "pipe.txt"))


def test_a_folder_with_corrupt_and_hostile_files_adds_the_rest(tmp_path, bombs):
    for name, data in {**bombs, "broken.pdf": b"%PDF-1.4\n1 0 obj << /Type /Catalog", "deep.html": nested_html(),
                       "empty.txt": b"", "good.md": b"# Good\n\nThe kettle is blue.", "zz.txt": b"Last one."}.items():
        (tmp_path / name).write_bytes(data)
    kb = KnowledgeBase(embeddings="none")
    report = finishes(lambda: kb.add(tmp_path))
    assert sorted(os.path.basename(p) for p in report.added) == ["deep.html", "good.md", "zz.txt"]
    reasons = {os.path.basename(p): r for p, r in report.skipped}
    assert set(reasons) == {"bomb.docx", "flate.pdf", "pages.pdf", "broken.pdf", "empty.txt"}
    assert "zip bomb" in reasons["bomb.docx"] and "decompression bomb" in reasons["flate.pdf"]
    assert "60,000 pages" in reasons["pages.pdf"] and "damaged PDF" in reasons["broken.pdf"]
    assert kb.search("kettle blue", k=1)[0].title == "Good"


def test_an_unchanged_file_is_not_extracted_again(tmp_path, monkeypatch):
    (tmp_path / "page.html").write_bytes(b"<p>The shop opens at nine.</p>")
    kb = KnowledgeBase(embeddings="none")
    assert len(kb.add(tmp_path).added) == 1
    monkeypatch.setattr(Extractor, "extract_bytes", lambda *a, **k: pytest.fail("extracted again"))
    assert len(kb.add(tmp_path).unchanged) == 1


def test_cli_kb_add_reports_a_fifo_and_adds_the_rest(tmp_path):
    from muse.cli import app

    (tmp_path / "notes.txt").write_text("The blue door is at the end of the hall.")
    os.mkfifo(tmp_path / "pipe.txt")
    r = finishes(lambda: CliRunner().invoke(app, ["kb", "add", str(tmp_path), "--no-embeddings"],
                                            catch_exceptions=False))
    assert r.exit_code == 0 and "1 added, 0 updated, 0 unchanged, 1 skipped" in r.output
    assert "pipe.txt: a FIFO (named pipe), not a regular file: not read" in r.output.replace("\n", "")


# -- uploads ------------------------------------------------------------------------------------


@pytest.fixture
def server_app(tiny):
    return create_app({"tiny": tiny}, embedder=None,
                      limits=ServerLimits(max_body_bytes=24 * MB))


def upload(client, *files: tuple[str, bytes]):
    return client.post("/api/kb/documents", files=[("files", (n, d, "application/octet-stream")) for n, d in files])


def test_an_uploaded_bomb_is_a_400_with_the_reason_never_a_500(server_app, bombs, muse_home):
    with TestClient(server_app, base_url=LOCAL) as client:
        for name, reason in (("bomb.docx", "zip bomb"), ("flate.pdf", "decompression bomb"),
                             ("pages.pdf", "60,000 pages"), ("deep.html", None)):
            data = nested_html() if name == "deep.html" else bombs[name]
            r = upload(client, ("good.txt", b"Fine text."), (name, data))
            if reason is None:
                assert r.status_code == 201, r.text
                continue
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == "files" and err["message"].startswith(f"{name}: ") and reason in err["message"]
            assert not (muse_home / "uploads" / name).exists()
        assert sorted(d["title"] for d in client.get("/api/kb/documents").json()["data"]) == ["deep", "good"]


def test_an_upload_is_extracted_once(server_app, monkeypatch):
    calls = []
    real = Extractor.extract_bytes

    def counted(self, data, kind, default_title=""):
        calls.append(default_title)
        return real(self, data, kind, default_title)

    monkeypatch.setattr(Extractor, "extract_bytes", counted)
    with TestClient(server_app, base_url=LOCAL) as client:
        assert upload(client, ("a.html", b"<p>One.</p>"), ("b.txt", b"Two.")).status_code == 201
        assert calls == ["a", "b"]
        assert [d["status"] for d in upload(client, ("a.html", b"<p>One.</p>")).json()["data"]] == ["unchanged"]
        assert calls == ["a", "b"]  # unchanged bytes: not extracted at all


def test_a_client_that_leaves_stops_its_extraction(server_app, monkeypatch):
    """The worker is made to hang (its call waits until it is killed): only the server's cancel on
    the client's disconnect can end it. The client leaves only once the worker is busy, so a slow
    machine cannot make it leave before the extraction has started."""
    busy, started = [], threading.Event()

    def hang(self, request, data):
        busy.append(self)
        started.set()
        for _ in range(2400):  # 120 s at most, then the test fails below
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        return None

    monkeypatch.setattr(ex_mod._Worker, "call", hang)
    with ServerThread(server_app) as server:
        upload = httpx.Request("POST", server.url + "/api/kb/documents",
                               files=[("files", ("page.html", b"<p>Hi.</p>"))])
        body = upload.read()
        head = "".join(f"{k}: {v}\r\n" for k, v in upload.headers.items())
        host, port = upload.url.host, upload.url.port
        with socket.create_connection((host, port)) as client:
            client.sendall(f"POST {upload.url.raw_path.decode()} HTTP/1.1\r\n{head}\r\n".encode() + body)
            assert started.wait(300), "the upload never reached the extraction worker"
        worker = busy[0]  # the client has closed its connection: the server must cancel
        assert worker.proc.wait(timeout=150) is not None  # killed by the cancel
        assert httpx.get(server.url + "/api/kb/documents").json()["data"] == []
