"""The web page's streaming and history with stand-in answers: the page's fetch of the chat route is
replaced (STUB_FETCH), so what the page sends and how it reads server-sent events cut at any byte are
checked exactly; the page and /v1/models stay the real server's (tests/page_browser.py).
"""

# ruff: noqa: F811 (the fixtures imported from page_browser are test parameters by name)
from __future__ import annotations

import base64

from page_browser import (  # noqa: F401 (the fixtures, found by name)
    CONVERSATION,
    DENSE_EXTRA,
    EXAMPLE,
    QUESTION,
    STUB_FETCH,
    _answer_events,
    _ask,
    _data_url,
    _delta,
    _element,
    _event,
    _history,
    _pixel,
    _send,
    _sent,
    _settle,
    browser,
    build_dir,
    keyed_server,
    page,
    pytestmark,
    reference,
    server,
)


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
    page.execute_script(STUB_FETCH, [events])
    assert _ask(page, path, QUESTION) == "done", _element(page, "error").text

    assert _history(page) == [[QUESTION, "rouge é!"]]
    assert page.execute_script("return window.historyChanges") >= len(pieces)  # the answer grew piece by piece
    [sent] = _sent(page)
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


def test_follow_ups_send_the_history_and_the_system_prompt(page):
    page.execute_script(STUB_FETCH, [_answer_events(a) for a in ("red", "square", "left")])
    page.find_element("css selector", ".system summary").click()  # the field is folded away until asked for
    _element(page, "system-prompt").send_keys("Answer in one word.")
    _element(page, "image-input").send_keys(str(EXAMPLE))
    for question in CONVERSATION:
        assert _settle(page, _send(page, question)) == "done", _element(page, "error").text
    assert _history(page) == [[CONVERSATION[0], "red"], [CONVERSATION[1], "square"], [CONVERSATION[2], "left"]]
    assert _sent(page)[-1]["messages"] == [
        {"role": "system", "content": "Answer in one word."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": CONVERSATION[0]},
                {"type": "image_url", "image_url": {"url": _data_url(EXAMPLE)}},
            ],
        },
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": CONVERSATION[1]},
        {"role": "assistant", "content": "square"},
        {"role": "user", "content": CONVERSATION[2]},
    ]


def test_an_error_event_inside_the_stream_is_shown_and_the_history_stays(page):
    error = {"message": "the request took longer than 1 s; retry", "type": "server_error", "code": "timeout"}
    failed = _event(_delta("re")) + _event({"error": error})
    page.execute_script(STUB_FETCH, [_answer_events("red"), failed, _answer_events("square")])
    assert _ask(page, EXAMPLE, QUESTION) == "done", _element(page, "error").text
    assert _settle(page, _send(page, CONVERSATION[1])) == "error"
    assert _element(page, "error").text == error["message"]
    assert _history(page) == [[QUESTION, "red"]]  # the failed turn is gone; the first answer's figures stay
    assert "kept 576 of 576" in _element(page, "kept").text
    assert _element(page, "question").get_property("value") == CONVERSATION[1]

    # Ask again (the question is back in the box): the failed attempt is not part of what is sent.
    _element(page, "ask").click()
    assert _settle(page, 1) == "done", _element(page, "error").text
    assert _history(page) == [[QUESTION, "red"], [CONVERSATION[1], "square"]]
    assert [m["role"] for m in _sent(page)[-1]["messages"]] == ["user", "assistant", "user"]
