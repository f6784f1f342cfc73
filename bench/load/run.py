"""The run: the server, the reference pass, the warm-up, memory, the load, the drain, memory again."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import importlib.metadata
import logging
import os
import platform
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import httpx

from bench.load.client import Outcome, send
from bench.load.config import MIB, LoadConfig, LoadError
from bench.load.plan import Planned, encode_request, example_pairs, plan_requests
from bench.load.report import LoadReport, checks, figures
from bench.load.results import check_outputs
from bench.load.server import (
    Server,
    health,
    local_server,
    read_rss,
    read_status_counts,
    wait_healthy,
    wait_idle,
)

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]  # (phase, done, total)


def environment() -> dict[str, Any]:
    """What the server ran on: a started server runs on this interpreter; a --url one on this machine."""
    try:
        ort = importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        try:
            ort = importlib.metadata.version("onnxruntime-gpu")
        except importlib.metadata.PackageNotFoundError:
            ort = None
    return {
        "python": platform.python_version(),
        "onnxruntime": ort,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def run_load(config: LoadConfig, progress: ProgressFn | None = None) -> LoadReport:
    """The whole run: server, reference pass, memory, load, drain, memory again; the report with its checks."""
    check_outputs(config)
    pairs = example_pairs(config.examples)
    plan = plan_requests(config, pairs)
    images: dict[str, bytes] = {}
    for image in sorted({item.image for item in plan} | {pairs[0][0]}):
        try:
            images[image] = (config.examples / image).read_bytes()
        except OSError as e:
            raise LoadError(f"cannot read the example image {config.examples / image} ({e.strerror})") from None
    # The final request repeats the first of them, so a mix without valid requests still has one.
    distinct = sorted({(item.image, item.question) for item in plan if not item.bad}) or [pairs[0]]
    with local_server(config) as server:
        report = asyncio.run(_run(config, server, plan, distinct, images, progress or (lambda *_: None)))
        report.server["alive_at_end"] = server.alive()
        report.checks["healthy_at_end"].passed &= server.alive()
        if not report.passed:
            report.server["log_tail"] = server.log_tail()
    return report


async def _run(
    config: LoadConfig,
    server: Server,
    plan: list[Planned],
    distinct: list[tuple[str, str]],
    images: dict[str, bytes],
    progress: ProgressFn,
) -> LoadReport:
    limits = httpx.Limits(max_connections=config.clients + 4, max_keepalive_connections=config.clients + 4)
    # No read timeout of its own: the server's --timeout bounds a request, the load's --time-limit the run.
    timeout = httpx.Timeout(None, connect=10.0)
    async with httpx.AsyncClient(base_url=server.url, timeout=timeout, limits=limits) as client:
        first_health = await wait_healthy(client, server, config.startup_timeout)
        model = str(first_health.get("model"))
        card: Any = None
        with contextlib.suppress(httpx.HTTPError, ValueError):
            card = (await client.get(f"/v1/models/{model}")).json()
        bodies = {item.index: encode_request(item, images, model, config.max_tokens) for item in plan}

        references = await _reference_pass(client, distinct, images, model, config.max_tokens, progress)
        if await wait_idle(client, config.idle_timeout) is None:
            raise LoadError(f"the server did not go idle within {config.idle_timeout:g} s after the reference pass")
        rss_reference = read_rss(server.pid)
        log.info("resident memory after the reference pass: %.1f MiB", rss_reference / MIB)
        warmup = await _warmup(client, config, distinct, images, model, progress)
        if await wait_idle(client, config.idle_timeout) is None:
            raise LoadError(f"the server did not go idle within {config.idle_timeout:g} s after the warm-up")
        rss_before = read_rss(server.pid)
        counts_before = await read_status_counts(client)
        log.info("resident memory after the warm-up: %.1f MiB", rss_before / MIB)

        outcomes, not_sent, seconds, depth = await _load_phase(client, config, plan, bodies, progress)

        drained = await wait_idle(client, config.idle_timeout)
        counts_after = await read_status_counts(client)
        final = None
        if config.final_request and drained is not None:
            item = Planned(-1, "json", *distinct[0], stream=False)
            final = await send(client, item, *encode_request(item, images, model, config.max_tokens), phase="final")
            drained = await wait_idle(client, config.idle_timeout)
        rss_after = read_rss(server.pid) if server.alive() else 0
        end_health = await health(client)

    delta = None
    if counts_before is not None and counts_after is not None:
        delta = {
            s: counts_after.get(s, 0.0) - counts_before.get(s, 0.0) for s in sorted({*counts_after, *counts_before})
        }
    report = LoadReport(
        config=config,
        server={
            "url": server.url,
            "pid": server.pid,
            "started_here": server.started_here,
            "command": server.command,
            "health": first_health,
            "model_card": card,
            "health_at_end": end_health,
            "drained": drained is not None,
        },
        environment=environment(),
        references=references,
        warmup=warmup,
        outcomes=outcomes,
        not_sent=not_sent,
        final=final,
        rss_reference=rss_reference,
        rss_before=rss_before,
        rss_after=rss_after,
        load_seconds=seconds,
        queue_depth_max=depth,
        status_delta=delta,
        finished_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    report.figures = figures(report)
    report.checks = checks(report, drained is not None, end_health)
    return report


async def _reference_pass(
    client: httpx.AsyncClient,
    distinct: list[tuple[str, str]],
    images: dict[str, bytes],
    model: str,
    max_tokens: int,
    progress: ProgressFn,
) -> dict[str, str]:
    """Each distinct valid request alone, non-streamed, greedy: the answer every later copy must give."""
    references: dict[str, str] = {}
    progress("reference", 0, len(distinct))
    for n, (image, question) in enumerate(distinct, 1):
        item = Planned(-1, "json", image, question, stream=False)
        outcome = await send(client, item, *encode_request(item, images, model, max_tokens), phase="reference")
        if outcome.result != "completed" or outcome.answer is None:
            raise LoadError(f"the reference request {item.key!r} alone got {outcome.status} ({outcome.detail})")
        references[item.key] = outcome.answer
        log.info("reference %s -> %r", item.key, outcome.answer)
        progress("reference", n, len(distinct))
    return references


async def _warmup(
    client: httpx.AsyncClient,
    config: LoadConfig,
    distinct: list[tuple[str, str]],
    images: dict[str, bytes],
    model: str,
    progress: ProgressFn,
) -> list[Outcome]:
    """--warmup-rounds bursts of --clients concurrent valid requests, streamed and not, each burst drained."""
    outcomes: list[Outcome] = []
    total = config.warmup_rounds * config.clients
    if total:
        progress("warm-up", 0, total)
    for round_ in range(config.warmup_rounds):
        items = [
            Planned(
                round_ * config.clients + i, "stream" if i % 2 else "json", *distinct[i % len(distinct)], i % 2 == 1
            )
            for i in range(config.clients)
        ]
        sends = [send(client, it, *encode_request(it, images, model, config.max_tokens), "warmup") for it in items]
        outcomes += await asyncio.gather(*sends)
        await wait_idle(client, config.idle_timeout)
        progress("warm-up", len(outcomes), total)
    return outcomes


async def _load_phase(
    client: httpx.AsyncClient,
    config: LoadConfig,
    plan: list[Planned],
    bodies: dict[int, tuple[bytes, dict[str, str]]],
    progress: ProgressFn,
) -> tuple[list[Outcome], int, float, int]:
    """N clients take the plan's requests in order, one at a time each, until the plan or the time runs out.

    -> (outcomes in plan order, requests not sent, seconds, the deepest queue /health showed)
    """
    pending = deque(plan)
    in_flight: dict[int, Planned] = {}
    outcomes: dict[int, Outcome] = {}
    depth = 0

    async def client_loop() -> None:
        while pending:
            item = pending.popleft()
            in_flight[item.index] = item
            outcomes[item.index] = await send(client, item, *bodies[item.index])
            del in_flight[item.index]
            progress("load", len(outcomes), len(plan))

    async def watch_queue() -> None:
        # Shows that the load reached the queue's bound (429s are then expected, not a fault).
        nonlocal depth
        while True:
            body = await health(client)
            if body is not None and isinstance(body.get("queue"), int):
                depth = max(depth, body["queue"])
            await asyncio.sleep(0.1)

    progress("load", 0, len(plan))
    start = time.perf_counter()
    watcher = asyncio.create_task(watch_queue())
    tasks = [asyncio.create_task(client_loop()) for _ in range(config.clients)]
    _done, late = await asyncio.wait(tasks, timeout=config.time_limit)
    seconds = time.perf_counter() - start
    for task in (*late, watcher):
        task.cancel()
    await asyncio.gather(*late, watcher, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # a bug of this module, not a finding about the server
    if late:
        log.warning(
            "the load ran past --time-limit %g s: %d in flight, %d not sent",
            config.time_limit,
            len(in_flight),
            len(pending),
        )
    for index, item in in_flight.items():
        outcomes[index] = Outcome(index, item.kind, item.key, item.stream, "cut", detail="time_limit")
    return [outcomes[i] for i in sorted(outcomes)], len(pending), seconds, depth
