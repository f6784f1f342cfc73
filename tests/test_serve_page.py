"""The server's web page (serving/http/static/) in a real headless Chromium, driven through Selenium.

The page is served by `python -m serving` on the embedded default model, built once for the module
(the one model whose answers mean something), and used as a person would: the file input, the question,
the Ask button. The browser and its driver are the distribution's (/usr/bin/chromium and
/usr/bin/chromedriver), passed to Selenium explicitly: selenium-manager would try to download them.
"""

from __future__ import annotations

import base64
import json
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
EXAMPLE = REPO / "examples" / "shapes_red_circle.png"
QUESTION = "What colour is the circle?"
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


def _ask(driver, image: Path, question: str) -> str:
    """Choose the image and ask through the page's controls; -> the state the page settles in."""
    _element(driver, "image-input").send_keys(str(image.resolve()))
    _element(driver, "question").send_keys(question)
    _element(driver, "ask").click()
    _wait(driver, lambda d: _state(d) in ("done", "error"))
    return _state(driver)


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


def _kept_tokens(server: str) -> list[int]:
    """The kept image tokens of the page's question, asked of the API directly (greedy: the same answer)."""
    url = "data:image/png;base64," + base64.b64encode(EXAMPLE.read_bytes()).decode()
    content = [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": url}}]
    body = json.dumps({"model": "default", "messages": [{"role": "user", "content": content}]}).encode()
    request = urllib.request.Request(
        f"{server}/v1/chat/completions", body, {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        return json.load(response)["corematching"]["kept_image_tokens"]


def test_page_streams_the_answer_and_draws_the_kept_tokens(page, server):
    state = _ask(page, EXAMPLE, QUESTION)
    assert state == "done", _element(page, "error").text
    assert _element(page, "answer").text == "red"
    assert _script_errors(page) == []
    assert not _element(page, "error").is_displayed()
    assert "kept 64 of 576 image tokens" in _element(page, "kept").text
    timings = _element(page, "timings").text
    for name in ("time to first token", "prefill", "tokens/s", "total"):
        assert name in timings

    canvas = _element(page, "overlay")
    assert canvas.get_attribute("data-kept-count") == "64"
    assert canvas.get_attribute("data-dimmed-count") == "512"
    # 336 / 14 = 24: a grid of 576 patches, as many as the image tokens (the CLS token is dropped).
    assert (canvas.get_attribute("data-grid"), canvas.get_attribute("data-offset")) == ("24", "0")
    cell, side = int(canvas.get_attribute("data-cell")), int(canvas.get_property("width"))

    # The pixels: patch p of the model's view (the example is already 336 x 336) sits at row p // 24,
    # column p % 24. A dimmed patch is darker than the image there; a kept one keeps its pixels at the
    # centre and has the yellow outline at its edge.
    from PIL import Image

    original = Image.open(EXAMPLE).convert("RGB")
    assert original.size == (336, 336)
    kept = set(_kept_tokens(server))
    assert len(kept) == 64

    def centre(p: int) -> tuple[int, int]:
        return (p % 24) * cell + cell // 2, (p // 24) * cell + cell // 2

    def source(p: int) -> tuple[int, int, int]:
        x, y = centre(p)
        return original.getpixel((x * 336 // side, y * 336 // side))

    # The brightest patch of each kind: the most room to tell dimmed from not.
    dimmed_patch = max((p for p in range(576) if p not in kept), key=lambda p: sum(source(p)))
    kept_patch = max(kept, key=lambda p: sum(source(p)))
    drawn, before = _pixel(page, *centre(dimmed_patch)), source(dimmed_patch)
    assert sum(before) > 150, before  # bright enough that 65 % darker is unmistakable
    assert sum(drawn) < 0.5 * sum(before), (dimmed_patch, drawn, before)
    drawn, before = _pixel(page, *centre(kept_patch)), source(kept_patch)
    # The browser's resampling differs from Pillow's by a few levels: a margin, far from 65 % darker.
    assert all(abs(a - b) <= 32 for a, b in zip(drawn, before, strict=True)), (kept_patch, drawn, before)
    x, y = centre(kept_patch)
    edge = _pixel(page, x - cell // 2, y)  # the outline's left side
    assert all(abs(a - b) <= 8 for a, b in zip(edge, (255, 200, 0), strict=True)), (kept_patch, edge)


def test_a_file_that_is_not_an_image_shows_an_error(page, tmp_path):
    fake = tmp_path / "not_an_image.png"
    fake.write_text("these are words, not pixels\n")
    assert _ask(page, fake, QUESTION) == "error"
    error = _element(page, "error")
    assert error.is_displayed()
    assert "not an image" in error.text
    assert _element(page, "answer").text == ""


def test_the_servers_error_message_is_shown(page, tmp_path):
    """An SVG: the browser draws it, the server's Pillow cannot read it; the page shows the JSON error's message."""
    svg = tmp_path / "drawing.svg"
    svg.write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><circle cx="32" cy="32" r="20" fill="red"/>'
        "</svg>"
    )
    assert _ask(page, svg, QUESTION) == "error"
    error = _element(page, "error")
    assert error.is_displayed()
    # The server's own message (runtime/preprocess.py), not a generic one of the page's.
    assert "is not an image Pillow can read" in error.text
    assert _element(page, "answer").text == ""


def test_an_image_dropped_on_the_drop_zone_is_asked_about(page):
    # Selenium cannot drag a file from the desktop: the drop event a browser makes for one, built in the page.
    page.execute_script(
        """
        const [name, b64] = arguments;
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, { type: "image/png" }));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true }));
        """,
        EXAMPLE.name,
        base64.b64encode(EXAMPLE.read_bytes()).decode(),
    )
    _wait(page, lambda d: _element(d, "overlay").is_displayed())
    assert EXAMPLE.name in _element(page, "file-name").text
    _element(page, "question").send_keys(QUESTION)
    _element(page, "ask").click()
    _wait(page, lambda d: _state(d) in ("done", "error"))
    assert _state(page) == "done", _element(page, "error").text
    assert _element(page, "answer").text == "red"


# -- the page's stream reading, against a stand-in for the chat completions response --------------------

# Replaces the page's fetch() for /v1/chat/completions only (the page and /v1/models stay the real server's):
# the response is the given server-sent events text, delivered in 7-byte pieces so that events, JSON and
# UTF-8 characters are cut across reads. It records the request body and how often #answer changed.
STUB_FETCH = """
const text = arguments[0];
const realFetch = window.fetch;
window.answerChanges = 0;
new MutationObserver((records) => { window.answerChanges += records.length; })
  .observe(document.getElementById("answer"), { childList: true, characterData: true, subtree: true });
window.fetch = async (url, init) => {
  if (!String(url).endsWith("/v1/chat/completions")) return realFetch(url, init);
  window.sentBody = JSON.parse(init.body);
  const bytes = new TextEncoder().encode(text);
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


def test_a_dense_answer_streams_in_pieces_and_every_token_is_kept(page, tmp_path):
    """Several tokens (one non-ASCII, one event with CRLF line ends), kept_image_tokens null, a wide image."""
    from PIL import Image, ImageOps

    # 600 x 300: the model's view is the middle 300 x 300 (resized to 336), four colours; the red and blue
    # sides are cropped away.
    wide = Image.new("RGB", (600, 300), (220, 30, 30))
    wide.paste((30, 30, 220), (450, 0, 600, 300))
    for (x, y), colour in zip(
        ((150, 0), (300, 0), (150, 150), (300, 150)),
        ((40, 180, 60), (250, 250, 250), (20, 20, 20), (240, 200, 40)),
        strict=True,
    ):
        wide.paste(colour, (x, y, x + 150, y + 150))
    path = tmp_path / "wide.png"
    wide.save(path)
    view = ImageOps.fit(wide, (336, 336), Image.Resampling.BICUBIC)

    pieces = ["ro", "ug", "e é", "!"]
    events = _event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    events += "".join(_event(_delta(p), "\r\n" if i == 1 else "\n") for i, p in enumerate(pieces))
    events += _event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "corematching": DENSE_EXTRA})
    events += "data: [DONE]\n\n"
    page.execute_script(STUB_FETCH, events)
    assert _ask(page, path, QUESTION) == "done", _element(page, "error").text

    assert _element(page, "answer").text == "rouge é!"
    assert page.execute_script("return window.answerChanges") >= len(pieces)  # the answer grew piece by piece
    sent = page.execute_script("return window.sentBody")
    assert sent["model"] == "default" and sent["stream"] is True
    [message] = sent["messages"]
    assert message["role"] == "user"
    text, image = message["content"]
    assert text == {"type": "text", "text": QUESTION}
    assert image["type"] == "image_url" and image["image_url"]["url"].startswith("data:image/png;base64,")
    assert base64.b64decode(image["image_url"]["url"].split(",", 1)[1]) == path.read_bytes()

    kept = _element(page, "kept").text
    assert "kept 576 of 576 image tokens" in kept and "every token was kept" in kept
    timings = _element(page, "timings").text
    for shown in ("12 ms", "250 ms", "30.0 tokens/s", "1.50 s"):
        assert shown in timings
    canvas = _element(page, "overlay")
    assert (canvas.get_attribute("data-kept-count"), canvas.get_attribute("data-dimmed-count")) == ("576", "0")
    side = int(canvas.get_property("width"))
    for fx, fy in ((0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)):
        x, y = int(fx * side) + 3, int(fy * side) + 3  # off the outlines at the cell edges
        expected = view.getpixel((x * 336 // side, y * 336 // side))
        drawn = _pixel(page, x, y)
        assert all(abs(a - b) <= 8 for a, b in zip(drawn, expected, strict=True)), ((fx, fy), drawn, expected)


def test_an_error_event_inside_the_stream_is_shown(page):
    error = {"message": "the request took longer than 1 s; retry", "type": "server_error", "code": "timeout"}
    events = _event(_delta("re")) + _event({"error": error})
    page.execute_script(STUB_FETCH, events)
    assert _ask(page, EXAMPLE, QUESTION) == "error"
    assert _element(page, "error").text == error["message"]
    assert _element(page, "kept").text == ""
