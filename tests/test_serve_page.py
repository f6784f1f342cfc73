"""The server's web page (serving/http/static/) in a real headless Chromium, driven through Selenium.

The page is served by `python -m serving` on the embedded default model, built once for the module
(the one model whose answers mean something), and used as a person would: the file input, the question,
the Ask button, follow-up questions, "New conversation", the API key form. Its answers are checked
against the runtime's own (`Pipeline.answer` on the same conversation). The browser and its driver are
the distribution's (/usr/bin/chromium and /usr/bin/chromedriver), passed to Selenium explicitly:
selenium-manager would try to download them.
"""

# ruff: noqa: F811 (the fixtures imported from page_browser are test parameters by name)
from __future__ import annotations

import base64

from page_browser import (  # noqa: F401 (the fixtures, found by name)
    API_KEY,
    CONVERSATION,
    EXAMPLE,
    OTHER_IMAGE,
    QUESTION,
    STUB_FETCH,
    _ask,
    _data_url,
    _element,
    _enter_key,
    _history,
    _outlined,
    _pixel,
    _reference,
    _script_errors,
    _send,
    _sent,
    _settle,
    _state,
    _wait,
    browser,
    build_dir,
    keyed_server,
    page,
    pytestmark,
    reference,
    server,
)


def test_page_streams_the_answer_and_draws_the_kept_tokens(page, reference):
    state = _ask(page, EXAMPLE, QUESTION)
    assert state == "done", _element(page, "error").text
    assert _history(page) == [[QUESTION, "red"]]
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
    kept = set(_reference(reference, EXAMPLE, [], QUESTION).kept_image_tokens)
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
    assert _outlined(page, kept_patch)


def test_a_file_that_is_not_an_image_shows_an_error(page, tmp_path):
    fake = tmp_path / "not_an_image.png"
    fake.write_text("these are words, not pixels\n")
    assert _ask(page, fake, QUESTION) == "error"
    error = _element(page, "error")
    assert error.is_displayed()
    assert "not an image" in error.text
    assert _history(page) == []


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
    assert _history(page) == []  # a failed question is not part of the conversation
    assert _element(page, "question").get_property("value") == QUESTION  # back in the box, to ask again


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
    assert _settle(page, _send(page, QUESTION)) == "done", _element(page, "error").text
    assert _history(page) == [[QUESTION, "red"]]


# -- conversations -----------------------------------------------------------------------------------------


# Wraps the page's fetch() for /v1/chat/completions (the page and /v1/models stay the real server's): it
# records each request's body (window.sentBodies) and how often the history changed. Given a list of
# server-sent events texts, the Nth request gets the Nth (the last one again after the list) in place of
# the server's answer, in 7-byte pieces so that events, JSON and UTF-8 characters are cut across reads;
# given null, the server answers.
def test_a_three_turn_conversation_answers_as_the_runtime(page, reference):
    page.execute_script(STUB_FETCH, None)
    _element(page, "image-input").send_keys(str(EXAMPLE))
    turns, kept = [], []
    for question in CONVERSATION:
        expected = _reference(reference, EXAMPLE, turns, question)
        assert _settle(page, _send(page, question)) == "done", _element(page, "error").text
        turns.append([question, expected.text])
        assert _history(page) == turns  # every turn so far, in order, with the runtime's answers
        kept.append(set(expected.kept_image_tokens))
        assert _element(page, "overlay").get_attribute("data-kept-count") == str(len(kept[-1]))
    assert _script_errors(page) == []

    # The whole history went each time, the answers back as assistant messages (every message checked:
    # test_follow_ups_send_the_history_and_the_system_prompt).
    assert [len(body["messages"]) for body in _sent(page)] == [1, 3, 5]
    assert [m["content"] for m in _sent(page)[-1]["messages"][1::2]] == [turns[0][1], turns[1][1]]
    # The overlay is the latest answer's: the tokens the third answer kept and the first did not are
    # outlined, and the other way round dimmed.
    assert kept[2] != kept[0]
    assert all(_outlined(page, p) for p in kept[2] - kept[0])
    assert not any(_outlined(page, p) for p in kept[0] - kept[2])


