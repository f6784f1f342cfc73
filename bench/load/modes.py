"""What the modes that start their own server (soak, kill) share: the run around their load."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from bench.load.config import LoadConfig, LoadError
from bench.load.phases import Prepared, ProgressFn, prepare
from bench.load.results import check_outputs
from bench.load.server import Server, local_server


def run_started(
    config: LoadConfig,
    mode: str,
    load: Callable[[LoadConfig, Server, Prepared, ProgressFn], Awaitable[Any]],
    progress: ProgressFn | None = None,
) -> Any:
    """A mode that starts its own server (soak, kill): outputs checked, the plan prepared, the server
    started, `load` run against it, and the server's liveness and (on failure) its log added to the report."""
    if config.mode != mode:
        raise LoadError(f"this run needs LoadConfig(mode={mode!r}) (--{mode})")
    check_outputs(config)
    prepared = prepare(config)
    with local_server(config) as server:
        report = asyncio.run(load(config, server, prepared, progress or (lambda *_: None)))
        report.server.alive_at_end = server.alive()
        report.checks["healthy_at_end"].passed &= server.alive()
        if not report.passed:
            report.server.log_tail = server.log_tail()
    return report
