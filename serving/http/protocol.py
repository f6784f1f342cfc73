"""An OpenAI chat-completions request body -> a typed `ChatRequest`, or an ApiError naming the field.

The server answers one user message holding one question and one image, as the build's prompt
format does (a single turn; the build carries its own system prompt).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.sampling import Sampling, SamplingError
from serving.http.errors import ApiError, bad_request

_DATA_URL = re.compile(r"data:(?P<type>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)", re.DOTALL)
# Fields OpenAI defines whose non-default values this server cannot honour.
_UNSUPPORTED = ("tools", "functions", "tool_choice", "logit_bias", "response_format", "stop", "logprobs")


@dataclass(frozen=True)
class ChatRequest:
    model: str
    question: str
    image: bytes | Path  # the encoded image (a data: URL's bytes) or, with --allow-local-files, a path
    max_tokens: int | None  # None: the server's default
    sampling: Sampling
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage


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


def _parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(part, dict) for part in content):
        raise bad_request(
            "a message's content must be a string or a list of {type: text | image_url} parts",
            "invalid_content",
            "messages.content",
        )
    return content


def _question_and_image(messages: Any, allow_local_files: bool) -> tuple[str, bytes | Path]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "invalid_messages", "messages")
    if not all(isinstance(m, dict) for m in messages):
        raise bad_request("each message must be an object with role and content", "invalid_messages", "messages")
    roles = [m.get("role") for m in messages]
    if roles != ["user"]:
        raise bad_request(
            f"send one user message with the question and the image (got roles {roles}); this build answers a "
            "single turn with its own system prompt",
            "unsupported_messages",
            "messages",
        )
    texts: list[str] = []
    images: list[Any] = []
    for part in _parts(messages[0].get("content")):
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request("a text part needs a string text", "invalid_content", "messages.content")
            texts.append(part["text"])
        elif kind == "image_url":
            image_url = part.get("image_url")
            images.append(image_url.get("url") if isinstance(image_url, dict) else image_url)
        else:
            raise bad_request(
                f"unknown content part type {kind!r}; use text and image_url", "invalid_content", "messages.content"
            )
    if not images:
        raise bad_request("the message has no image; add one image_url part", "missing_image", "messages.content")
    if len(images) > 1:
        raise bad_request(
            f"the message has {len(images)} images; this model takes one image per request",
            "too_many_images",
            "messages.content",
        )
    question = " ".join(t.strip() for t in texts if t.strip())
    if not question:
        raise bad_request("the question is empty; add a text part", "empty_prompt", "messages.content")
    return question, decode_image_url(images[0], allow_local_files)


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
    question, image = _question_and_image(body.get("messages"), allow_local_files)
    return ChatRequest(model, question, image, max_tokens, sampling, stream, bool(options.get("include_usage")))
