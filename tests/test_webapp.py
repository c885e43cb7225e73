"""The web app in real headless Chromium (Playwright, the system's /usr/bin/chromium): chat with a
streamed answer, stop, feedback; a document uploaded and a cited answer; a writer action with its
diff and history; the language switch; the API key prompt. The default model answers (few tokens).

Each test leaves a screenshot in /tmp/muse_shots/ for a person to look at.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import httpx
import pytest

from muse.server import ServerThread, create_app
from tests.helpers import tiny_model

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path("/tmp/muse_shots")
DOC = ("The Zorblax warranty lasts exactly seven years from the date of purchase. Repairs are free during "
       "that time.\n\nThe Zorblax factory is in Lyon and makes blue kettles.")
TEXT = "The meeting, which had been scheduled for Monday, has now been moved to Tuesday afternoon at three."

if not CHROMIUM.exists() and not os.environ.get("CI"):
    pytest.skip("Chromium is not installed at /usr/bin/chromium (apt install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM))  # the system's browser: never downloaded
        yield b
        b.close()


@pytest.fixture(scope="module")
def app(default_model):
    return create_app({"smollm2-135m": default_model}, embedder=None)


@pytest.fixture(scope="module")
def server(app):
    with ServerThread(app) as s:
        yield s


def open_page(browser, url: str, locale: str = "en-US", max_tokens: int = 12):
    """A fresh browser context (empty localStorage) on the web app, its data loaded."""
    context = browser.new_context(locale=locale, viewport={"width": 1280, "height": 800})
    context.add_init_script(f"localStorage.getItem('muse.maxTokens') || localStorage.setItem('muse.maxTokens', "
                            f"'{max_tokens}')")
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # what the Content-Security-Policy blocked would break the page silently: count it as an error
    page.on("console", lambda m: m.type == "error" and "Content Security Policy" in m.text and errors.append(m.text))
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready=true]")
    return page, errors


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / name))


def words(text: str) -> str:
    return " ".join(text.split())


def api(server, path: str):
    return httpx.get(server.url + path).json()


def test_chat_streams_an_answer_takes_feedback_and_stops(browser, server, app):
    page, errors = open_page(browser, server.url)
    with page.expect_response(lambda r: r.url.endswith("/messages")) as reply:
        page.fill("#chat-input", "Write a Python function that adds two numbers.")
        page.press("#chat-input", "Enter")
    assert reply.value.headers["content-type"].startswith("text/event-stream")
    page.wait_for_selector(".message.assistant .feedback")
    [conv] = api(server, "/api/conversations")["data"]
    stored = api(server, f"/api/conversations/{conv['id']}")["messages"]
    shown = page.inner_text(".message.assistant .body")
    assert stored[1]["role"] == "assistant" and stored[1]["content"].strip()
    content = stored[1]["content"]
    assert words(shown) == words(re.sub(r"```\w*", "", content))  # the saved reply, rendered as Markdown
    assert page.locator(".message.assistant .body pre code").count() == (1 if "```" in content else 0)
    assert page.inner_text("#conv-title") == conv["title"] == "Write a Python function that adds two numbers."
    assert page.inner_text("#conv-list") == conv["title"]

    page.click(".message.assistant .rate.up")
    page.fill(".message.assistant .comment input", "short and right")
    page.click(".message.assistant .comment button")
    page.wait_for_selector(".message.assistant .comment", state="hidden")
    [fb] = api(server, "/api/feedback")["data"]
    assert (fb["rating"], fb["comment"], fb["message_id"]) == (1, "short and right", stored[1]["id"])
    shot(page, "chat.png")

    # Stop: the fetch is aborted, the server frees the model and keeps the reply so far
    page.fill("#max-tokens", "400")
    page.dispatch_event("#max-tokens", "change")
    page.fill("#chat-input", "Tell me a very long story about a dragon.")
    page.press("#chat-input", "Enter")
    page.wait_for_function("() => document.querySelectorAll('.message.assistant .body')[1]?.textContent.length > 5")
    page.click("#stop")
    page.wait_for_selector(".message.assistant .note")
    assert page.is_visible("#send") and not page.is_visible("#stop")
    scheduler = app.state.service.scheduler()
    deadline = time.time() + 10
    while scheduler.active and time.time() < deadline:
        time.sleep(0.02)
    assert scheduler.active == 0
    page.wait_for_function("() => document.querySelectorAll('.message.assistant[data-message-id]').length == 2")
    last = api(server, f"/api/conversations/{conv['id']}")["messages"][-1]
    assert last["meta"]["finish_reason"] == "stopped" and last["meta"]["generation_tokens"] < 400
    assert errors == []


def test_conversations_render_sanitised_markdown_and_can_be_renamed_and_deleted(browser, server):
    evil = ("Here is code:\n\n```python\nprint('hi')\n```\n\n<img src=x onerror=\"window.pwned=1\">"
            "<script>window.pwned=2</script>")
    chat = {"title": "Imported", "messages": [{"role": "user", "content": "Show me"},
                                              {"role": "assistant", "content": evil}]}
    cid = httpx.post(server.url + "/api/conversations/import", json={"text": json.dumps(chat)}).json()["id"]
    page, errors = open_page(browser, server.url)
    page.click(f"#conv-list li[data-id='{cid}'] button")
    page.wait_for_selector(".message.assistant pre code")
    assert page.inner_text(".message.assistant pre code").strip() == "print('hi')"
    assert page.evaluate("window.pwned") is None
    assert page.locator(".message.assistant script, .message.assistant [onerror]").count() == 0

    page.once("dialog", lambda d: d.accept("Renamed here"))
    page.click("#rename-chat")
    page.wait_for_function("() => document.querySelector('#conv-title').textContent === 'Renamed here'")
    assert api(server, f"/api/conversations/{cid}")["title"] == "Renamed here"
    page.once("dialog", lambda d: d.accept())
    page.click("#delete-chat")
    page.wait_for_selector(f"#conv-list li[data-id='{cid}']", state="detached")
    # DOMPurify parses the hostile HTML before removing it, and the browser may try its onerror
    # there: the Content-Security-Policy blocks that too (and says so), which is no fault of the page.
    errors = [e for e in errors if not e.startswith("Executing inline event handler violates")]
    assert cid not in [c["id"] for c in api(server, "/api/conversations")["data"]] and errors == []


def test_documents_upload_and_a_cited_answer(browser, server, tmp_path):
    page, errors = open_page(browser, server.url)
    page.click("[data-view=docs]")
    doc = tmp_path / "warranty.txt"
    doc.write_text(DOC)
    page.set_input_files("#upload-input", str(doc))
    page.click("#upload-form button[type=submit]")
    page.wait_for_selector("#doc-list .doc-title")
    assert page.inner_text("#doc-list .doc-title") == "warranty"
    assert [d["title"] for d in api(server, "/api/kb/documents")["data"]] == ["warranty"]

    page.fill("#ask-input", "How long does the Zorblax warranty last?")
    page.click("#ask-button")
    page.wait_for_selector("#ask-button", state="visible")
    assert page.inner_text("#answer").strip()
    cited = page.inner_text("#citations li .passage")
    assert "seven years" in cited and page.inner_text("#citations li .cite-title") == "[1] warranty"
    shot(page, "docs.png")

    page.on("dialog", lambda d: d.accept())
    page.click("#doc-list button")
    page.wait_for_selector("#doc-list .empty")
    assert api(server, "/api/kb/documents")["data"] == [] and errors == []


def test_writing_desk_shows_the_result_its_diff_and_restores(browser, server, tmp_path):
    page, errors = open_page(browser, server.url)
    page.click("[data-view=desk]")
    (tmp_path / "memo").write_text(TEXT)
    page.set_input_files("#desk-file", str(tmp_path / "memo"))  # open a file: its text and its name
    page.wait_for_function(f"() => document.querySelector('#desk-text').value === {json.dumps(TEXT)}")
    assert page.input_value("#desk-doc") == "memo"
    page.select_option("#desk-action", "shorten")
    assert not page.is_visible("#desk-to") and page.is_visible("#desk-run")
    page.click("#desk-run")
    page.wait_for_selector("#desk-history li[data-seq='2']")
    new_text = page.input_value("#desk-text")
    versions = api(server, "/api/write/versions?document=memo")["data"]
    assert [(v["seq"], v["action"]) for v in versions] == [(1, "original"), (2, "shorten")]
    assert new_text == httpx.get(server.url + "/api/write/versions/2?document=memo").json()["content"]
    # the diff shows both sides: kept + deleted text is the old version, kept + inserted the new one
    old = page.evaluate("[...document.querySelectorAll('#desk-diff > :not(ins)')].map(e => e.textContent).join('')")
    new = page.evaluate("[...document.querySelectorAll('#desk-diff > :not(del)')].map(e => e.textContent).join('')")
    assert (old, new) == (TEXT, new_text) and page.locator("#desk-diff ins, #desk-diff del").count() > 0
    shot(page, "desk.png")

    page.click("#desk-history li[data-seq='1'] button.small")  # restore the original
    page.wait_for_selector("#desk-history li[data-seq='3']")
    assert page.input_value("#desk-text") == TEXT
    assert api(server, "/api/write/versions?document=memo")["data"][-1]["action"] == "restore 1"
    assert errors == []


def test_the_language_follows_the_browser_and_switches(browser, server):
    page, errors = open_page(browser, server.url, locale="zh-CN")
    assert page.inner_text("[data-view=chat]") == "对话" and page.inner_text("#send") == "发送"
    shot(page, "chat_zh.png")
    page.click("#lang-toggle")
    assert page.inner_text("[data-view=chat]") == "Chat" and page.inner_text("#send") == "Send"
    assert page.get_attribute("#chat-input", "placeholder").startswith("Message Muse")
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.inner_text("[data-view=desk]") == "Writing desk"  # the choice is kept
    page.click("#lang-toggle")
    page.click("[data-view=desk]")
    assert page.inner_text("#desk-run") == "运行" and page.inner_text("#desk-action option[value=shorten]") == "缩写"
    shot(page, "desk_zh.png")
    assert errors == []


def test_the_page_asks_for_the_api_key_once(browser, default_model):
    app = create_app({"tiny": tiny_model(default_model.tokenizer)}, embedder=None, api_key="sekrit")
    with ServerThread(app) as s:
        context = browser.new_context(locale="en-US")
        page = context.new_page()
        page.goto(s.url + "/")
        page.wait_for_selector("#key-dialog[open]")
        shot(page, "api_key.png")
        page.fill("#key-input", "wrong")
        page.click("#key-form button")
        page.wait_for_selector("#key-error:not([hidden])")  # asked again, saying the key was wrong
        page.fill("#key-input", "sekrit")
        page.click("#key-form button")
        page.wait_for_selector("body[data-ready=true]")
        assert page.evaluate("localStorage.getItem('muse.apiKey')") == "sekrit"
        page.reload()
        page.wait_for_selector("body[data-ready=true]")
        assert not page.is_visible("#key-dialog")
        context.close()


# -- a web page the user visits must not drive the server -------------------------------------------

ATTACK = """<!doctype html><title>cute cats</title><body>
<iframe name="sink"></iframe>
<form id="f" method="POST" action="MUSE/api/memories" enctype="text/plain" target="sink">
  <input name='{"fact": "planted by a form", "x": "' value='"}'></form>
