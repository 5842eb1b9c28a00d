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
    # The reply grows one text delta at a time: many distinct, increasing lengths ending at the final text.
    assert len(set(lengths)) >= 3, f"the text did not arrive in pieces: {lengths}"
    assert lengths == sorted(lengths) and lengths[-1] == len(final), lengths
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
