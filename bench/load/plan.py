"""The mix of requests (Planned, the same for the same seed) and the HTTP body of each, bad ones included."""

from __future__ import annotations

import base64
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.load.config import LoadConfig, LoadError

# The mix, by weight: streamed answers, non-streamed answers, bad requests, streams cut by their client.
MIX = (("stream", 3), ("json", 2), ("bad", 2), ("disconnect", 1))
VALID_KINDS = ("stream", "json", "disconnect")
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
}
# Faults the server finds only when it decodes the image, which it does after the queue admitted the
# request (so a burst of requests never decodes many images at once): with a full queue these get
# 429 before their 400, as any request would.
FOUND_AFTER_ADMISSION = frozenset({"not_an_image", "truncated_png"})
LONG_QUESTION_WORDS = 3000  # over any build's prompt limit (1024 tokens by default)
BEYOND_CACHE_TOKENS = 100_000  # over any build's max sequence (2048 by default)


@dataclass(frozen=True)
class Planned:
    """One request of the mix."""

    index: int
    kind: str  # stream | json | disconnect | one of BAD_KINDS
    image: str  # an image of the examples
    question: str
    stream: bool

    @property
    def bad(self) -> bool:
        return self.kind in BAD_KINDS

    @property
    def expected_status(self) -> int:
        return BAD_KINDS.get(self.kind, 200)

    @property
    def key(self) -> str:
        """The valid request it is (or is built from): image and question."""
        return request_key(self.image, self.question)


def request_key(image: str, question: str) -> str:
    return f"{image}: {question}"


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


def _apportion(total: int, weights: tuple[tuple[str, int], ...]) -> dict[str, int]:
    """`total` split by weight, remainders to the largest fractions (ties in MIX order)."""
    whole = sum(w for _, w in weights)
    exact = {name: total * w / whole for name, w in weights}
    counts = {name: int(share) for name, share in exact.items()}
    left = total - sum(counts.values())
    for name in sorted(exact, key=lambda n: counts[n] - exact[n])[:left]:
        counts[name] += 1
    return counts


def plan_requests(config: LoadConfig, pairs: list[tuple[str, str]]) -> list[Planned]:
    """The mix of `config.requests` requests, the same for the same --seed.

    Valid requests cycle through the example pairs and bad ones through every bad kind (each appears
    once before any repeats), then the whole list is shuffled.
    """
    rng = random.Random(config.seed)
    counts = _apportion(config.requests, MIX)
    order = pairs[:]
    rng.shuffle(order)
    bad_order = list(BAD_KINDS)
    rng.shuffle(bad_order)
    items: list[tuple[str, str, str, bool]] = []
    valid = [kind for kind in VALID_KINDS for _ in range(counts[kind])]
    rng.shuffle(valid)  # so that each kind meets every pair, not a fixed slice of them
    for i, kind in enumerate(valid):
        image, question = order[i % len(order)]
        items.append((kind, image, question, kind != "json"))
    for i in range(counts["bad"]):
        image, question = rng.choice(pairs)
        # Streamed or not, a bad request is refused before any stream starts: both must get JSON.
        items.append((bad_order[i % len(bad_order)], image, question, rng.random() < 0.5))
    rng.shuffle(items)
    return [Planned(i, kind, image, question, stream) for i, (kind, image, question, stream) in enumerate(items)]


def _body(question: str, urls: list[str], model: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": question}]
    content += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
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
    body = json.dumps(_body(question, [url] if urls is None else urls, model, tokens, item.stream)).encode()
    if kind == "malformed_json":
        body = body[: len(body) // 2]  # cut mid-way, as a client that died while sending
    return body, headers
