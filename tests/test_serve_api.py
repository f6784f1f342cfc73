"""The HTTP server (serving/http): the official OpenAI client, bad requests, the queue, disconnects, timeouts.

A real uvicorn server on a loopback socket, in a thread, on a tiny random-weight build. A pipeline
wrapper (`Paced`) lets a test hold an answer between tokens, so queueing and disconnects are
checked without relying on timing.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
import uvicorn  # noqa: E402
from PIL import Image  # noqa: E402

from runtime import Pipeline  # noqa: E402
from serving.http import ServeConfig, ServeConfigError, create_app  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "shapes_red_circle.png"
PNG = EXAMPLE.read_bytes()
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
QUESTION = "What colour is the circle?"


def message(question: str = QUESTION, url: str = DATA_URL) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}],
        }
    ]


class Paced:
    """A pipeline whose answers advance one token per `release()` (everything else is the real pipeline)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        self._steps = threading.Semaphore(0)
        self.yielded: list[int] = []  # tokens each finished generation yielded
        self.started = threading.Event()

    def __getattr__(self, name: str):
        return getattr(self._pipeline, name)

    def release(self, n: int = 1) -> None:
        self._steps.release(n)

    def generate(self, prompt, sampling=None, stop_at_eos=True, stop=()):
        inner = self._pipeline.generate(prompt, sampling, stop_at_eos, stop=stop)
        count = 0
        self.started.set()
        try:
            while True:
                if not self._steps.acquire(timeout=30):
                    raise RuntimeError("the test never released the next token")
                try:
                    item = next(inner)
                except StopIteration as done:
                    return done.value
                count += 1
                yield item
        finally:
            inner.close()
            self.yielded.append(count)


