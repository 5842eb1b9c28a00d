"""The chat page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright's Python package),
served by `torchchat.py browser --no-open`."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.server.conftest import start_server, stop_server

CHROMIUM = os.environ.get("TORCHCHAT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install -y chromium) "
                "or set TORCHCHAT_CHROMIUM", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra: pip install -e '.[test]'")


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    server = start_server("browser", ["--no-open"], tmp_path_factory.mktemp("browser") / "server.log")
    try:
        yield server
    finally:
        stop_server(server.process)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, page_server):
    context = browser.new_context(viewport={"width": 1100, "height": 720})
    p = context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    p.goto(page_server.base_url + "/")
    p.wait_for_function("document.getElementById('model').textContent.includes('context')")
    yield p
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def assistant_texts(page) -> list[str]:
    return page.eval_on_selector_all(".msg.assistant", "els => els.map(e => e.textContent)")


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


# Records the length of the reply bubble's text each time the page sets it. A MutationObserver sees every
# set, however fast the tokens arrive, so the test no longer depends on polling faster than the server
# streams (stories260K's 80 tokens can all arrive within one 20 ms poll).
_RECORD_REPLY_LENGTHS = """() => {
  window.__replyLengths = [];
  new MutationObserver(records => {
    for (const r of records) {
      const bubble = r.target.nodeType === Node.TEXT_NODE ? r.target.parentElement : r.target;
      if (!bubble || !bubble.classList || !bubble.classList.contains('assistant')) continue;
      for (const n of r.addedNodes) if (n.nodeType === Node.TEXT_NODE) window.__replyLengths.push(n.data.length);
    }
  }).observe(document.getElementById('messages'), { childList: true, subtree: true });
}"""


def test_sends_a_message_and_streams_the_reply(page, page_server, tmp_path):
    assert page_server.health()["model"] in page.text_content("#model")
    page.fill("#max-tokens", "80")
    page.fill("#system", "")
    page.evaluate(_RECORD_REPLY_LENGTHS)
    send(page, "Once upon a time")
    page.wait_for_selector(".msg.assistant.streaming", state="detached", timeout=60_000)
    page.wait_for_function("document.getElementById('stats').textContent.includes('tokens/s')")
    lengths = page.evaluate("window.__replyLengths")
    final = assistant_texts(page)[-1]
    # The raw reply as streamed. The bubble shows it rendered as Markdown once complete, whose text can
    # differ by a character from the raw one (the page samples at temperature 0.8, so the text varies:
    # a run whose reply ended in two spaces failed a comparison with the rendered length).
    raw = page.evaluate("JSON.parse(localStorage.getItem('torchchat.conversation')).history")[-1]["content"]
    # The reply grows one text delta at a time: many distinct, increasing lengths ending at the whole reply.
    assert len(set(lengths)) >= 3, f"the text did not arrive in pieces: {lengths}"
    assert lengths == sorted(lengths) and lengths[-1] == len(raw), (lengths, raw)
    assert len(final) > 100
    assert page.text_content(".msg.user") == "Once upon a time"
    stats = page.text_content("#stats")
    assert "80 tokens" in stats and "length" in stats
    shot = tmp_path / "browser.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000


def test_history_is_sent_and_new_chat_clears_it(page, page_server):
    page.fill("#max-tokens", "30")
    send(page, "Once upon a time")
    page.wait_for_selector("#stop:disabled", timeout=60_000)
    first = assistant_texts(page)[-1]
    send(page, "The end.")
    page.wait_for_selector(".msg.assistant >> nth=1")
    page.wait_for_selector("#stop:disabled", timeout=60_000)
    assert page.eval_on_selector_all(".msg.user", "els => els.length") == 2
    assert first in page.text_content("#messages")
    page.click("#new-chat")
    assert page.eval_on_selector_all(".msg", "els => els.length") == 0


def test_stop_button_cancels_generation(page, page_server):
    before = page_server.wait_idle()
    page.fill("#max-tokens", "480")
    send(page, "Once upon a time")
    page.wait_for_function(
        "[...document.querySelectorAll('.msg.assistant')].some(e => e.textContent.length > 20)", timeout=60_000)
    with page_server.paused():  # the generation cannot finish before the Stop reaches the server
        page.click("#stop")
        page.wait_for_function("document.getElementById('stats').textContent.includes('stopped')")
    deadline = time.monotonic() + 10
    while page_server.health()["cancelled"] != before["cancelled"] + 1:
        assert time.monotonic() < deadline, "the server did not cancel the stopped request"
        time.sleep(0.05)
    assert page.is_enabled("#send")


def test_server_errors_are_shown(page):
    page.fill("#max-tokens", "100")
    send(page, "Once upon a time " * 200)  # longer than the 512-token context
    page.wait_for_selector(".msg.error", timeout=30_000)
    assert "maximum context length is 512" in page.text_content(".msg.error")


# --- the conversation across a reload, a full context, Markdown, the narrow layout, the favicon ---

def _requests(page) -> list[dict]:
    """The JSON bodies the page posts to /v1/chat/completions, recorded from now on."""
    import json

    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") else None)
    return bodies


def _wait_reply(page, n: int) -> None:
    """Until the page has n finished assistant bubbles and is ready to send again."""
    page.wait_for_function(f"document.querySelectorAll('.msg.assistant:not(.streaming)').length >= {n}",
                           timeout=120_000)
    page.wait_for_selector("#stop:disabled", timeout=60_000)


def test_a_full_context_drops_the_oldest_turns_instead_of_failing(page):
    """stories260K holds 512 tokens: with 200-token replies the third message no longer fits with the
    first exchange. The page drops that exchange (as the terminal chat does), says so, and carries on."""
    bodies = _requests(page)
    page.fill("#max-tokens", "200")
    page.fill("#system", "")
    page.evaluate("document.getElementById('temperature').value = '0'")
    for i, text in enumerate(["Once upon a time", "The dog ran to the park", "Then the sun came out"], start=1):
        send(page, text)
        _wait_reply(page, i)
    assert page.eval_on_selector_all(".msg.error", "els => els.length") == 0
    texts = assistant_texts(page)
    assert len(texts) == 3 and all(t.strip() for t in texts)
    third = [m["content"] for m in bodies[-1]["messages"]]
    assert third[0] == "The dog ran to the park" and third[-1] == "Then the sun came out"
    assert "Once upon a time" not in third and len(third) == 3
    assert page.eval_on_selector_all(".msg.dropped", "els => els.length") == 2
    assert "New chat" in page.text_content(".msg.note")


def test_a_message_longer_than_the_context_names_new_chat_and_leaves_no_empty_bubble(page):
    page.fill("#max-tokens", "20")
    send(page, "Once upon a time")
    _wait_reply(page, 1)
    send(page, "Once upon a time " * 200)
    page.wait_for_selector(".msg.error", timeout=30_000)
    error = page.text_content(".msg.error")
    assert "maximum context length is 512" in error and "New chat" in error
    assert page.wait_for_selector("#stop:disabled")
    assert [t for t in assistant_texts(page) if not t.strip()] == []  # no empty reply bubble
    assert len(assistant_texts(page)) == 1
    send(page, "The end.")  # the conversation goes on
    _wait_reply(page, 2)


def test_the_conversation_survives_a_reload_and_new_chat_forgets_it(page, page_server):
    bodies = _requests(page)
    page.fill("#max-tokens", "20")
    send(page, "Once upon a time")
    _wait_reply(page, 1)
    reply = assistant_texts(page)[0]
    # The model's own text, as the page keeps it: the rendered Markdown above may differ in whitespace
    # (a sampled reply ending in two spaces shows one), and the next request sends this text.
    raw = page.evaluate("JSON.parse(localStorage.getItem('torchchat.conversation')).history"
                        ".filter(m => m.role === 'assistant').map(m => m.content)")
    assert len(raw) == 1 and " ".join(raw[0].split()) == " ".join(reply.split())
    page.reload()
    page.wait_for_function("document.getElementById('model').textContent.includes('context')")
    assert page.text_content(".msg.user") == "Once upon a time"
    assert assistant_texts(page) == [reply]
    send(page, "The end.")
    _wait_reply(page, 2)
    assert [m["content"] for m in bodies[-1]["messages"]] == ["Once upon a time", raw[0], "The end."]
    page.click("#new-chat")
    page.reload()
    page.wait_for_function("document.getElementById('model').textContent.includes('context')")
    assert page.eval_on_selector_all(".msg", "els => els.length") == 0


_REPLY = ("Here is code:\n\n```python\nprint('<b>hi</b>')\n```\n\n"
          "and **bold**, <script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\">"
          "[link](javascript:window.__pwned=3)")


def _fake_stream(route) -> None:
    """/v1/chat/completions answered with _REPLY in three server-sent events (what a model could say)."""
    import json

    parts = [_REPLY[:20], _REPLY[20:70], _REPLY[70:]]
    events = [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in parts]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 5, "completion_tokens": 40, "total_tokens": 45}})
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)


def test_replies_render_markdown_and_html_in_them_never_runs(page):
    page.route("**/v1/chat/completions", _fake_stream)
    send(page, "Show me code")
    _wait_reply(page, 1)

    def check():
        bubble = page.locator(".msg.assistant").first
        assert bubble.locator("pre > code.language-python").text_content() == "print('<b>hi</b>')\n"
        assert bubble.locator("strong").text_content() == "bold"
        assert bubble.locator("script, img, b, [onerror]").count() == 0
        assert "<script>window.__pwned = 1</script>" in bubble.text_content()  # shown as text
        href = bubble.locator("a").first.get_attribute("href") if bubble.locator("a").count() else None
        assert not (href or "").startswith("javascript:")
        page.wait_for_timeout(200)
        assert page.evaluate("window.__pwned") is None

    check()
    page.unroute("**/v1/chat/completions")
    page.reload()  # the stored conversation is rendered the same way
    page.wait_for_function("document.getElementById('model').textContent.includes('context')")
    check()


def test_the_input_stays_usable_at_400_px(browser, page_server):
    context = browser.new_context(viewport={"width": 400, "height": 700})
    p = context.new_page()
    try:
        p.goto(page_server.base_url + "/")
        box = p.locator("#input").bounding_box()
        assert box["width"] >= 250, box
        assert p.is_visible("#send")
        assert not p.is_visible("#system")  # settings behind the header button
        p.click("#settings-toggle")
        assert p.is_visible("#system") and p.is_visible("#new-chat")
    finally:
        context.close()


def test_the_favicon_is_served_and_the_console_is_clean(browser, page_server):
    context = browser.new_context()
    p = context.new_page()
    failed: list[str] = []
    console: list[str] = []
    p.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    p.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    try:
        p.goto(page_server.base_url + "/")
        p.wait_for_function("document.getElementById('model').textContent.includes('context')")
        icon = p.evaluate("document.querySelector('link[rel=icon]').href")
        assert p.request.get(icon).status == 200
        p.wait_for_timeout(500)  # the browser's own icon request
        assert failed == [] and console == [], (failed, console)
    finally:
        context.close()
