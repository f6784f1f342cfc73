"""What the web page's browser tests share: the browser, the servers, and reading the page's state.

The browser and its driver are the distribution's (/usr/bin/chromium and /usr/bin/chromedriver), passed
to Selenium explicitly: selenium-manager would try to download them. A test module imports the fixtures
it uses from here, and `pytestmark` to skip where there is no browser.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
EXAMPLE = REPO / "examples" / "shapes_red_circle.png"
OTHER_IMAGE = REPO / "examples" / "shapes_mixed.png"
QUESTION = "What colour is the circle?"
# Three questions about EXAMPLE, asked as one conversation (examples/questions.json).
CONVERSATION = (QUESTION, "What shape is the blue object?", "Is the red circle left or right of the blue square?")
API_KEY = "page-test-key"
WAIT = 60  # seconds the page may take to reach a state (a deadline for waiting, not an assertion)


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            return f"{path} is missing (the distribution's {package} package)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=f"no browser for the page's tests: {_missing()}")


@pytest.fixture(scope="module")
def build_dir(default_build) -> Path:
    """The embedded default model's build (tests/conftest.py), named `default` as served."""
    return default_build


@pytest.fixture(scope="module")
def server(build_dir):
    """The base URL of the server on the build, once GET /health answers; stopped after the module."""
    from serving.http.process import serve_subprocess

    # The CPU provider: the page is the subject, and every machine answers the same on it.
    with serve_subprocess(build_dir, ["--provider", "cpu"]) as child:
        child.wait_ready(WAIT)
        yield child.url


@pytest.fixture(scope="module")
def keyed_server(build_dir):
    """A second server on the build, started with --api-key: every API call needs the key."""
    from serving.http.process import serve_subprocess

    with serve_subprocess(build_dir, ["--provider", "cpu", "--api-key", API_KEY]) as child:
        child.wait_ready(WAIT)
        yield child.url


@pytest.fixture(scope="module")
def reference(build_dir):
    """The runtime on the same build and provider as the servers: the answers the page must show."""
    from runtime import Pipeline

    return Pipeline.load(build_dir, provider="cpu")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for _script_errors
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, server):
    """The page, freshly loaded (state "idle"), with its model card read."""
    _script_errors(browser)  # drops what earlier tests logged
    browser.get(f"{server}/")
    _wait(browser, lambda d: "default" in _element(d, "model").text)
    assert _state(browser) == "idle"
    return browser


def _element(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def _state(driver) -> str:
    return driver.execute_script("return document.body.dataset.state")


def _wait(driver, condition) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT).until(condition)


def _finished(driver) -> int:
    """How many turns of the history have a complete answer (their figures line is filled in)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#history .turn-meta')].filter((e) => e.textContent).length"
    )


def _send(driver, question: str) -> int:
    """Type the question and press Ask; -> the complete answers before it (for `_settle`)."""
    before = _finished(driver)
    _element(driver, "question").send_keys(question)
    _element(driver, "ask").click()
    return before


def _settle(driver, before: int) -> str:
    """Waits until the question sent after `before` complete answers is answered, or failed; -> the state."""
    _wait(driver, lambda d: _state(d) == "error" or (_state(d) == "done" and _finished(d) > before))
    return _state(driver)


def _ask(driver, image: Path, question: str) -> str:
    """Choose the image (a new conversation) and ask through the page's controls; -> the state it settles in."""
    _element(driver, "image-input").send_keys(str(image.resolve()))
    return _settle(driver, _send(driver, question))


def _history(driver) -> list[list[str]]:
    """The conversation as the page shows it: [question, answer] per turn, in order."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#history .turn')].map((t) => "
        "[t.querySelector('.question').textContent, t.querySelector('.answer').textContent])"
    )


def _sent(driver) -> list[dict]:
    """The bodies of the page's chat requests since STUB_FETCH went in."""
    return driver.execute_script("return window.sentBodies")


def _data_url(image: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()


def _reference(pipeline, image: Path, turns: list[list[str]], question: str):
    """The runtime's answer to `question` after `turns` ([question, answer] pairs) about `image`."""
    from runtime.chat import Conversation, Message
    from serving.http.config import ServeConfig

    messages = []
    for i, (asked, answered) in enumerate(turns):
        messages += [Message("user", asked, image=i == 0), Message("assistant", answered)]
    conversation = Conversation((*messages, Message("user", question, image=not turns)))
    # The page sends no max_tokens: the server answers up to its default, within the room the cache leaves.
    _, room = pipeline.encode(conversation, None)
    max_tokens = min(ServeConfig.default_max_tokens, room)
    return pipeline.answer(image.read_bytes(), conversation, max_new_tokens=max_tokens)


def _pixel(driver, x: int, y: int) -> tuple[int, int, int]:
    rgba = driver.execute_script(
        "return Array.from(document.getElementById('overlay').getContext('2d').getImageData(arguments[0], "
        "arguments[1], 1, 1).data)",
        x,
        y,
    )
    return tuple(rgba[:3])


def _script_errors(driver) -> list[str]:
    """The console's errors since the last call (uncaught exceptions, failed loads)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def _outlined(driver, patch: int) -> bool:
    """Whether the overlay outlines `patch` (kept) rather than dims it: the left edge of its cell is yellow."""
    cell = int(_element(driver, "overlay").get_attribute("data-cell"))
    edge = _pixel(driver, (patch % 24) * cell, (patch // 24) * cell + cell // 2)
    return all(abs(a - b) <= 8 for a, b in zip(edge, (255, 200, 0), strict=True))


STUB_FETCH = """
const texts = arguments[0];
const realFetch = window.fetch;
window.sentBodies = [];
window.historyChanges = 0;
new MutationObserver((records) => { window.historyChanges += records.length; })
  .observe(document.getElementById("history"), { childList: true, characterData: true, subtree: true });
window.fetch = async (url, init) => {
  if (!String(url).endsWith("/v1/chat/completions")) return realFetch(url, init);
  window.sentBodies.push(JSON.parse(init.body));
  if (!texts) return realFetch(url, init);
  const bytes = new TextEncoder().encode(texts[Math.min(window.sentBodies.length, texts.length) - 1]);
  let at = 0;
  const body = new ReadableStream({
    pull(controller) {
      if (at >= bytes.length) return controller.close();
      controller.enqueue(bytes.slice(at, at + 7));
      at += 7;
    },
  });
  return new Response(body, { status: 200, headers: { "Content-Type": "text/event-stream" } });
};
"""


def _enter_key(driver, key: str) -> None:
    _wait(driver, lambda d: _element(d, "key-form").is_displayed())
    field = _element(driver, "api-key")
    assert field.get_attribute("type") == "password"
    field.send_keys(key + "\n")  # Enter submits the key form


def _event(body: dict, newline: str = "\n") -> str:
    return f"data: {json.dumps(body)}{newline}{newline}"


def _delta(content: str) -> dict:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}}]}


DENSE_EXTRA = {
    "kept_image_tokens": None,
    "num_kept_image_tokens": 576,
    "num_image_tokens": 576,
    "backend": "stand-in",
    "timings": {
        "time_to_first_token": 0.0123,
        "total": 1.5,
        "preprocess": 0.001,
        "vision": 0.002,
        "prefill": 0.25,
        "decode": 0.1,
        "decode_steps": 3,
        "decode_tokens_per_second": 30.0,
    },
}


def _answer_events(text: str) -> str:
    return _event(_delta(text)) + _event({"choices": [], "corematching": DENSE_EXTRA}) + "data: [DONE]\n\n"