def test_new_conversation_and_a_new_image_start_over(page, reference):
    page.execute_script(STUB_FETCH, None)
    _element(page, "image-input").send_keys(str(EXAMPLE))
    for question in CONVERSATION[:2]:
        assert _settle(page, _send(page, question)) == "done", _element(page, "error").text
    _element(page, "new-conversation").click()
    assert _history(page) == []
    assert _element(page, "kept").text == ""
    assert _element(page, "overlay").get_attribute("data-kept-count") is None  # the image, without an overlay
    assert EXAMPLE.name in _element(page, "file-name").text  # "New conversation" keeps the image

    # The next question is a one-turn request again, answered as the runtime answers it alone.
    expected = _reference(reference, EXAMPLE, [], CONVERSATION[2])
    assert _settle(page, _send(page, CONVERSATION[2])) == "done", _element(page, "error").text
    assert _history(page) == [[CONVERSATION[2], expected.text]]
    [message] = _sent(page)[-1]["messages"]
    assert message["content"][1]["image_url"]["url"] == _data_url(EXAMPLE)

    # Another image starts another conversation: the history goes, the new image goes with the question.
    _element(page, "image-input").send_keys(str(OTHER_IMAGE))
    _wait(page, lambda d: OTHER_IMAGE.name in _element(d, "file-name").text)
    assert _history(page) == []
    question = "How many squares are there?"
    expected = _reference(reference, OTHER_IMAGE, [], question)
    assert _settle(page, _send(page, question)) == "done", _element(page, "error").text
    assert _history(page) == [[question, expected.text]]
    [message] = _sent(page)[-1]["messages"]
    assert message["content"][1]["image_url"]["url"] == _data_url(OTHER_IMAGE)
    assert _script_errors(page) == []


def test_the_page_asks_for_the_api_key(browser, keyed_server, reference):
    _script_errors(browser)
    browser.get(f"{keyed_server}/")
    # /v1/models got 401: the page asks for the key in its own form and waits.
    _wait(browser, lambda d: _state(d) == "key")
    assert "no API key" in _element(browser, "key-message").text
    _enter_key(browser, "not-the-key")
    _wait(browser, lambda d: "API key is wrong" in _element(d, "key-message").text)  # the server's message
    _enter_key(browser, API_KEY)
    _wait(browser, lambda d: "default" in _element(d, "model").text)
    assert not _element(browser, "key-form").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('corematching.apiKey')") == API_KEY

    expected = _reference(reference, EXAMPLE, [], QUESTION)
    assert _ask(browser, EXAMPLE, QUESTION) == "done", _element(browser, "error").text
    assert _history(browser) == [[QUESTION, expected.text]]

    # A key that stops working (the server restarted with another): the chat request gets 401, the page
    # asks again and sends the question once the key is in.
    browser.execute_script("sessionStorage.setItem('corematching.apiKey', 'an-old-key')")
    before = _send(browser, CONVERSATION[1])
    _enter_key(browser, API_KEY)
    assert _settle(browser, before) == "done", _element(browser, "error").text
    follow_up = _reference(reference, EXAMPLE, [[QUESTION, expected.text]], CONVERSATION[1])
    assert _history(browser) == [[QUESTION, expected.text], [CONVERSATION[1], follow_up.text]]

    # The key lasts for the tab: a reload goes straight to the model.
    browser.get(f"{keyed_server}/")
    _wait(browser, lambda d: "default" in _element(d, "model").text)
    assert not _element(browser, "key-form").is_displayed()
    # The console holds only the browser's own notes of the three 401 answers.
    assert all("401" in e for e in _script_errors(browser))


# -- the page's stream reading, against stand-in answers ------------------------------------------------