<script>
(async () => {
  const muse = "MUSE";
  const fd = new FormData();
  fd.append("files", new Blob(["planted document"], {type: "text/plain"}), "planted.txt");
  const tries = [
    fetch(muse + "/api/kb/documents", {method: "POST", mode: "no-cors", body: fd}),
    fetch(muse + "/api/memories", {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"},
                                   body: JSON.stringify({fact: "planted by fetch"})}),
    fetch(muse + "/api/conversations").then(r => r.text()).then(t => { window.stolen = t; }),
  ];
  await Promise.allSettled(tries);
  document.getElementById("f").submit();
  document.querySelector("iframe").onload = () => { document.title = "done"; };
})();
</script></body>"""


@pytest.fixture(scope="module")
def attacker_browser(browser):
    """A browser in which attacker.test and rebind.test resolve to this machine (a DNS-rebinding
    attacker controls what their names resolve to)."""
    b = browser.browser_type.launch(executable_path=str(CHROMIUM), args=[
        "--host-resolver-rules=MAP attacker.test 127.0.0.1, MAP rebind.test 127.0.0.1"])
    yield b
    b.close()


def serve_page(html: str):
    """A one-page web server on a free loopback port (the attacker's site)."""
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def test_a_page_on_another_site_cannot_change_or_read_anything(attacker_browser, server):
    memories_before = api(server, "/api/memories")["data"]
    httpd = serve_page(ATTACK.replace("MUSE", server.url))
    try:
        page = attacker_browser.new_context().new_page()
        page.goto(f"http://attacker.test:{httpd.server_address[1]}/")
        page.wait_for_function("() => document.title === 'done'")  # every attempt has been answered
        assert page.evaluate("window.stolen") is None  # the same-origin policy kept the reply from the page
        page.context.close()
    finally:
        httpd.shutdown()
    assert api(server, "/api/kb/documents")["data"] == []
    assert api(server, "/api/memories")["data"] == memories_before


def test_a_dns_rebinding_page_is_refused(attacker_browser, server):
    page = attacker_browser.new_context().new_page()
    # After rebinding, the attacker's name points at 127.0.0.1: the browser sends Host rebind.test.
    response = page.goto(f"http://rebind.test:{server.port}/api/conversations")
    assert response.status == 403 and "DNS rebinding" in page.content()
    response = page.goto(f"http://rebind.test:{server.port}/")
    assert response.status == 403
    page.context.close()


def test_the_web_app_page_is_protected(server):
    r = httpx.get(server.url + "/")
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"] and r.headers["x-frame-options"] == "DENY"
    token = re.search(r'name="muse-token" content="([^"]+)"', r.text).group(1)
    browser_like = {"Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "same-origin"}
    assert httpx.get(server.url + "/api/conversations", headers=browser_like).status_code == 403
    assert httpx.get(server.url + "/api/conversations", headers={**browser_like, "X-Muse-Token": token}).is_success
