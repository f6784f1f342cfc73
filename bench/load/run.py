"""The standard run: the server, the reference pass, the warm-up, memory, the load, the drain, memory again."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from typing import Any

import httpx

from bench.load.config import MIB, LoadConfig, LoadError
from bench.load.phases import Prepared, ProgressFn, drive, environment, final_request, prepare, reference_pass, warmup
from bench.load.report import LoadReport, checks, figures, status_delta
from bench.load.results import check_outputs
from bench.load.server import Server, health, local_server, read_rss, read_status_counts, wait_healthy, wait_idle

log = logging.getLogger(__name__)


def http_client(config: LoadConfig, url: str, read_timeout: float | None = None) -> httpx.AsyncClient:
    """The load's client: a connection per client (and a few for /health), the API key on every request.

    No read timeout by default: the server's --timeout bounds a request, the load's time limit the run.
    """
    limits = httpx.Limits(max_connections=config.clients + 4, max_keepalive_connections=config.clients + 4)
    timeout = httpx.Timeout(read_timeout, connect=10.0)
    return httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, headers=config.auth_headers())


async def model_card(client: httpx.AsyncClient, model: str) -> Any:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        return (await client.get(f"/v1/models/{model}")).json()
    return None


def run_load(config: LoadConfig, progress: ProgressFn | None = None) -> LoadReport:
    """The whole run: server, reference pass, memory, load, drain, memory again; the report with its checks."""
    if config.mode != "standard":
        raise LoadError(f"run_load runs the standard mode; a {config.mode} run is run_soak's or run_kill's")
    check_outputs(config)
    prepared = prepare(config)
    with local_server(config) as server:
        report = asyncio.run(_run(config, server, prepared, progress or (lambda *_: None)))
        report.server["alive_at_end"] = server.alive()
        report.checks["healthy_at_end"].passed &= server.alive()
        if not report.passed:
            report.server["log_tail"] = server.log_tail()
    return report


async def _run(config: LoadConfig, server: Server, prepared: Prepared, progress: ProgressFn) -> LoadReport:
    async with http_client(config, server.url) as client:
        first_health = await wait_healthy(client, server, config.startup_timeout)
        model = str(first_health.get("model"))
        card = await model_card(client, model)
        bodies = {item.index: prepared.encode(item, model, config.max_tokens) for item in prepared.plan}

        references = await reference_pass(client, prepared, model, config.max_tokens, progress)
        if await wait_idle(client, config.idle_timeout) is None:
            raise LoadError(f"the server did not go idle within {config.idle_timeout:g} s after the reference pass")
        rss_reference = read_rss(server.pid)
        log.info("resident memory after the reference pass: %.1f MiB", rss_reference / MIB)
        warm, warm_rss = await warmup(client, config, prepared, model, server.pid, progress)
        rss_before = max(warm_rss, default=rss_reference)
        counts_before = await read_status_counts(client)

        load = await drive(client, config, prepared.plan, bodies, progress)

        drained = await wait_idle(client, config.idle_timeout)
        counts_after = await read_status_counts(client)  # before the final request: the load's counts only
        drained, final = await final_request(client, config, prepared, model, drained)
        rss_after = read_rss(server.pid) if server.alive() else 0
        end_health = await health(client)

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
        warmup=warm,
        outcomes=load.outcomes,
        not_sent=load.not_sent,
        final=final,
        rss_reference=rss_reference,
        rss_before=rss_before,
        rss_after=rss_after,
        load_seconds=load.seconds,
        queue_depth_max=load.queue_depth_max,
        status_delta=status_delta(counts_before, counts_after),
        finished_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    report.figures = figures(report)
    report.checks = checks(report, drained is not None, end_health)
    return report