@contextmanager
def serving(config: ServeConfig, pipeline) -> Iterator[str]:
    """A uvicorn server for the app on a free loopback port; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(config, pipeline), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def wait_for(condition, what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def metric(base: str, line: str) -> float:
    for row in httpx.get(f"{base}/metrics").text.splitlines():
        if row.startswith(line + " "):
            return float(row.split()[-1])
    return 0.0


@pytest.fixture(scope="module")
def build_dir(built) -> Path:
    return built("llama", "cm").out


@pytest.fixture(scope="module")
def config(build_dir) -> ServeConfig:
    return ServeConfig(build=build_dir, max_queue=2, max_body_bytes=1024 * 1024, max_image_pixels=400_000)


@pytest.fixture(scope="module")
def server(config, build_dir) -> Iterator[str]:
    with serving(config, Pipeline.load(build_dir, provider="cpu")) as base:
        yield base


@pytest.fixture(scope="module")
def reference(build_dir) -> Pipeline:
    return Pipeline.load(build_dir, provider="cpu")


def client(base: str):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


def test_the_openai_client_gets_the_runtime_answer(server, config, reference) -> None:
    expected = reference.answer(EXAMPLE, QUESTION, max_new_tokens=12)
    reply = client(server).chat.completions.create(model=config.model_id, messages=message(), max_tokens=12)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    extra = reply.model_extra["corematching"]
    assert extra["kept_image_tokens"] == expected.kept_image_tokens
    assert extra["num_image_tokens"] == expected.num_image_tokens
    assert extra["timings"]["prefill"] > 0 and extra["timings"]["time_to_first_token"] > 0


def test_the_openai_client_streams_the_same_answer(server, config, reference) -> None:
    expected = reference.answer(EXAMPLE, QUESTION, max_new_tokens=12)
    stream = client(server).chat.completions.create(
        model=config.model_id, messages=message(), max_tokens=12, stream=True, stream_options={"include_usage": True}
    )
    pieces, finish, usage, extra = [], None, None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
        extra = (chunk.model_extra or {}).get("corematching", extra)
    assert "".join(pieces) == expected.text
    assert sum(1 for p in pieces if p) >= 2  # token by token, not one chunk at the end
    assert finish in ("stop", "length")
    assert usage.completion_tokens == len(expected.token_ids)
    assert extra["kept_image_tokens"] == expected.kept_image_tokens


def test_sampling_with_a_seed_repeats(server, config) -> None:
    ask = client(server).chat.completions.create
    replies = [
        ask(model=config.model_id, messages=message(), max_tokens=10, temperature=0.9, top_p=0.8, seed=7)
        for _ in range(2)
    ]
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content


def test_models_health_and_metrics(server, config) -> None:
    models = client(server).models.list()
    assert [m.id for m in models.data] == [config.model_id]
    card = httpx.get(f"{server}/v1/models/{config.model_id}").json()["corematching"]
    assert card["method"] == "corematching" and card["token_budget"] == 5 and card["image_size"] > 0
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["queue"] == 0
    client(server).chat.completions.create(model=config.model_id, messages=message(), max_tokens=3)
    text = httpx.get(f"{server}/metrics").text
    for name in (
        "corematching_requests_total",
        "corematching_errors_total",
        "corematching_queue_depth",
        "corematching_time_to_first_token_seconds_count",
        "corematching_decode_tokens_per_second_count",
        "corematching_kept_image_tokens_sum",
    ):
        assert name in text
    assert metric(server, 'corematching_requests_total{status="200"}') >= 1
    assert metric(server, "corematching_kept_image_tokens_count") >= 1


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _png(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


def _body(**changes) -> dict:
    return {"model": "llama-cm", "messages": message(), "max_tokens": 4, **changes}


BAD_REQUESTS = {
    "malformed JSON": (b'{"model": "llama-cm", "messages": [', "application/json", 400, "invalid_json"),
    "wrong content type": (json.dumps(_body()).encode(), "text/plain", 415, "invalid_media"),
    "not an object": (b"[1, 2]", "application/json", 400, "invalid_body"),
    "unknown model": (_body(model="gpt-4o"), None, 404, "model_not_found"),
    "no model": ({"messages": message()}, None, 400, "missing_model"),
    "no image": (_body(messages=[{"role": "user", "content": QUESTION}]), None, 400, "missing_image"),
    "two images": (
        _body(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": QUESTION},
                        {"type": "image_url", "image_url": {"url": DATA_URL}},
                        {"type": "image_url", "image_url": {"url": DATA_URL}},
                    ],
                }
            ]
        ),
        None,
        400,
        "too_many_images",
    ),
    "an http URL": (_body(messages=message(url="http://example.com/a.png")), None, 400, "unsupported_image_url"),
    "a local path": (_body(messages=message(url=str(EXAMPLE))), None, 400, "local_files_disabled"),
    "broken base64": (_body(messages=message(url="data:image/png;base64,iVBORw0KGgo!!!")), None, 400, "invalid_base64"),
    "a text data URL": (
        _body(messages=message(url="data:text/plain;base64," + _b64(b"hello"))),
        None,
        400,
        "invalid_image",
    ),
    "not an image": (
        _body(messages=message(url="data:image/png;base64," + _b64(b"hello"))),
        None,
        400,
        "invalid_image",
    ),
    "a truncated image": (
        _body(messages=message(url="data:image/png;base64," + _b64(PNG[: len(PNG) // 2]))),
        None,
        400,
        "invalid_image",
    ),
    "a decompression bomb": (
        _body(messages=message(url="data:image/png;base64," + _b64(_png((1000, 1000))))),
        None,
        400,
        "image_too_large",
    ),
    "an empty question": (_body(messages=message(question="   ")), None, 400, "empty_prompt"),
    "an over-long question": (_body(messages=message(question="word " * 400)), None, 400, "prompt_too_long"),
    "max_tokens beyond the cache": (_body(max_tokens=100_000), None, 400, "max_tokens_too_large"),
    "max_tokens zero": (_body(max_tokens=0), None, 400, "invalid_value"),
    "a string temperature": (_body(temperature="hot"), None, 400, "invalid_type"),
    "top_p out of range": (_body(top_p=1.5), None, 400, "invalid_value"),
    "an image in two turns": (
        _body(messages=[*message(), {"role": "assistant", "content": "red"}, *message()]),
        None,
        400,
        "too_many_images",
    ),
    "a tool message": (
        _body(messages=[*message(), {"role": "tool", "content": "42", "tool_call_id": "a"}]),
        None,
        400,
        "unsupported_messages",
    ),
    "the assistant last": (
        _body(messages=[*message(), {"role": "assistant", "content": "red"}]),
        None,
        400,
        "invalid_messages",
    ),
    "an image from the assistant": (
        _body(
            messages=[
                {"role": "user", "content": QUESTION},
                {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": DATA_URL}}]},
                {"role": "user", "content": QUESTION},
            ]
        ),
        None,
        400,
        "invalid_messages",
    ),
    "a conversation too long": (
        _body(messages=[*message(), *[{"role": "user", "content": "word " * 100}] * 4]),
        None,
        400,
        "prompt_too_long",
    ),
    "five stop strings": (_body(stop=["a", "b", "c", "d", "e"]), None, 400, "invalid_value"),
    "an empty stop string": (_body(stop=[""]), None, 400, "invalid_value"),
    "a numeric stop": (_body(stop=7), None, 400, "invalid_type"),
    "n of 2": (_body(n=2), None, 400, "unsupported_parameter"),
    "a presence penalty": (_body(presence_penalty=0.5), None, 400, "unsupported_parameter"),
    "logprobs": (_body(logprobs=True), None, 400, "unsupported_parameter"),
    "a body over the limit": (_body(padding="x" * 1_200_000), None, 413, "body_too_large"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_a_bad_request_gets_an_openai_error_and_the_server_goes_on(server, case, caplog) -> None:
    body, media, status, code = BAD_REQUESTS[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        f"{server}/v1/chat/completions", content=content, headers={"content-type": media or "application/json"}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    assert error["message"] and "\n" not in error["message"]
    assert "Traceback" not in caplog.text
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_the_openai_client_raises_on_a_bad_request(server, config) -> None:
    with pytest.raises(openai.BadRequestError, match="no image"):
        client(server).chat.completions.create(
            model=config.model_id, messages=[{"role": "user", "content": QUESTION}], max_tokens=3
        )
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="another", messages=message(), max_tokens=3)


def test_a_bad_request_does_not_change_the_next_answer(server, config, reference) -> None:
    expected = reference.answer(EXAMPLE, QUESTION, max_new_tokens=8).text
    for case in ("a truncated image", "max_tokens beyond the cache", "malformed JSON"):
        body, _media, _status, _code = BAD_REQUESTS[case]
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        httpx.post(f"{server}/v1/chat/completions", content=content, headers={"content-type": "application/json"})
        reply = client(server).chat.completions.create(model=config.model_id, messages=message(), max_tokens=8)
        assert reply.choices[0].message.content == expected


def test_unknown_routes_and_methods_are_json_errors(server) -> None:
    missing = httpx.get(f"{server}/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = httpx.get(f"{server}/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def _stream_first_content(http: httpx.Client, base: str, max_tokens: int):
    """Opens a streamed request and reads up to its first content chunk; returns the open response."""
    request = http.build_request("POST", f"{base}/v1/chat/completions", json=_body(stream=True, max_tokens=max_tokens))
    response = http.send(request, stream=True)
    assert response.status_code == 200
    lines = response.iter_lines()
    for line in lines:
        if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
            return response
    raise AssertionError("the stream ended before any content")


@pytest.fixture
def paced(config, build_dir):
    pipeline = Paced(Pipeline.load(build_dir, provider="cpu"))
    with serving(replace(config, max_queue=1), pipeline) as base:
        yield base, pipeline


def test_a_client_that_disconnects_mid_stream_stops_its_generation(paced, reference) -> None:
    base, pipeline = paced
    with httpx.Client(timeout=30) as http:
        pipeline.release(1)
        response = _stream_first_content(http, base, max_tokens=40)
        response.close()
    wait_for(lambda: metric(base, 'corematching_errors_total{kind="client_disconnected"}') == 1, "the disconnect")
    pipeline.release(100)  # the generation may take its next token, then must stop
    wait_for(lambda: pipeline.yielded, "the generation to end")
    assert pipeline.yielded[0] <= 2, f"the generation went on for {pipeline.yielded[0]} tokens"
    backend = pipeline.backend
    assert backend._state is None and not backend._buffers, "the request's cache was not freed"
    # The next request is answered as if nothing had happened.
    reply = client(base).chat.completions.create(model="llama-cm", messages=message(), max_tokens=8)
    assert reply.choices[0].message.content == reference.answer(EXAMPLE, QUESTION, max_new_tokens=8).text


def test_the_queue_is_fifo_bounded_and_answers_429_with_retry_after(paced, reference) -> None:
    base, pipeline = paced
    results: dict[str, httpx.Response] = {}

    def ask(name: str) -> None:
        results[name] = httpx.post(f"{base}/v1/chat/completions", json=_body(max_tokens=6), timeout=60)

    first = threading.Thread(target=ask, args=("first",))
    first.start()
    wait_for(pipeline.started.is_set, "the first request to run")
    second = threading.Thread(target=ask, args=("second",))
    second.start()
    wait_for(lambda: httpx.get(f"{base}/health").json()["queue"] == 1, "the second request to wait")
    third = httpx.post(f"{base}/v1/chat/completions", json=_body(max_tokens=6), timeout=60)
    assert third.status_code == 429
    assert int(third.headers["retry-after"]) >= 1
    assert third.json()["error"]["code"] == "queue_full" and third.json()["error"]["type"] == "rate_limit_error"
    pipeline.release(1000)
    first.join(60)
    second.join(60)
    expected = reference.answer(EXAMPLE, QUESTION, max_new_tokens=6).text
    assert [results[n].status_code for n in ("first", "second")] == [200, 200]
    assert [results[n].json()["choices"][0]["message"]["content"] for n in ("first", "second")] == [expected] * 2
    assert metric(base, 'corematching_errors_total{kind="queue_full"}') == 1


def test_a_request_past_its_timeout_gets_504_and_frees_the_pipeline(config, build_dir) -> None:
    pipeline = Paced(Pipeline.load(build_dir, provider="cpu"))
    with serving(replace(config, timeout=0.5), pipeline) as base:
        response = httpx.post(f"{base}/v1/chat/completions", json=_body(max_tokens=6), timeout=30)
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        pipeline.release(1000)
        wait_for(lambda: not httpx.get(f"{base}/health").json()["busy"], "the abandoned request to stop")
        assert pipeline.yielded and pipeline.yielded[0] <= 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"port": 0}, "--port"),
        ({"max_queue": -1}, "--max-queue"),
        ({"timeout": -1.0}, "--timeout"),
        ({"provider": "gpu"}, "--provider"),
        ({"max_body_bytes": 10}, "--max-body-mb"),
    ],
)
def test_server_settings_are_checked(changes, message, tmp_path) -> None:
    with pytest.raises(ServeConfigError, match=message):
        ServeConfig(build=tmp_path, **changes)


def test_the_command_refuses_a_missing_build_in_one_line(tmp_path, capsys) -> None:
    from serving.__main__ import main

    assert main(["--build", str(tmp_path / "nothing"), "--port", "8765"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_a_client_that_leaves_a_non_streamed_request_stops_its_generation(paced) -> None:
    base, pipeline = paced
    pipeline.release(2)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{base}/v1/chat/completions", json=_body(max_tokens=40), timeout=httpx.Timeout(10, read=1.0))
    wait_for(lambda: metric(base, 'corematching_errors_total{kind="client_disconnected"}') == 1, "the disconnect")
    pipeline.release(100)
    wait_for(lambda: pipeline.yielded, "the generation to end")
    assert pipeline.yielded[0] <= 3, f"the generation went on for {pipeline.yielded[0]} tokens"
    assert metric(base, 'corematching_requests_total{status="499"}') == 1
