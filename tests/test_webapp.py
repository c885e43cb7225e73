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
# How long a wait for the model (a reply, an answer, a writing action) or an upload's extraction may
# take: the default 30 s ran out once on two busy cores. Waits for the page itself keep the default.
SLOW_MS = 120_000

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
    with page.expect_response(lambda r: r.url.endswith("/messages"), timeout=SLOW_MS) as reply:
        page.fill("#chat-input", "Write a Python function that adds two numbers.")
        page.press("#chat-input", "Enter")
    assert reply.value.headers["content-type"].startswith("text/event-stream")
    page.wait_for_selector(".message.assistant .feedback", timeout=SLOW_MS)
    [conv] = api(server, "/api/conversations")["data"]
    stored = api(server, f"/api/conversations/{conv['id']}")["messages"]
    shown = page.inner_text(".message.assistant .body")
    assert stored[1]["role"] == "assistant" and stored[1]["content"].strip()
    content = stored[1]["content"]
    assert words(shown) == words(re.sub(r"```\w*", "", content))  # the saved reply, rendered as Markdown
    assert page.locator(".message.assistant .body pre code").count() == (1 if "```" in content else 0)
    assert page.inner_text("#conv-title") == conv["title"] == "Write a Python function that adds two numbers."
    assert page.inner_text("#conv-list") == conv["title"]

    page.click(".message.assistant .rate.down")  # a thumbs-down offers a box for the answer wanted instead
    assert page.is_visible(".message.assistant .comment textarea")
    page.click(".message.assistant .rate.up")
    assert not page.is_visible(".message.assistant .comment textarea")
    page.fill(".message.assistant .comment input", "short and right")
    page.click(".message.assistant .comment button")
    page.wait_for_selector(".message.assistant .comment", state="hidden")
    [fb] = api(server, "/api/feedback")["data"]
    assert (fb["rating"], fb["comment"], fb["message_id"]) == (1, "short and right", stored[1]["id"])
    page.click(".message.assistant .rate.down")
    page.fill(".message.assistant .comment textarea", "def add(a, b):\n    return a + b")
    page.click(".message.assistant .comment button")
    page.wait_for_selector(".message.assistant .comment", state="hidden")
    fb = api(server, "/api/feedback")["data"][1]
    assert (fb["rating"], fb["correction"]) == (-1, "def add(a, b):\n    return a + b")
    shot(page, "chat.png")

    # Stop: the fetch is aborted, the server frees the model and keeps the reply so far
    page.fill("#max-tokens", "400")
    page.dispatch_event("#max-tokens", "change")
    page.fill("#chat-input", "Tell me a very long story about a dragon.")
    page.press("#chat-input", "Enter")
    page.wait_for_function("() => document.querySelectorAll('.message.assistant .body')[1]?.textContent.length > 5",
                           timeout=SLOW_MS)
    page.click("#stop")
    page.wait_for_selector(".message.assistant .note", timeout=SLOW_MS)
    assert page.is_visible("#send") and not page.is_visible("#stop")
    scheduler = app.state.service.scheduler()
    deadline = time.time() + SLOW_MS / 1000
    while scheduler.active and time.time() < deadline:
        time.sleep(0.02)
    assert scheduler.active == 0
    page.wait_for_function("() => document.querySelectorAll('.message.assistant[data-message-id]').length == 2",
                           timeout=SLOW_MS)
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
    page.wait_for_selector("#doc-list .doc-title", timeout=SLOW_MS)
    assert page.inner_text("#doc-list .doc-title") == "warranty"
    assert [d["title"] for d in api(server, "/api/kb/documents")["data"]] == ["warranty"]

    page.fill("#ask-input", "How long does the Zorblax warranty last?")
    with page.expect_response(lambda r: r.url.endswith("/api/kb/ask"), timeout=SLOW_MS) as asked:
        page.click("#ask-button")
    page.wait_for_selector("#ask-button", state="visible", timeout=SLOW_MS)
    assert page.inner_text("#answer").strip()
    # a quoted answer (the tiny model's reply is no answer it can back) says so under the answer
    quoted = bool(re.search(r'"quoted":\s*true', asked.value.text()))
    assert ("Quoted: the model gave no answer" in page.inner_text("#answer")) == quoted
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

    def without_gates(route):  # this test is about the desk's result, diff and restore, not the output gates
        body = json.loads(route.request.post_data)  # (a 12-token "shorten" by the small model may fail them)
        route.continue_(post_data=json.dumps({**body, "check": False}))

    page.route("**/api/write", without_gates)
    page.click("#desk-run")
    page.wait_for_selector("#desk-history li[data-seq='2']", timeout=SLOW_MS)
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


