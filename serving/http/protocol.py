"""An OpenAI chat-completions request body -> a typed `ChatRequest`, or an ApiError naming the field.

`messages` is the whole conversation, as chat clients send it with every request: system (or
developer), user and assistant messages, rendered with the checkpoint's chat template. The one image
(LLaVA-1.5 takes one per conversation) is an `image_url` part of any user message; the answer is
for the last message, a user's. Every refusal is listed in docs/serving.md.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.chat import Conversation, ConversationError, EmptyQuestion, MissingImage, TooManyImages
from runtime.messages import InvalidContent, UnsupportedMessage, parse_messages
from runtime.sampling import Sampling, SamplingError
from runtime.stops import StopError, check_stops
from serving.http.errors import ApiError, bad_request

_DATA_URL = re.compile(r"data:(?P<type>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)", re.DOTALL)
# Fields OpenAI defines whose non-default values this server cannot honour.
# (0, False and empty values pass: clients send the defaults.)
_UNSUPPORTED = (
    "tools",
    "functions",
    "tool_choice",
    "logit_bias",
    "response_format",
    "logprobs",
    "top_logprobs",
    "presence_penalty",
    "frequency_penalty",
)


@dataclass(frozen=True)
class ChatRequest:
    model: str
    conversation: Conversation
    image: bytes | Path  # the encoded image (a data: URL's bytes) or, with --allow-local-files, a path
    max_tokens: int | None  # None: the server's default
    sampling: Sampling
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    stop: tuple[str, ...] = ()  # the answer ends before the first of these


def _integer(body: dict[str, Any], key: str, low: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{key} must be an integer, got {value!r}", "invalid_type", key)
    if value < low:
        raise bad_request(f"{key} must be at least {low}, got {value}", "invalid_value", key)
    return value


def _number(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"{key} must be a number, got {value!r}", "invalid_type", key)
    return float(value)


def decode_image_url(url: Any, allow_local_files: bool) -> bytes | Path:
    """A `data:image/...;base64,` URL's bytes, or a local path where the server allows them."""
    param = "messages.content.image_url"
    if not isinstance(url, str) or not url:
        raise bad_request("image_url.url must be a non-empty string (a data: URL)", "invalid_image_url", param)
    match = _DATA_URL.fullmatch(url)
    if match:
        media = match["type"].strip().lower()
        if media and not media.startswith("image/"):
            raise bad_request(
                f"the data: URL holds {media!r}, not an image; send data:image/png;base64,... or image/jpeg",
                "invalid_image",
                param,
            )
        if ";base64" not in match["params"].lower():
            raise bad_request("the data: URL is not base64; send data:image/png;base64,...", "invalid_image", param)
        try:
            return base64.b64decode(re.sub(r"\s+", "", match["data"]), validate=True)
        except (binascii.Error, ValueError) as e:
            raise bad_request(
                f"the data: URL's base64 is broken ({e}); re-encode the image", "invalid_base64", param
            ) from None
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", url) and not url.startswith("file://"):
        raise bad_request(
            "the server fetches no URLs; send the image inline as a data:image/...;base64 URL",
            "unsupported_image_url",
            param,
        )
    if not allow_local_files:
        raise bad_request(
            "local image paths are off; send a data: URL, or start the server with --allow-local-files",
            "local_files_disabled",
            param,
        )
    return Path(url.removeprefix("file://"))


# A message-list fault's code, by its class (the most specific one that matches).
_MESSAGE_CODES: dict[type[Exception], str] = {
    TooManyImages: "too_many_images",
    MissingImage: "missing_image",
    UnsupportedMessage: "unsupported_messages",
    InvalidContent: "invalid_content",
    EmptyQuestion: "empty_prompt",
    ConversationError: "invalid_messages",
}


def _conversation_and_image(messages: Any, allow_local_files: bool) -> tuple[Conversation, bytes | Path]:
    try:
        parsed = parse_messages(messages, "messages", "an image_url part with a data:image/...;base64 URL")
    except ConversationError as e:
        code = next(code for kind, code in _MESSAGE_CODES.items() if isinstance(e, kind))
        raise bad_request(str(e), code, e.param or "messages") from None
    url = parsed.image.get("url") if isinstance(parsed.image, dict) else parsed.image
    return parsed.conversation, decode_image_url(url, allow_local_files)


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request(f"stop must be a string or a list of strings, got {value!r}", "invalid_type", "stop")
    try:
        return check_stops(stops)  # at most 4, none empty: the generation loop's own rule
    except StopError as e:
        raise bad_request(str(e), "invalid_value", "stop") from None


def parse_chat(body: Any, model_id: str, allow_local_files: bool) -> ChatRequest:
    """The request, every field checked; ApiError (400, or 404 for another model) otherwise."""
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object", "invalid_body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request(f"model is required; this server serves {model_id!r}", "missing_model", "model")
    if model != model_id:
        raise ApiError(
            404,
            f"the model {model!r} does not exist; this server serves {model_id!r} (GET /v1/models)",
            "model_not_found",
            "model",
        )
    for key in _UNSUPPORTED:
        if body.get(key) not in (None, False, [], {}):
            raise bad_request(f"{key} is not supported by this server; leave it out", "unsupported_parameter", key)
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise bad_request(f"n must be 1 (one answer per request), got {n}", "unsupported_parameter", "n")
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    seed = _integer(body, "seed", 0)
    try:
        sampling = Sampling(_number(body, "temperature", 0.0), _number(body, "top_p", 1.0), seed)
    except SamplingError as e:
        raise bad_request(str(e), "invalid_value", "temperature" if "temperature" in str(e) else "top_p") from None
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request(f"stream must be true or false, got {stream!r}", "invalid_type", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "invalid_type", "stream_options")
    stop = _stop(body)
    conversation, image = _conversation_and_image(body.get("messages"), allow_local_files)
    return ChatRequest(
        model, conversation, image, max_tokens, sampling, stream, bool(options.get("include_usage")), stop
    )
