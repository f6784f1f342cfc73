"""The HTTP server's conversations, stop strings and API key, through the official OpenAI client.

The same tiny build and in-thread uvicorn server as test_serve_api; every answer is checked against
`Pipeline.answer` on the same conversation.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
from test_serve_api import DATA_URL, PNG, client, serving  # noqa: E402

from runtime import Conversation, Message, Pipeline  # noqa: E402
from serving.__main__ import API_KEY_ENV, parse  # noqa: E402
from serving.http import ServeConfig  # noqa: E402

SYSTEM = "Be brief."
QUESTIONS = ("What colour?", "Any square?", "How many?")
TOKENS = 3  # a short answer per turn keeps three turns inside the tiny build's 64-token prompt
KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def build_dir(built):
    return built("llama", "cm").out


@pytest.fixture(scope="module")
def config(build_dir) -> ServeConfig:
    return ServeConfig(build=build_dir, max_queue=2)


@pytest.fixture(scope="module")
def reference(build_dir) -> Pipeline:
    return Pipeline.load(build_dir, provider="cpu")


@pytest.fixture(scope="module")
def server(config, reference) -> Iterator[str]:
    with serving(config, reference) as base:
        yield base


def _user(question: str, image: bool) -> dict:
    if not image:
        return {"role": "user", "content": question}
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": DATA_URL}}, {"type": "text", "text": question}],
    }


def _streamed(stream) -> tuple[str, str | None, list[str]]:
    pieces, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(pieces), finish, [p for p in pieces if p]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_three_turn_conversation_equals_the_pipeline(server, config, reference, stream) -> None:
    """A system prompt, the image in the first user turn, two follow-ups: each answer equals Pipeline.answer
    on the same conversation, and the answers go back into the history as assistant messages."""
    messages: list[dict] = [{"role": "system", "content": SYSTEM}]
    history = [Message("system", SYSTEM)]
    ask = client(server).chat.completions.create
    for turn, question in enumerate(QUESTIONS):
        messages.append(_user(question, image=turn == 0))
        history.append(Message("user", question, image=turn == 0))
        expected = reference.answer(PNG, Conversation(tuple(history)), max_new_tokens=TOKENS)
        if stream:
            text, finish, _ = _streamed(ask(model=config.model_id, messages=messages, max_tokens=TOKENS, stream=True))
        else:
            reply = ask(model=config.model_id, messages=messages, max_tokens=TOKENS)
            text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
            assert reply.usage.prompt_tokens == expected.prompt_tokens
        assert text == expected.text, f"turn {turn + 1}"
        assert finish == expected.finish_reason
        messages.append({"role": "assistant", "content": text})
        history.append(Message("assistant", text))
    # The conversation really grew: the last prompt is longer than the first turn's.
    first = reference.encode(Conversation(tuple(history[:2])))[0].prompt_tokens
    assert expected.prompt_tokens > first + 6


def test_the_image_may_come_in_a_later_user_turn(server, config, reference) -> None:
    messages = [
        {"role": "developer", "content": SYSTEM},  # OpenAI's newer name for system
        {"role": "user", "content": "Hello."},
        {"role": "assistant", "content": "Hi."},
        _user(QUESTIONS[0], image=True),
    ]
    history = (
        Message("system", SYSTEM),
        Message("user", "Hello."),
        Message("assistant", "Hi."),
        Message("user", QUESTIONS[0], image=True),
    )
    expected = reference.answer(PNG, Conversation(history), max_new_tokens=TOKENS)
    reply = client(server).chat.completions.create(model=config.model_id, messages=messages, max_tokens=TOKENS)
    assert reply.choices[0].message.content == expected.text


def _stop_across_chunks(pieces: list[str]) -> str:
    """A stop string made of the end of one streamed piece and the start of the next."""
    for a, b in itertools.pairwise(pieces):
        if a.strip() and b.strip():
            return a[-2:] + b[:2]
    raise AssertionError(f"the answer has no two neighbouring non-blank pieces: {pieces}")


def test_stop_cuts_the_answer_across_streamed_chunks(server, config, reference) -> None:
    messages = [_user(QUESTIONS[0], image=True)]
    ask = client(server).chat.completions.create
    full, _, pieces = _streamed(ask(model=config.model_id, messages=messages, max_tokens=16, stream=True))
    stop = _stop_across_chunks(pieces)
    expected = full[: full.index(stop)]
    assert reference.answer(PNG, QUESTIONS[0], max_new_tokens=16, stop=(stop,)).text == expected.strip()

    text, finish, _ = _streamed(
        ask(model=config.model_id, messages=messages, max_tokens=16, stream=True, stop=[stop, "never-seen"])
    )
    assert (text, finish) == (expected, "stop")
    reply = ask(model=config.model_id, messages=messages, max_tokens=16, stop=stop)  # a string alone
    assert reply.choices[0].message.content == expected.strip()
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < 16 or full.index(stop) == 0

    reply = ask(model=config.model_id, messages=messages, max_tokens=16, stop=["never-seen"])
    assert reply.choices[0].message.content == full.strip()


@pytest.fixture(scope="module")
def locked(config, reference) -> Iterator[str]:
    with serving(replace(config, api_key=KEY), reference) as base:
        yield base


def _refused(response, code: str = "invalid_api_key") -> None:
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error"
    assert response.headers["www-authenticate"] == "Bearer"
    assert KEY not in response.text


def test_a_server_with_a_key_refuses_requests_without_it(locked, config) -> None:
    body = {"model": config.model_id, "messages": [_user(QUESTIONS[0], True)], "max_tokens": 2}
    _refused(httpx.post(f"{locked}/v1/chat/completions", json=body))
    _refused(httpx.post(f"{locked}/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"}))
    _refused(httpx.post(f"{locked}/v1/chat/completions", json=body, headers={"Authorization": KEY}))  # no scheme
    _refused(httpx.get(f"{locked}/v1/models"))
    _refused(httpx.get(f"{locked}/v1/models/{config.model_id}"))
    _refused(httpx.get(f"{locked}/metrics"))
    assert httpx.get(f"{locked}/health").json()["status"] == "ok"  # load balancers probe without a key
    assert httpx.get(f"{locked}/").status_code == 200  # the page asks for the key itself
    with pytest.raises(openai.AuthenticationError):
        client(locked).chat.completions.create(model=config.model_id, messages=body["messages"], max_tokens=2)

    keyed = openai.OpenAI(base_url=f"{locked}/v1", api_key=KEY, max_retries=0, timeout=60)
    reply = keyed.chat.completions.create(model=config.model_id, messages=body["messages"], max_tokens=2)
    assert reply.choices[0].message.content is not None
    assert [m.id for m in keyed.models.list().data] == [config.model_id]
    metrics = httpx.get(f"{locked}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'corematching_errors_total{kind="invalid_api_key"}' in metrics


def test_metrics_open_leaves_only_metrics_without_the_key(config, reference) -> None:
    with serving(replace(config, api_key=KEY, metrics_open=True), reference) as base:
        assert httpx.get(f"{base}/metrics").status_code == 200
        _refused(httpx.get(f"{base}/v1/models"))


def test_the_key_comes_from_the_environment_and_stays_out_of_repr(monkeypatch, build_dir) -> None:
    monkeypatch.setenv(API_KEY_ENV, KEY)
    assert parse([]).api_key == KEY
    assert parse(["--api-key", "other"]).api_key == "other"
    assert KEY not in repr(ServeConfig(build=build_dir, api_key=KEY))
    monkeypatch.setenv(API_KEY_ENV, "")
    assert parse([]).api_key is None


def test_listening_beyond_loopback_without_a_key_warns(tmp_path) -> None:
    def run(*flags: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "serving", "--build", str(tmp_path / "none"), *flags]
        env = {k: v for k, v in __import__("os").environ.items() if k != API_KEY_ENV}
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)

    warned = run("--host", "0.0.0.0")
    assert "warning: listening on 0.0.0.0 without an API key" in warned.stderr
    assert warned.returncode == 2 and "Traceback" not in warned.stderr  # then the missing build: one line
    for flags in (("--host", "127.0.0.1"), ("--host", "0.0.0.0", "--api-key", KEY)):
        quiet = run(*flags)
        assert "warning" not in quiet.stderr and quiet.returncode == 2
        assert KEY not in quiet.stderr


def test_fields_at_their_defaults_are_accepted(server, config) -> None:
    """Chat clients send the refused fields at their defaults; those change nothing and pass."""
    body = {
        "model": config.model_id,
        "messages": [_user(QUESTIONS[0], True)],
        "max_tokens": 2,
        "n": 1,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logprobs": False,
        "user": "someone",
        "stop": None,
    }
    assert httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60).status_code == 200