# -- every screen and language ----------------------------------------------------------------------

PHONE, DESKTOP = {"width": 390, "height": 844}, {"width": 1280, "height": 800}
LONG_URL = "https://example.com/" + "a-very-long-path-segment-" * 12
LONG_REPLY = (f"See {LONG_URL} and the word {'x' * 150}.\n\n```python\nprint('{'y' * 200}')\n```\n\n"
              + "A plain paragraph of text. " * 8)
CHINESE = "你好，请用中文介绍一下你自己。"

# What must fit: the page, and every box of the open view that scrolls (sideways only pre blocks and the tabs may)
FITS = """() => {
  const out = [];
  const doc = document.documentElement;
  if (doc.scrollWidth > window.innerWidth) out.push(`page ${doc.scrollWidth} > ${window.innerWidth}`);
  for (const node of document.querySelectorAll("body *")) {
    if (!node.offsetParent || node.closest("pre, .tabs, textarea, select")) continue;
    const r = node.getBoundingClientRect();
    if (r.width && (r.left < -1 || r.right > window.innerWidth + 1)) out.push(`${node.tagName}#${node.id}.${node.className} sticks out`);
    if (/auto|scroll/.test(getComputedStyle(node).overflowX) && node.scrollWidth > node.clientWidth + 1)
      out.push(`${node.tagName}#${node.id}.${node.className} scrolls sideways`);
  }
  return out;
}"""


def open_sized(browser, url: str, locale: str, viewport: dict):
    page, errors = open_page(browser, url, locale=locale)
    page.set_viewport_size(viewport)
    return page, errors


def assert_usable(page, where: str) -> None:
    """No sideways scrolling, and the tabs, the model picker and the language button on screen and clickable."""
    assert page.evaluate(FITS) == [], (where, page.evaluate(FITS)[:8])
    width, height = page.viewport_size["width"], page.viewport_size["height"]
    for sel in ("[data-view=chat]", "[data-view=docs]", "[data-view=desk]", "#model", "#lang-toggle"):
        box = page.locator(sel).bounding_box()
        assert box and box["x"] >= 0 and box["y"] >= 0, (where, sel, box)
        assert box["x"] + box["width"] <= width and box["y"] + box["height"] <= height, (where, sel, box)
        page.locator(sel).click(trial=True)  # visible, enabled, nothing over it
    for tab in page.locator(".tabs button").all():
        assert tab.bounding_box()["height"] < 44, f"{where}: the tab {tab.inner_text()!r} wraps"


@pytest.fixture
def own_server(default_model):
    """A server of its own (this test's MUSE_HOME) with the English-only default model."""
    with ServerThread(create_app({"smollm2-135m": default_model}, embedder=None)) as s:
        yield s


