"""The Triton model's MESSAGES and STOP parsing (serving/triton/chat_messages.py over runtime.messages, the
parser the HTTP server shares too), without Triton."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import REQUEST_ERRORS
from runtime.chat import Conversation, ConversationError, Message, MissingImage, TooManyImages
from runtime.stops import StopError
from serving.triton.chat_messages import MessagesError, parse_messages, parse_stop, request_prompt

REPO = Path(__file__).resolve().parent.parent
IMAGE = {"type": "image"}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def dumps(messages: list) -> bytes:
    return json.dumps(messages).encode()  # as Triton hands a TYPE_STRING element over


def test_an_openai_message_list_is_the_conversation() -> None:
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": [IMAGE, text("What colour is the star?")]},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": [text("And the circle?")]},
    ]
    assert parse_messages(dumps(messages)) == Conversation(
        (
            Message("system", "Answer in one word."),
            Message("user", "What colour is the star?", image=True),
            Message("assistant", "Red."),
            Message("user", "And the circle?"),
        )
    )


def test_the_message_with_the_image_part_is_where_the_image_goes() -> None:
    messages = [
        {"role": "user", "content": "Hello."},
        {"role": "assistant", "content": [text("Hello! Send a picture.")]},
        # The part may come after the text and be an image_url, whose URL is not read (IMAGE holds the bytes).
        {"role": "user", "content": [text("What is this?"), {"type": "image_url", "image_url": {"url": "x"}}]},
    ]
    conversation = parse_messages(json.dumps(messages))
    assert [m.image for m in conversation.messages] == [False, False, True]
    assert conversation.messages[2] == Message("user", "What is this?", image=True)


def test_developer_is_system_and_text_parts_join_with_a_space() -> None:
    messages = [
        {"role": "developer", "content": [text(" Be brief. "), text("Use colours.")]},
        {"role": "user", "content": [IMAGE, text("What?")]},
    ]
    conversation = parse_messages(dumps(messages))
    assert conversation.messages[0] == Message("system", "Be brief. Use colours.")


@pytest.mark.parametrize(
    ("data", "error", "says"),
    [
        (b"[{", MessagesError, "not JSON"),
        (b"\xff[]", MessagesError, "not UTF-8"),
        (b'{"role": "user"}', MessagesError, "JSON list"),
        (b"[]", MessagesError, "at least"),
        (dumps(["hi"]), MessagesError, 'MESSAGES[0] must be an object with "role" and "content"'),
        (dumps([{"content": "hi"}]), MessagesError, '"role"'),
        (dumps([{"role": ["user"], "content": "hi"}]), MessagesError, "role must be a string"),
        (dumps([{"role": "tool", "content": "hi"}]), MessagesError, "MESSAGES[0]: unknown role 'tool'"),
        (dumps([{"role": "user", "content": None}]), MessagesError, "string or a list of parts"),
        (dumps([{"role": "user", "content": [{"type": "input_audio"}]}]), MessagesError, "unknown part 'input_audio'"),
        (dumps([{"role": "user", "content": ["hi"]}]), MessagesError, "unknown part None"),
        (dumps([{"role": "user", "content": [IMAGE, {"type": "text"}]}]), MessagesError, 'needs "text"'),
        (dumps([{"role": "user", "content": [IMAGE, IMAGE, text("Which?")]}]), TooManyImages, "2 image parts"),
        (
            dumps([{"role": "user", "content": [IMAGE, text("A?")]}, {"role": "user", "content": [IMAGE, text("B?")]}]),
            TooManyImages,
            "new conversation",
        ),
        (dumps([{"role": "user", "content": "What?"}]), MissingImage, '{"type": "image"}'),
        (
            dumps([{"role": "assistant", "content": [IMAGE]}, {"role": "user", "content": "What?"}]),
            MessagesError,
            "MESSAGES[0]: a assistant message holds an image",
        ),
        (
            dumps([{"role": "user", "content": [IMAGE, text("What?")]}, {"role": "assistant", "content": "Red."}]),
            ConversationError,
            "end the conversation with the user's question",
        ),
        (dumps([{"role": "user", "content": [IMAGE]}]), ConversationError, "no text"),
    ],
)
def test_a_bad_message_list_is_one_line_naming_the_fix(data, error, says) -> None:
    with pytest.raises(error) as raised:
        parse_messages(data)
    message = str(raised.value)
    assert says in message and "\n" not in message
    assert isinstance(raised.value, REQUEST_ERRORS)  # the model answers it as that request's Triton error


def test_a_request_asks_its_question_or_its_messages() -> None:
    messages = dumps([{"role": "user", "content": [IMAGE, text("What?")]}])
    assert request_prompt(b"What colour?", None) == "What colour?"
    assert request_prompt(None, messages) == Conversation.question("What?")
    # A client that always sends both inputs leaves the one it does not use empty.
    assert request_prompt(b"", messages) == Conversation.question("What?")
    assert request_prompt(b"  ", messages) == Conversation.question("What?")
    assert request_prompt(b"What colour?", b"") == "What colour?"
    assert request_prompt(b"   ", None) == "   "  # the pipeline says "the question is empty"
    with pytest.raises(MessagesError, match="both QUESTION and MESSAGES; send one"):
        request_prompt(b"What colour?", messages)
    with pytest.raises(MessagesError, match="neither QUESTION nor MESSAGES"):
        request_prompt(None, None)
    with pytest.raises(MessagesError, match="QUESTION is not UTF-8"):
        request_prompt(b"\xff", None)


def test_stop_strings_come_one_per_element() -> None:
    assert parse_stop(None) == ()
    assert parse_stop([]) == ()
    assert parse_stop([b"\n", "END", "\u3002".encode()]) == ("\n", "END", "\u3002")
    for values, says in [
        ([b"a", b"b", b"c", b"d", b"e"], "at most 4"),
        ([b""], "non-empty"),
        ([b"\xff"], "not UTF-8"),
    ]:
        with pytest.raises(StopError, match=says) as raised:
            parse_stop(values)
        assert str(raised.value).startswith("STOP: ") and "\n" not in str(raised.value)


def test_the_parser_imports_without_triton() -> None:
    code = (
        "import sys; import serving.triton.chat_messages; "
        "assert 'triton_python_backend_utils' not in sys.modules and 'tritonclient' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
