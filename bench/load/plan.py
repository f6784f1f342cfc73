"""The mix of requests (Planned, the same for the same seed) and the HTTP body of each, bad ones included."""

from __future__ import annotations

import base64
import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.load.config import LoadConfig, LoadError

# The mix, by weight: streamed answers, non-streamed answers, bad requests, streams cut by their client,
# and whole conversations (a system prompt, the image in the first user turn, an assistant answer, a
# follow-up question), streamed or not.
MIX = (("stream", 3), ("json", 2), ("bad", 2), ("disconnect", 1), ("conversation", 2))
VALID_KINDS = ("stream", "json", "disconnect", "conversation")
# Each bad request and the status the server must refuse it with.
BAD_KINDS: dict[str, int] = {
    "malformed_json": 400,
    "no_image": 400,
    "two_images": 400,
    "remote_url": 400,
    "broken_base64": 400,
    "not_an_image": 400,
    "truncated_png": 400,
    "unknown_model": 404,
    "wrong_content_type": 415,
    "question_too_long": 400,
    "max_tokens_too_large": 400,
    "last_turn_assistant": 400,  # a conversation must end with the user's question
    "too_many_stops": 400,  # `stop` takes at most 4 strings
}
# Faults the server finds only when it decodes the image, which it does after the queue admitted the
# request (so a burst of requests never decodes many images at once): with a full queue these get
# 429 before their 400, as any request would.
FOUND_AFTER_ADMISSION = frozenset({"not_an_image", "truncated_png"})
LONG_QUESTION_WORDS = 3000  # over any build's prompt limit (1024 tokens by default)
BEYOND_CACHE_TOKENS = 100_000  # over any build's max sequence (2048 by default)
SYSTEM_PROMPT = "Answer in one word."


@dataclass(frozen=True)
class Planned:
    """One request of the mix."""

    index: int
    kind: str  # stream | json | disconnect | conversation | one of BAD_KINDS
    image: str  # an image of the examples
    question: str  # the last user turn's
    stream: bool
    # A conversation's system prompt and earlier (question, answer) turns, the image in the first one.
    system: str | None = None
    history: tuple[tuple[str, str], ...] = ()

    @property
    def bad(self) -> bool:
        return self.kind in BAD_KINDS

    @property
    def expected_status(self) -> int:
        return BAD_KINDS.get(self.kind, 200)

    @property
    def key(self) -> str:
        """The valid request it is (or is built from): image, conversation and question."""
        return request_key(self.image, self.question, self.system, self.history)

    def alone(self) -> Planned:
        """The same valid request as the reference pass sends it: alone, not streamed."""
        kind = "conversation" if self.history else "json"
        return Planned(-1, kind, self.image, self.question, False, self.system, self.history)


def request_key(image: str, question: str, system: str | None = None, history: tuple[tuple[str, str], ...] = ()) -> str:
    if not history and system is None:
        return f"{image}: {question}"
    turns = "".join(f"{q} -> {a} / " for q, a in history)
    return f"{image}: [{system or ''}] {turns}{question}"


def example_pairs(examples: Path) -> list[tuple[str, str]]:
    """(image file, question) of the examples, in file order."""
    path = examples / "questions.json"
    try:
        items = json.loads(path.read_text())
        pairs = [(str(item["image"]), str(item["question"])) for item in items]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LoadError(f"cannot read the example questions {path} ({e})") from None
    if not pairs:
        raise LoadError(f"{path} holds no questions")
    return pairs


def example_conversations(examples: Path) -> list[Planned]:
    """Two-turn conversations of the examples: the image and a question with its expected answer, then
    the next question about the same image (file order, wrapping round), under SYSTEM_PROMPT."""
    path = examples / "questions.json"
    try:
        items = [(str(i["image"]), str(i["question"]), str(i["answer"])) for i in json.loads(path.read_text())]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LoadError(f"cannot read the example questions and answers {path} ({e})") from None
    by_image: dict[str, list[tuple[str, str]]] = {}
    for image, question, answer in items:
        by_image.setdefault(image, []).append((question, answer))
    conversations = []
    for image, turns in by_image.items():
        for i, (question, answer) in enumerate(turns):
            follow_up = turns[(i + 1) % len(turns)][0]
            conversations.append(
                Planned(-1, "conversation", image, follow_up, False, SYSTEM_PROMPT, ((question, answer),))
            )
    return conversations


def _apportion(total: int, weights: tuple[tuple[str, int], ...]) -> dict[str, int]:
    """`total` split by weight, remainders to the largest fractions (ties in MIX order)."""
    whole = sum(w for _, w in weights)
    exact = {name: total * w / whole for name, w in weights}
    counts = {name: int(share) for name, share in exact.items()}
    left = total - sum(counts.values())
    for name in sorted(exact, key=lambda n: counts[n] - exact[n])[:left]:
        counts[name] += 1
    return counts