@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["phone", "desktop"])
@pytest.mark.parametrize("locale", ["en-US", "zh-CN"])
def test_every_view_fits_the_screen_in_both_languages(browser, own_server, viewport, locale, tmp_path):
    chat = {"title": "Long lines " + "y" * 80, "messages": [{"role": "user", "content": "Links? " + LONG_URL},
                                                          {"role": "assistant", "content": LONG_REPLY}]}
    cid = httpx.post(own_server.url + "/api/conversations/import", json={"text": json.dumps(chat)}).json()["id"]
    doc = tmp_path / ("a_file_name_without_any_spaces_" * 4 + ".txt")
    doc.write_text(DOC + "\n\n" + LONG_URL)
    with doc.open("rb") as f:
        assert httpx.post(own_server.url + "/api/kb/documents", files={"files": (doc.name, f)}).is_success
    page, errors = open_sized(browser, own_server.url, locale, viewport)
    name = f"{viewport['width']}_{locale[:2]}"
    phone = viewport is PHONE

    assert_usable(page, "chat")
    if phone:  # the conversation list opens over the chat and closes when a conversation is picked
        assert not page.is_visible("#conv-list")
        page.click("#open-sidebar")
        assert_usable(page, "chat list")
        shot(page, f"chat_list_{name}.png")
        page.click(f"#conv-list li[data-id='{cid}'] button")
        assert not page.is_visible("#conv-list")
    else:
        assert not page.is_visible("#open-sidebar")
        page.click(f"#conv-list li[data-id='{cid}'] button")
    page.wait_for_selector(".message.assistant pre")
    assert_usable(page, "chat with long lines")
    assert page.locator("#chat-input").bounding_box()["width"] > viewport["width"] * (0.6 if phone else 0.4)
    shot(page, f"chat_{name}.png")

    page.click("[data-view=docs]")
    page.wait_for_selector("#doc-list .doc-title", timeout=SLOW_MS)
    page.fill("#ask-input", "How long is the warranty?")
    assert_usable(page, "documents")
    shot(page, f"docs_{name}.png")

    page.click("[data-view=desk]")
    page.fill("#desk-text", "Read " + LONG_URL + " " + TEXT)
    page.select_option("#desk-action", "translate")
    assert_usable(page, "writing desk")
    shot(page, f"desk_{name}.png")

    page.click("#lang-toggle")  # the other language: still fits
    for view in ("desk", "docs", "chat"):
        page.click(f"[data-view={view}]")
        assert_usable(page, f"{view} after switching the language")
    assert errors == []


def test_chinese_to_an_english_only_server_says_what_to_do_and_sends_nothing(browser, own_server, tmp_path):
    page, errors = open_sized(browser, own_server.url, "zh-CN", PHONE)
    sent = []
    page.on("request", lambda r: r.method == "POST" and sent.append(r.url))
    assert page.inner_text("#model option") == "smollm2-135m (仅英文)"
    banner = page.inner_text("#lang-banner")  # in Chinese, said at once
    assert "只懂英文" in banner and "muse models install qwen2.5-0.5b" in banner
    assert "muse serve -m smollm2-135m -m qwen2.5-0.5b" in banner and "给运行 Muse 服务器的人" in banner
    assert "--model" not in banner

    page.fill("#chat-input", CHINESE)
    page.press("#chat-input", "Enter")
    notice = page.inner_text("#messages .lang-notice")
    assert notice.startswith("未发送") and "smollm2-135m" in notice and "muse models" not in notice  # the banner has them
    assert page.input_value("#chat-input") == CHINESE  # kept, nothing sent
    assert page.locator(".message").count() == 0 and sent == []
    assert page.evaluate(FITS) == []
    shot(page, "chat_chinese_notice_390_zh.png")
    page.click("#lang-toggle")  # the notice is the app's own words: it switches language too
    assert page.inner_text("#messages .lang-notice").startswith("Not sent: this looks like Chinese")
    assert page.is_hidden("#lang-banner")
    page.click("#lang-toggle")
    page.click("#lang-banner button")  # dismissed, and it stays dismissed
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.is_hidden("#lang-banner")

    page.click("[data-view=docs]")  # the same for a question to the documents (no CLI flags)
    page.fill("#ask-input", "保修期有多长？")
    page.click("#ask-button")
    answer = page.inner_text("#answer .lang-notice")  # with the banner gone, the notice says what to run
    assert answer.startswith("未发送") and "muse models install qwen2.5-0.5b" in answer and "--model" not in answer
    page.click("[data-view=desk]")  # and for the writing desk, Chinese text or a translation into Chinese
    page.fill("#desk-text", "The meeting moved to Tuesday.")
    page.select_option("#desk-action", "translate")
    page.select_option("#desk-to", "zh")
    page.click("#desk-run")
    assert page.inner_text("#desk-result .lang-notice").startswith("未发送：译成中文需要懂中文的模型")
    shot(page, "desk_chinese_notice_390_zh.png")
    assert sent == [] and api(own_server, "/api/conversations")["data"] == [] and errors == []

    page.click("[data-view=chat]")  # English still goes to the English model
    page.fill("#chat-input", "Hello there")
    page.press("#chat-input", "Enter")
    page.wait_for_selector(".message.assistant .feedback", timeout=SLOW_MS)
    assert page.locator("#messages .lang-notice").count() == 0 and len(api(own_server, "/api/conversations")["data"]) == 1


