"""One request of the mix sent and read (a stream chunk by chunk), and what it got (Outcome)."""

from __future__ import annotations

import json
import time
from dataclasses import KW_ONLY, dataclass
from typing import Any

import httpx

from bench.load.plan import FOUND_AFTER_ADMISSION, Planned

CHAT = "/v1/chat/completions"


@dataclass
class Outcome:
    """What one request got. result: completed | rejected (429) | refused (the expected 4xx) |
    disconnected (the client hung up after the first content chunk) | failed | cut (in flight at the time limit)."""

    index: int
    kind: str
    key: str
    stream: bool
    result: str
    _: KW_ONLY  # the rest by name: several are alike in type
    phase: str = "load"  # reference | warmup | load | final
    status: int | None = None
    detail: str = ""  # a failure's kind, a refusal's error code
    answer: str | None = None
    ttft: float | None = None  # seconds from sending to the first content chunk (non-streamed: to the response)
    total: float | None = None  # seconds from sending to the end of the answer (or of the refusal)
    server_ttft: float | None = None  # the server's own corematching.timings.time_to_first_token
    started: float | None = None  # seconds from the start of the load to sending (soak and kill runs)

    @property
    def connection_error(self) -> bool:
        """The connection failed or broke: refused, reset, or closed before the answer was whole."""
        return self.result == "failed" and (
            (self.detail.startswith("transport_") and "Timeout" not in self.detail)
            or self.detail == "stream_ended_without_done"
        )

    @property
    def server_error(self) -> bool:
        return self.result == "failed" and self.status is not None and self.status >= 500


def openai_error(body: Any) -> dict[str, Any] | None:
    """The `error` object of an OpenAI-shaped error body, or None if the body is not one."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return None
    error = body["error"]
    if set(error) < {"message", "type", "param", "code"} or not (
        isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    ):
        return None
    return error


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


def _not_ok(item: Planned, status: int, headers: httpx.Headers, data: bytes) -> Outcome:
    """A non-200 answer: a refusal as expected, a 429, or a failure."""
    error = openai_error(_json(data))
    code = "" if error is None else str(error.get("code"))
    outcome = Outcome(item.index, item.kind, item.key, item.stream, "failed", status=status, detail=code)
    if item.bad and not (status == 429 and item.kind in FOUND_AFTER_ADMISSION):
        if status == item.expected_status:
            outcome.result, outcome.detail = ("refused", code) if error else ("failed", "error_not_openai_shaped")
        else:
            outcome.detail = f"status_{status}_expected_{item.expected_status}"
    elif status == 429:
        if error is None:
            outcome.detail = "429_not_openai_shaped"
        elif not headers.get("retry-after", "").isdigit():
            outcome.detail = "429_without_retry_after"
        else:
            outcome.result = "rejected"
    else:
        outcome.detail = f"status_{status}" + (f"_{code}" if code else "")
    return outcome


async def send(
    client: httpx.AsyncClient, item: Planned, body: bytes, headers: dict[str, str], phase: str = "load"
) -> Outcome:
    """Sends one request and reads its answer (a disconnecting one: up to its first content chunk)."""
    start = time.perf_counter()
    outcome = await _send(client, item, body, headers)
    outcome.phase = phase
    if outcome.total is None:  # a refusal's or a 429's latency: how long admission takes to say no
        outcome.total = time.perf_counter() - start
    return outcome


async def _send(client: httpx.AsyncClient, item: Planned, body: bytes, headers: dict[str, str]) -> Outcome:
    outcome = Outcome(item.index, item.kind, item.key, item.stream, "failed")
    start = time.perf_counter()
    try:
        if not item.stream:
            response = await client.post(CHAT, content=body, headers=headers)
            elapsed = time.perf_counter() - start
            if response.status_code != 200:
                return _not_ok(item, response.status_code, response.headers, response.content)
            outcome.status = 200
            if item.bad:
                outcome.detail = "bad_request_answered"
                return outcome
            answer = _json(response.content)
            try:
                outcome.answer = answer["choices"][0]["message"]["content"]
                outcome.server_ttft = (answer.get("corematching") or {}).get("timings", {}).get("time_to_first_token")
            except (TypeError, KeyError, IndexError, AttributeError):
                outcome.detail = "answer_not_openai_shaped"
                return outcome
            outcome.result, outcome.ttft, outcome.total = "completed", elapsed, elapsed
            return outcome
        async with client.stream("POST", CHAT, content=body, headers=headers) as response:
            if response.status_code != 200:
                data = await response.aread()
                return _not_ok(item, response.status_code, response.headers, data)
            outcome.status = 200
            if item.bad:
                outcome.detail = "bad_request_answered"
                return outcome
            return await _read_stream(item, response, outcome, start)
    except httpx.HTTPError as e:
        outcome.detail = f"transport_{type(e).__name__}"
        return outcome


async def _read_stream(item: Planned, response: httpx.Response, outcome: Outcome, start: float) -> Outcome:
    text = ""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            outcome.result, outcome.answer = "completed", text
            outcome.total = time.perf_counter() - start
            if outcome.ttft is None:  # an empty answer: no content chunk, the end is the first answer
                outcome.ttft = outcome.total
            return outcome
        chunk = _json(data.encode())
        if not isinstance(chunk, dict):
            outcome.detail = "stream_chunk_not_json"
            return outcome
        if "error" in chunk:  # headers were sent: a failure after them comes in the stream
            error = openai_error(chunk)
            outcome.detail = "stream_error_" + (str(error.get("code")) if error else "not_openai_shaped")
            return outcome
        extra = chunk.get("corematching")
        if isinstance(extra, dict):
            outcome.server_ttft = (extra.get("timings") or {}).get("time_to_first_token")
        choices = chunk.get("choices") or []
        piece = (choices[0].get("delta") or {}).get("content") if choices and isinstance(choices[0], dict) else None
        if piece:
            if outcome.ttft is None:
                outcome.ttft = time.perf_counter() - start
            text += piece
            if item.kind == "disconnect":
                # Leaving the `async with` closes the connection mid-stream: the server must stop and free.
                outcome.result, outcome.answer = "disconnected", text
                return outcome
    outcome.detail = "stream_ended_without_done"
    outcome.answer = text
    return outcome
