"""The Triton model's MESSAGES and STOP inputs, parsed into what `Pipeline` takes (no Triton needed).

MESSAGES is one string: a JSON list of OpenAI-style chat messages,

    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the star?"}]},
     {"role": "assistant", "content": "Red."},
     {"role": "user", "content": "And the circle?"}]

with the image's bytes in the IMAGE input: the message holding the image part (`{"type": "image"}` or
`{"type": "image_url", ...}`, whose URL is not read) is where the image goes. STOP is a list of up to 4
strings, one per tensor element. The model file imports this module from beside it (the repository
copies it there), so it imports only the runtime.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from runtime.chat import Conversation
from runtime.messages import MessagesError
from runtime.messages import parse_messages as parse_message_list
from runtime.stops import StopError, check_stops

SHAPE = 'a JSON list of {"role": ..., "content": ...} objects'
IMAGE_PART = '{"type": "image"} (its bytes go in IMAGE)'

__all__ = ["MessagesError", "parse_messages", "parse_stop", "request_prompt"]


def _text(value: Any, name: str) -> str:
    """A string input's value (Triton hands TYPE_STRING elements over as bytes)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise MessagesError(f"{name} is not UTF-8 text ({e.reason} at byte {e.start}); send UTF-8", name) from None
    if not isinstance(value, str):
        raise MessagesError(f"{name} must be a string, got {type(value).__name__}", name)
    return value


def parse_messages(data: bytes | str) -> Conversation:
    """The MESSAGES input as a Conversation (runtime.messages parses the list, as the HTTP server's);
    its errors name the message and the fix."""
    try:
        items = json.loads(_text(data, "MESSAGES"))
    except json.JSONDecodeError as e:
        raise MessagesError(f"MESSAGES is not JSON ({e}); send {SHAPE}", "MESSAGES") from None
    return parse_message_list(items, "MESSAGES", IMAGE_PART).conversation


def request_prompt(question: bytes | str | None, messages: bytes | str | None) -> str | Conversation:
    """What a request asks: its QUESTION, or its MESSAGES as a Conversation (one of them, not both).

    An empty QUESTION counts as absent when MESSAGES comes (a client may send both inputs always);
    alone it is passed on, for the pipeline's own "the question is empty" error.
    """
    asked = None if question is None else _text(question, "QUESTION")
    if messages is not None and _text(messages, "MESSAGES").strip():
        if asked is not None and asked.strip():
            raise MessagesError(
                "the request has both QUESTION and MESSAGES; send one: put the question in MESSAGES' last user message",
                "QUESTION",
            )
        return parse_messages(messages)
    if asked is None:
        raise MessagesError(f"the request has neither QUESTION nor MESSAGES; send a question or {SHAPE}", "QUESTION")
    return asked


def parse_stop(values: Iterable[Any] | None) -> tuple[str, ...]:
    """The STOP input's elements (strings or UTF-8 bytes) as stop strings: at most 4, none empty."""
    if values is None:
        return ()
    try:
        return check_stops([_text(v, "STOP") for v in values])
    except (StopError, MessagesError) as e:
        raise StopError(f"STOP: {e}") from None