def test_chinese_goes_to_a_served_model_that_reads_it(browser, own_server):
    """With a bilingual model served too, Chinese is sent to it (and the chat says so), English to the picked one."""
    page, errors = open_page(browser, own_server.url, locale="zh-CN")
    info = api(own_server, "/api/info")
    assert info["languages"] == {"smollm2-135m": ["en"]} and info["bilingual"] == "qwen2.5-0.5b"
    info = {**info, "models": ["smollm2-135m", "qwen2.5-0.5b"],
            "languages": {"smollm2-135m": ["en"], "qwen2.5-0.5b": ["zh", "en"]}}
    page.route("**/api/info", lambda route: route.fulfill(json=info))
    bodies = []

    def answer(route):
        bodies.append(json.loads(route.request.post_data))
        events = [{"type": "start"}, {"type": "delta", "text": "你好！"},
                  {"type": "done", "content": "你好！", "message_id": 1}]
        route.fulfill(content_type="text/event-stream", body="".join(f"data: {json.dumps(e)}\n\n" for e in events))

    page.route("**/messages", answer)
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.is_hidden("#lang-banner")
    assert page.inner_text("#model option[value='qwen2.5-0.5b']") == "qwen2.5-0.5b (中英双语)"
    page.fill("#chat-input", CHINESE)
    page.press("#chat-input", "Enter")
    page.wait_for_selector(".message.assistant .feedback", timeout=SLOW_MS)
    assert bodies[0]["model"] == "qwen2.5-0.5b" and bodies[0]["content"] == CHINESE
    assert page.inner_text("#messages .notice") == "由 qwen2.5-0.5b 回答：所选的模型 smollm2-135m 只懂英文。"
    page.fill("#chat-input", "Hello")
    page.press("#chat-input", "Enter")
    page.wait_for_function("() => document.querySelectorAll('.message.assistant .feedback').length == 2",
                           timeout=SLOW_MS)
    assert bodies[1]["model"] == "smollm2-135m" and errors == []


def test_upload_status_speaks_the_chosen_language(browser, own_server, tmp_path):
    page, errors = open_sized(browser, own_server.url, "zh-CN", PHONE)
    page.click("[data-view=docs]")
    doc = tmp_path / "warranty.txt"
    doc.write_text(DOC)
    assert page.inner_text("#upload-form") == "选择文件…\n未选择文件\n上传"  # not the browser's own file button
    page.set_input_files("#upload-input", str(doc))
    assert page.inner_text("#upload-chosen") == "warranty.txt"
    page.click("#upload-form button[type=submit]")
    page.wait_for_selector("#doc-list .doc-title", timeout=SLOW_MS)
    assert page.inner_text("#upload-status") == "已加入知识库：warranty。"
    assert page.inner_text("#upload-chosen") == "未选择文件"
    assert page.inner_text("#doc-list .meta").endswith("个段落")
    shot(page, "docs_upload_390_zh.png")
    page.click("#lang-toggle")
    assert page.inner_text("#upload-status") == "Added to the knowledge base: warranty."
    page.set_input_files("#upload-input", str(doc))
    page.click("#upload-form button[type=submit]")
    page.wait_for_function("() => document.querySelector('#upload-status').textContent.startsWith('Already')",
                           timeout=SLOW_MS)
    assert page.inner_text("#upload-status") == "Already there, unchanged: warranty."
    page.click("#lang-toggle")
    assert page.inner_text("#upload-status") == "已在知识库中，无变化：warranty。"
    assert errors == []
