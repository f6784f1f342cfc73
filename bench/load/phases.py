"""The phases every mode shares: the mix made ready, the reference pass, the warm-up bursts, and the
load itself (N clients taking the plan in order, paced or not, with hooks for the kill run)."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import logging
import os
import platform
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from bench.load.client import Outcome, send
from bench.load.config import MIB, LoadConfig, LoadError
from bench.load.plan import Planned, encode_request, example_conversations, example_pairs, plan_requests
from bench.load.server import health, read_rss, wait_idle

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]  # (phase, done, total)
Bodies = dict[int, tuple[bytes, dict[str, str]]]


@dataclass(frozen=True)
class Environment:
    """What the server ran on: a started server runs on this interpreter; a --url one on this machine."""

    python: str
    onnxruntime: str | None
    platform: str
    machine: str
    cpu_count: int | None


def environment() -> Environment:
    ort = None
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            ort = importlib.metadata.version(name)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    return Environment(platform.python_version(), ort, platform.platform(), platform.machine(), os.cpu_count())


@dataclass(frozen=True)
class Prepared:
    """The run's requests: the plan, each distinct valid request as sent alone, and the images' bytes."""

    plan: list[Planned]
    distinct: list[Planned]
    images: dict[str, bytes]

    def encode(self, item: Planned, model: str, max_tokens: int) -> tuple[bytes, dict[str, str]]:
        return encode_request(item, self.images, model, max_tokens)


def prepare(config: LoadConfig) -> Prepared:
    pairs = example_pairs(config.examples)
    plan = plan_requests(config, pairs, example_conversations(config.examples) if config.conversations else [])
    # The final request repeats the first distinct one, so a mix without valid requests still has one.
    alone = {item.key: item.alone() for item in plan if not item.bad}
    distinct = [alone[key] for key in sorted(alone)] or [Planned(-1, "json", *pairs[0], stream=False)]
    images: dict[str, bytes] = {}
    for image in sorted({item.image for item in plan} | {item.image for item in distinct}):
        try:
            images[image] = (config.examples / image).read_bytes()
        except OSError as e:
            raise LoadError(f"cannot read the example image {config.examples / image} ({e.strerror})") from None
    return Prepared(plan, distinct, images)


async def reference_pass(
    client: httpx.AsyncClient, prepared: Prepared, model: str, max_tokens: int, progress: ProgressFn
) -> dict[str, str]:
    """Each distinct valid request alone, non-streamed, greedy: the answer every later copy must give."""
    references: dict[str, str] = {}
    progress("reference", 0, len(prepared.distinct))
    for n, item in enumerate(prepared.distinct, 1):
        outcome = await send(client, item, *prepared.encode(item, model, max_tokens), phase="reference")
        if outcome.result != "completed" or outcome.answer is None:
            raise LoadError(f"the reference request {item.key!r} alone got {outcome.status} ({outcome.detail})")
        references[item.key] = outcome.answer
        log.info("reference %s -> %r", item.key, outcome.answer)
        progress("reference", n, len(prepared.distinct))
    return references


async def warmup(
    client: httpx.AsyncClient, config: LoadConfig, prepared: Prepared, model: str, pid: int, progress: ProgressFn
) -> tuple[list[Outcome], list[int]]:
    """--warmup-rounds bursts of --clients concurrent valid requests, streamed and not, each burst drained.

    -> (their outcomes, the server's VmRSS after each drained burst)
    """
    outcomes: list[Outcome] = []
    rss: list[int] = []
    total = config.warmup_rounds * config.clients
    if total:
        progress("warm-up", 0, total)
    distinct = prepared.distinct
    for round_ in range(config.warmup_rounds):
        items = []
        for i in range(config.clients):
            template, streamed = distinct[i % len(distinct)], i % 2 == 1
            kind = template.kind if template.history else ("stream" if streamed else "json")
            items.append(dataclasses.replace(template, index=round_ * config.clients + i, kind=kind, stream=streamed))
        sends = [send(client, it, *prepared.encode(it, model, config.max_tokens), "warmup") for it in items]
        outcomes += await asyncio.gather(*sends)
        if await wait_idle(client, config.idle_timeout) is None:
            raise LoadError(f"the server did not go idle within {config.idle_timeout:g} s after a warm-up burst")
        rss.append(read_rss(pid))
        log.info("resident memory after warm-up burst %d: %.1f MiB", round_ + 1, rss[-1] / MIB)
        progress("warm-up", len(outcomes), total)
    return outcomes, rss


@dataclass
class Drive:
    """What a load phase got."""

    outcomes: list[Outcome]  # in plan order
    not_sent: int
    seconds: float
    queue_depth_max: int  # the deepest queue /health showed


SendHook = Callable[[Planned, int], None]  # (the item about to go, how many were sent with it)
DoneHook = Callable[[Outcome], Awaitable[None]]


async def drive(
    client: httpx.AsyncClient,
    config: LoadConfig,
    plan: list[Planned],
    bodies: Bodies,
    progress: ProgressFn,
    *,
    client_timeout: float | None = None,
    on_send: SendHook | None = None,
    on_done: DoneHook | None = None,
) -> Drive:
    """N clients take the plan's requests in order, one at a time each, until the plan or the time runs out.

    Paced (--duration): request i leaves no earlier than i * duration / (n - 1) seconds after the start,
    so the run spans the duration whatever the server's speed. `client_timeout` bounds each request
    (past it the request is a failure, "client_timeout"); `on_send` sees each request as it goes and
    `on_done` each outcome, before that client takes its next request.
    """
    pending = deque(plan)
    in_flight: dict[int, Planned] = {}
    outcomes: dict[int, Outcome] = {}
    depth, sent = 0, 0
    step = config.pace_seconds / (len(plan) - 1) if config.pace_seconds and len(plan) > 1 else 0.0
    start = time.perf_counter()

    async def one(item: Planned) -> Outcome:
        went = time.perf_counter()
        try:
            outcome = await asyncio.wait_for(send(client, item, *bodies[item.index]), client_timeout)
        except asyncio.TimeoutError:
            outcome = Outcome(item.index, item.kind, item.key, item.stream, "failed", detail="client_timeout")
            outcome.total = time.perf_counter() - went
        outcome.started = went - start
        return outcome

    async def client_loop() -> None:
        nonlocal sent
        while pending:
            item = pending.popleft()
            wait = start + item.index * step - time.perf_counter()
            if wait > 0:
                try:
                    await asyncio.sleep(wait)
                except asyncio.CancelledError:
                    pending.appendleft(item)  # not sent: the time limit counts it as such
                    raise
            in_flight[item.index] = item
            sent += 1
            if on_send is not None:
                on_send(item, sent)
            outcomes[item.index] = await one(item)
            del in_flight[item.index]
            progress("load", len(outcomes), len(plan))
            if on_done is not None:
                await on_done(outcomes[item.index])

    async def watch_queue() -> None:
        # Shows that the load reached the queue's bound (429s are then expected, not a fault).
        nonlocal depth
        while True:
            body = await health(client)
            if body is not None and isinstance(body.get("queue"), int):
                depth = max(depth, body["queue"])
            await asyncio.sleep(0.1 if not step else 1.0)

    progress("load", 0, len(plan))
    watcher = asyncio.create_task(watch_queue())
    tasks = [asyncio.create_task(client_loop()) for _ in range(config.clients)]
    _done, late = await asyncio.wait(tasks, timeout=config.load_time_limit)
    seconds = time.perf_counter() - start
    for task in (*late, watcher):
        task.cancel()
    await asyncio.gather(*late, watcher, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # a bug of this module, not a finding about the server
    if late:
        log.warning(
            "the load ran past its time limit %g s: %d in flight, %d not sent",
            config.load_time_limit,
            len(in_flight),
            len(pending),
        )
    for index, item in in_flight.items():
        outcomes[index] = Outcome(index, item.kind, item.key, item.stream, "cut", detail="time_limit")
    return Drive([outcomes[i] for i in sorted(outcomes)], len(pending), seconds, depth)


async def final_request(
    client: httpx.AsyncClient, config: LoadConfig, prepared: Prepared, model: str, drained: dict | None
) -> tuple[dict | None, Outcome | None]:
    """With final_request, one more request once the load drained (`drained`: wait_idle's result), then
    the drain again. -> (the last drain's result, None where the server never went idle; the outcome)"""
    if not config.final_request or drained is None:
        return drained, None
    item = prepared.distinct[0]
    final = await send(client, item, *prepared.encode(item, model, config.max_tokens), phase="final")
    return await wait_idle(client, config.idle_timeout), final
