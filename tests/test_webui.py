"""The chat page at `/`, driven in a real headless Chromium (Selenium) against a real server.

The servers run a tiny random model (tests/test_api_inputs.write_tiny_llama) through the real
HTTP stack; what a test needs of the engine's timing is injected through create_app's
`scheduler` argument: `PacedScheduler` is the real scheduler and model with a pause per step
(so an answer streams for long enough to be watched and stopped) and the end-of-text token
banned (so an answer runs to max_tokens); `ScriptedScheduler` answers with a text we choose, to
show what the page does with hostile Markdown. The SmolLM2 test (slow) takes the README's
screenshot when ALPACA_CPU_WEBUI_SCREENSHOT names a file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import REPO, require_tool
from server_util import RunningServer, running_server
from test_api_inputs import write_tiny_llama

from alpaca_cpu.llama import GenerationStep, Llama
from alpaca_cpu.server.scheduler import Request, Scheduler
from alpaca_cpu.server.webui import FILES, read_files

N_CTX = 1024
EOS = 2  # </s> in write_tiny_llama's vocabulary
STEP_S = 0.02  # PacedScheduler's pause per engine step: ~50 tokens/s, slow enough to watch
WAIT_S = 10.0  # longest wait for anything the page should show
SMALL_ANSWER = 12  # max tokens of answers a test waits for in full
LONG_ANSWER = 1000  # max tokens of an answer that is stopped (~20 s if it were not)
API_KEY = "sesame"
HOSTILE = ("Look: <script>window.__pwned = 1</script> and "
           "<img src=x onerror=\"window.__pwned = 2\"> and [x](javascript:window.__pwned=3) "
           "**bold**\n\n```html\n<script>window.__pwned = 4</script>\n```\n")


class PacedScheduler(Scheduler):
    """The server's scheduler over the real model, one engine step per STEP_S, EOS banned."""

    def submit(self, req: Request) -> None:
        if hasattr(req, "params"):
            bias = {**(req.params.logit_bias or {}), EOS: float("-inf")}
            req.params = dataclasses.replace(req.params, logit_bias=bias)
        super().submit(req)

    def _step(self) -> None:
        time.sleep(STEP_S)
        super()._step()


class ScriptedScheduler(Scheduler):
    """Answers every generation request with `script`, a few characters per step."""

    script = HOSTILE

    def submit(self, req: Request) -> None:
        def emit() -> None:
            pieces = [self.script[i:i + 7] for i in range(0, len(self.script), 7)]
            for n, piece in enumerate(pieces, 1):
                time.sleep(0.005)
                req.emit(GenerationStep(piece, 0, None, n))
            req.emit(GenerationStep("", None, None, len(pieces), "stop"))
        threading.Thread(target=emit, daemon=True).start()