def plan_requests(
    config: LoadConfig, pairs: list[tuple[str, str]], conversations: list[Planned] | None = None
) -> list[Planned]:
    """The mix of `config.request_count` requests, the same for the same --seed.

    Single questions cycle through the example pairs, conversations through `conversations` (without
    any, their share goes to single questions) and bad requests through every bad kind (each appears
    once before any repeats), then the whole list is shuffled.
    """
    rng = random.Random(config.seed)
    mix = MIX if conversations else tuple((name, w) for name, w in MIX if name != "conversation")
    counts = _apportion(config.request_count, mix)
    order = pairs[:]
    rng.shuffle(order)
    talks = list(conversations or [])
    rng.shuffle(talks)
    bad_order = list(BAD_KINDS)
    rng.shuffle(bad_order)
    items: list[Planned] = []
    valid = [kind for kind in VALID_KINDS if kind != "conversation" for _ in range(counts[kind])]
    rng.shuffle(valid)  # so that each kind meets every pair, not a fixed slice of them
    for i, kind in enumerate(valid):
        image, question = order[i % len(order)]
        items.append(Planned(-1, kind, image, question, kind != "json"))
    for i in range(counts.get("conversation", 0)):
        talk = talks[i % len(talks)]
        # Half of them streamed: a conversation's answer must not depend on how it is delivered.
        items.append(Planned(-1, "conversation", talk.image, talk.question, i % 2 == 1, talk.system, talk.history))
    for i in range(counts["bad"]):
        image, question = rng.choice(pairs)
        # Streamed or not, a bad request is refused before any stream starts: both must get JSON.
        items.append(Planned(-1, bad_order[i % len(bad_order)], image, question, rng.random() < 0.5))
    rng.shuffle(items)
    return [dataclasses.replace(item, index=i) for i, item in enumerate(items)]


def _messages(item: Planned, question: str, urls: list[str]) -> list[dict[str, Any]]:
    """A single question: one user message, its text then its image(s). A conversation: the system
    prompt, the image before the first question (as OpenAI's examples put it), the assistant's answers
    as plain strings, the follow-up last."""
    images = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    if not item.history:
        return [{"role": "user", "content": [{"type": "text", "text": question}, *images]}]
    messages: list[dict[str, Any]] = [{"role": "system", "content": item.system}] if item.system else []
    for turn, (asked, answered) in enumerate(item.history):
        content = [*images, {"type": "text", "text": asked}] if turn == 0 else asked
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answered}]
    messages.append({"role": "user", "content": question})
    return messages


def _body(item: Planned, question: str, urls: list[str], model: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": _messages(item, question, urls),
        "stream": item.stream,
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def _data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def encode_request(
    item: Planned, images: dict[str, bytes], model: str, max_tokens: int
) -> tuple[bytes, dict[str, str]]:
    """The HTTP body and headers of a planned request."""
    png = images[item.image]
    url, question, tokens, urls = _data_url(png), item.question, max_tokens, None
    headers = {"Content-Type": "application/json"}
    kind = item.kind
    if kind == "no_image":
        urls = []
    elif kind == "two_images":
        urls = [url, url]
    elif kind == "remote_url":
        urls = ["http://example.com/x.png"]
    elif kind == "broken_base64":
        urls = ["data:image/png;base64,@@not-base64@@" + url[-64:]]
    elif kind == "not_an_image":
        urls = [_data_url(png[8:])]  # a PNG without its signature: no decoder recognises it
    elif kind == "truncated_png":
        urls = [_data_url(png[: len(png) // 2])]
    elif kind == "unknown_model":
        model = "no-such-model"
    elif kind == "wrong_content_type":
        headers = {"Content-Type": "text/plain"}
    elif kind == "question_too_long":
        words = question.split()
        question = " ".join(words[i % len(words)] for i in range(LONG_QUESTION_WORDS))
    elif kind == "max_tokens_too_large":
        tokens = BEYOND_CACHE_TOKENS
    fields = _body(item, question, [url] if urls is None else urls, model, tokens)
    if kind == "last_turn_assistant":
        fields["messages"].append({"role": "assistant", "content": "red"})
    elif kind == "too_many_stops":
        fields["stop"] = [".", "!", "?", "\n", ";"]
    body = json.dumps(fields).encode()
    if kind == "malformed_json":
        body = body[: len(body) // 2]  # cut mid-way, as a client that died while sending
    return body, headers