# ---- the browser -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        require_tool("selenium", "pip install selenium (in the [test] extra)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromium-driver", driver_path))
               if path is None]
    if missing:
        require_tool(" and ".join(missing), "apt-get install chromium chromium-driver "
                     "(Debian/Ubuntu packages; .ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,760", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    """check()'s first true value, polled; AssertionError naming `what` after timeout. An
    element not (or no longer) on the page counts as false."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
        except (NoSuchElementException, StaleElementReferenceException):
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"the page never showed {what} within {timeout} s")
        time.sleep(0.02)


class Page:
    """The chat page in the browser, by the ids of index.html."""

    def __init__(self, driver: Any, url: str) -> None:
        self.d, self.url = driver, url

    def open(self, fresh: bool = True) -> Page:
        self.d.get(self.url + "/")
        if fresh:
            self.d.execute_script("localStorage.clear(); sessionStorage.clear();")
            self.d.get(self.url + "/")
        return self

    def js(self, script: str, *args: Any) -> Any:
        return self.d.execute_script(script, *args)

    def el(self, selector: str) -> Any:
        from selenium.webdriver.common.by import By
        return self.d.find_element(By.CSS_SELECTOR, selector)

    def els(self, selector: str) -> list[Any]:
        from selenium.webdriver.common.by import By
        return self.d.find_elements(By.CSS_SELECTOR, selector)

    def ready(self) -> Page:
        """Until the page has the server's model id."""
        wait_for("the model name", lambda: self.el("#model-name").text == "tiny")
        return self

    def settings(self, max_tokens: int, temperature: float = 0.0) -> None:
        assert not self.el("#settings").is_displayed()
        self.el("#toggle-settings").click()
        for selector, value in (("#max-tokens", max_tokens), ("#temperature", temperature)):
            box = self.el(selector)
            box.clear()
            box.send_keys(str(value))
        self.el("#toggle-settings").click()
        assert not self.el("#settings").is_displayed()

    def ask(self, text: str) -> None:
        from selenium.webdriver.common.keys import Keys
        box = self.el("#prompt")
        box.send_keys(text)
        box.send_keys(Keys.ENTER)

    def answers(self) -> list[Any]:
        return self.els(".msg.assistant")

    def last_answer_text(self) -> str:
        return self.js("const a = document.querySelectorAll('.msg.assistant .body');"
                       "return a.length ? a[a.length - 1].textContent : '';")

    def wait_answer_done(self) -> str:
        """The last answer's statistics line, once the answer has ended."""
        wait_for("the Send button back", lambda: self.el("#send").is_displayed())
        return self.js("const s = document.querySelectorAll('.msg.assistant .stats');"
                       "return s.length ? s[s.length - 1].textContent : '';")

    def stored(self) -> list[dict[str, Any]]:
        return json.loads(self.js("return localStorage.getItem('alpaca.conversations') || '[]'"))

    def sidebar(self) -> list[str]:
        return [li.text.removesuffix("\u00d7").strip() for li in self.els("#conversations li")]


# ---- servers -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", seed=9)


def tiny_llama(path: Path) -> Llama:
    return Llama(path, n_ctx=N_CTX, n_threads=2, chat_format="chatml", n_seq_max=1)


@pytest.fixture(scope="module")
def paced(tiny_path: Path) -> Iterator[RunningServer]:
    """One slot and one place in the queue: two requests running or waiting make a third a
    503."""
    llama = tiny_llama(tiny_path)
    with running_server(llama, PacedScheduler(llama, max_queue=1), max_queue=1) as s:
        yield s


# ---- tests -------------------------------------------------------------------------------

def test_answer_streams_in_with_statistics(browser: Any, paced: RunningServer,
                                           tiny_path: Path) -> None:
    page = Page(browser, paced.url).open().ready()
    page.settings(max_tokens=SMALL_ANSWER * 2)
    page.ask("tell me about llamas")
    first = wait_for("the answer's first text", page.last_answer_text)
    wait_for("the answer growing", lambda: len(page.last_answer_text()) > len(first))
    stats = page.wait_answer_done()
    # The token count is the server's usage chunk; the times are the browser's clock.
    assert re.fullmatch(rf"{SMALL_ANSWER * 2} tokens · [\d.]+ tokens/s · first token \d+ ms",
                        stats), stats
    assert "max-tokens limit" in page.el(".msg.assistant .note").text
    # What the page kept is what the library answers greedily to the same messages.
    reference = Llama(tiny_path, n_ctx=N_CTX, n_threads=2, chat_format="chatml")
    want = reference.create_chat_completion(
        [{"role": "user", "content": "tell me about llamas"}], temperature=0,
        max_tokens=SMALL_ANSWER * 2, logit_bias={EOS: float("-inf")})
    [conversation] = page.stored()
    assert [m["role"] for m in conversation["messages"]] == ["user", "assistant"]
    assert conversation["messages"][1]["content"] == want["choices"][0]["message"]["content"]
    assert conversation["messages"][1]["stats"]["tokens"] == SMALL_ANSWER * 2


def test_stop_new_chat_reload_delete(browser: Any, paced: RunningServer) -> None:
    page = Page(browser, paced.url).open().ready()
    page.settings(max_tokens=LONG_ANSWER)
    page.ask("first question")
    wait_for("the answer's first text", page.last_answer_text)
    page.el("#stop").click()
    wait_for("the Stopped note", lambda: "Stopped." in page.el(".msg.assistant .note").text)
    paced.wait_idle(timeout=2.0)  # the server cancelled the request and freed its one slot
    stopped_at = page.stored()[0]["messages"][1]["content"]
    assert 0 < len(stopped_at) and page.els("#send")[0].is_displayed()

    # The next question works (it would wait ~20 s, over WAIT_S, for a slot still busy).
    page.settings(max_tokens=SMALL_ANSWER)
    page.ask("second question")
    assert page.wait_answer_done().startswith(f"{SMALL_ANSWER} tokens")
    assert [e.text for e in page.els(".msg.user")] == ["first question", "second question"]
    assert page.el("#error").is_displayed() is False

    page.el("#new-chat").click()
    assert page.els(".msg") == [] and page.el(".empty").is_displayed()
    page.ask("another chat")
    page.wait_answer_done()

    page.open(fresh=False)  # reload: both conversations are in the sidebar, newest first
    assert page.sidebar() == ["another chat", "first question"]
    page.els("#conversations .open")[1].click()
    assert [e.text for e in page.els(".msg.user")] == ["first question", "second question"]
    assert page.el(".msg.assistant .note").text == "Stopped."
    assert page.els(".msg.assistant .body")[0].text.replace("\n", "") != ""

    page.els("#conversations .delete")[1].click()
    assert page.sidebar() == ["another chat"] and page.els(".msg.user") == []
    page.open(fresh=False)
    assert page.sidebar() == ["another chat"]
    assert [c["title"] for c in page.stored()] == ["another chat"]


def test_busy_server_is_a_readable_message(browser: Any, paced: RunningServer) -> None:
    page = Page(browser, paced.url).open().ready()
    page.settings(max_tokens=SMALL_ANSWER)
    body = {"model": "tiny", "max_tokens": LONG_ANSWER, "stream": True,
            "messages": [{"role": "user", "content": "hold the slot"}]}
    url = paced.v1 + "/chat/completions"

    def health() -> dict[str, int]:
        return httpx.get(paced.url + "/health").json()
    with httpx.stream("POST", url, json=body, timeout=WAIT_S):
        wait_for("the one slot busy", lambda: health()["slots_busy"] == 1)
        with httpx.stream("POST", url, json=body, timeout=WAIT_S):
            wait_for("the one place in the queue taken", lambda: health()["queue"] == 1)
            page.ask("are you there?")
            error = wait_for("the error", lambda: page.el("#error").is_displayed()
                             and page.el("#error").text)
    assert error.startswith("The server is busy") and "Try again in 1 s." in error, error
    # Nothing was answered: the question is back in the text box, the conversation not kept.
    assert page.el("#prompt").get_attribute("value") == "are you there?"
    assert page.els(".msg") == [] and page.stored() == []
    paced.wait_idle()
    from selenium.webdriver.common.keys import Keys
    page.el("#prompt").send_keys(Keys.ENTER)  # retry, now that the slot is free
    assert page.wait_answer_done().startswith(f"{SMALL_ANSWER} tokens")
    assert not page.el("#error").is_displayed()


def test_context_full_is_a_readable_message(browser: Any, paced: RunningServer) -> None:
    page = Page(browser, paced.url).open().ready()
    from selenium.webdriver.common.keys import Keys
    page.js("arguments[0].value = arguments[1]", page.el("#prompt"), "llama " * N_CTX)
    page.el("#prompt").send_keys(Keys.ENTER)
    error = wait_for("the error", lambda: page.el("#error").is_displayed()
                     and page.el("#error").text)
    assert error.startswith("The conversation no longer fits in the model's context"), error
    assert f"more than the context of {N_CTX}" in error


def test_api_key_is_asked_once_per_tab(browser: Any, tiny_path: Path) -> None:
    from selenium.webdriver.common.keys import Keys
    with running_server(tiny_llama(tiny_path), api_key=API_KEY) as s:
        page = Page(browser, s.url).open()
        dialog = wait_for("the key dialog", lambda: page.el("#key-dialog").is_displayed()
                          and page.el("#key-dialog"))
        assert "needs an API key" in page.el("#key-reason").text
        page.el("#api-key").send_keys("wrong" + Keys.ENTER)
        wait_for("the refusal", lambda: "refused" in page.el("#key-reason").text)
        assert dialog.is_displayed()
        page.el("#api-key").send_keys(API_KEY + Keys.ENTER)
        page.ready()
        assert not dialog.is_displayed()
        page.settings(max_tokens=SMALL_ANSWER)
        page.ask("hello")
        assert re.match(r"\d+ tokens", page.wait_answer_done())
        assert page.js("return sessionStorage.getItem('alpaca.apiKey')") == API_KEY
        page.open(fresh=False)  # the same tab: not asked again
        page.ready()
        assert not page.el("#key-dialog").is_displayed()
        assert page.js("return localStorage.getItem('alpaca.apiKey')") is None


def test_model_markup_is_shown_as_text(browser: Any, tiny_path: Path) -> None:
    llama = tiny_llama(tiny_path)
    with running_server(llama, ScriptedScheduler(llama)) as s:
        page = Page(browser, s.url).open().ready()
        page.ask("say something nasty")
        page.wait_answer_done()
        answer = page.el(".msg.assistant .body")
        text = answer.get_attribute("textContent")
        assert "<script>window.__pwned = 1</script>" in text
        assert '<img src=x onerror="window.__pwned = 2">' in text
        assert page.js("return window.__pwned") is None
        # Only the renderer's own elements: no script, image, handler or javascript: link.
        tags = set(page.js("return [...arguments[0].querySelectorAll('*')].map(e => e.tagName)",
                           answer))
        assert tags <= {"P", "STRONG", "DIV", "SPAN", "BUTTON", "PRE", "CODE"}, tags
        assert page.el(".msg.assistant strong").text == "bold"
        assert page.el(".codeblock code").get_attribute("textContent") == \
            "<script>window.__pwned = 4</script>"
        assert page.el(".codeblock .lang").text == "html"
        copy = page.el(".codeblock .copy")
        assert copy.text == "Copy"
        copy.click()
        wait_for("the copy done", lambda: copy.text == "Copied")
        # What was copied is the code as text: paste it into the prompt box.
        from selenium.webdriver.common.keys import Keys
        page.el("#prompt").send_keys(Keys.CONTROL, "v")
        assert page.el("#prompt").get_attribute("value") == "<script>window.__pwned = 4</script>"


def test_phone_width(browser: Any, paced: RunningServer) -> None:
    browser.set_window_size(390, 800)
    try:
        page = Page(browser, paced.url).open().ready()
        sidebar = page.el("#sidebar")
        assert page.el("#toggle-sidebar").is_displayed()
        wait_for("the drawer closed", lambda: sidebar.rect["x"] + sidebar.rect["width"] <= 0)
        page.el("#toggle-sidebar").click()
        wait_for("the drawer open", lambda: sidebar.rect["x"] == 0)
        page.el("#new-chat").click()
        wait_for("the drawer closed", lambda: sidebar.rect["x"] + sidebar.rect["width"] <= 0)
        # Nothing wider than the screen; the text box and Send button are on it.
        assert page.js("return document.documentElement.scrollWidth") <= 390
        send = page.el("#send").rect
        assert send["x"] + send["width"] <= 390 and page.el("#prompt").rect["width"] > 200
    finally:
        browser.set_window_size(1100, 760)


def test_page_is_self_contained_and_can_be_turned_off(tiny_path: Path) -> None:
    llama = tiny_llama(tiny_path)
    with running_server(llama) as s:
        page = httpx.get(s.url + "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert httpx.head(s.url + "/").status_code == 200
        for name in ("app.js", "style.css"):
            r = httpx.get(f"{s.url}/webui/{name}")
            assert r.status_code == 200 and r.headers["content-type"] == FILES[name]
        # Nothing is loaded from elsewhere: no absolute URL in any file (the Markdown link
        # pattern `https?:` is the one mention, and it only matches what the model writes).
        for name in FILES:
            text = httpx.get(s.url + ("/" if name == "index.html" else f"/webui/{name}")).text
            assert re.findall(r"(?:https?:)?//[\w.-]+\.\w", text) == [], name
    # The README's page weight is the files' size.
    sizes = {name: len(body) for name, body in read_files().items()}
    readme = (REPO / "README.md").read_text()
    weight = re.search(r"three files, ([\d,]+) bytes in all", readme)
    assert weight and int(weight.group(1).replace(",", "")) == sum(sizes.values()), sizes
    with running_server(llama, webui=False) as s:
        assert httpx.get(s.url + "/").status_code == 404
        assert httpx.get(s.url + "/webui/app.js").status_code == 404
        assert httpx.get(s.url + "/health").status_code == 200
    from alpaca_cpu.server.cli import build_parser
    assert build_parser().parse_args(["--no-webui"]).webui is False
    assert build_parser().parse_args([]).webui is True


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_conversation_screenshot(browser: Any, smollm2_path: Path) -> None:
    """A real conversation; its screenshot for the README when ALPACA_CPU_WEBUI_SCREENSHOT
    names a file; prints the page's load time and the first token's time."""
    llama = Llama(smollm2_path, n_ctx=2048, n_threads=2, n_seq_max=1)
    browser.set_window_size(1000, 1000)
    with running_server(llama, model_id="SmolLM2-135M-Instruct.Q4_1") as s:
        t0 = time.perf_counter()
        page = Page(browser, s.url).open(fresh=False)
        wait_for("the model name", lambda: page.el("#model-name").text.startswith("SmolLM2"))
        ready_ms = (time.perf_counter() - t0) * 1000
        page.settings(max_tokens=160, temperature=0)
        page.ask("How do I read a file line by line in Python?")
        stats = page.wait_answer_done()
        first_ms = int(re.search(r"first token (\d+) ms", stats).group(1))
        page.ask("And how do I count the lines?")
        wait_for("the second answer", lambda: len(page.answers()) == 2
                 and len(page.last_answer_text()) > 80, timeout=60)
        target = os.environ.get("ALPACA_CPU_WEBUI_SCREENSHOT")
        if target:
            browser.save_screenshot(target)
        page.wait_answer_done()
        print(f"\nwebui: page ready {ready_ms:.0f} ms after navigation; first stats: {stats}; "
              f"load to first token {ready_ms + first_ms:.0f} ms (+ typing)")
        assert page.el(".msg.assistant .stats").text.endswith("ms")
    browser.set_window_size(1100, 760)
