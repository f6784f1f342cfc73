"""The server under test: started here (or a local --url one), its /health, /metrics and resident memory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.load.config import LoadConfig, LoadError, check_local_url
from serving.http.process import serve_subprocess

log = logging.getLogger(__name__)


@dataclass
class Server:
    url: str
    pid: int
    started_here: bool
    command: list[str] | None = None
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return Path(f"/proc/{self.pid}").exists()

    def log_tail(self, lines: int = 40) -> list[str]:
        if self.log_path is None or not self.log_path.exists():
            return []
        return self.log_path.read_text(errors="replace").splitlines()[-lines:]


@contextlib.contextmanager
def local_server(config: LoadConfig) -> Iterator[Server]:
    """The server under test: the --url one, or `python -m serving` started here and stopped after."""
    if config.url is not None:
        assert config.pid is not None
        if not Path(f"/proc/{config.pid}/status").exists():
            raise LoadError(f"no process {config.pid} on this machine (--pid); give the server's process id")
        yield Server(check_local_url(config.url), config.pid, started_here=False)
        return
    build = Path(config.build)
    if not (build / "manifest.json").is_file():
        raise LoadError(f"no build at {build} (no manifest.json); make one with `python -m export build --out {build}`")
    args = ["--max-queue", str(config.max_queue), "--timeout", f"{config.server_timeout:g}"]
    with serve_subprocess(build, args) as child:
        yield Server(child.url, child.process.pid, True, child.command, child.process, child.log_path)


def read_rss(pid: int) -> int:
    """The process's resident memory in bytes (VmRSS of /proc/<pid>/status)."""
    path = Path(f"/proc/{pid}/status")
    try:
        text = path.read_text()
    except OSError as e:
        raise LoadError(
            f"cannot read {path} ({e.strerror}); the memory check needs Linux and the server's pid"
        ) from None
    match = re.search(r"^VmRSS:\s+(\d+)\s+kB", text, re.MULTILINE)
    if match is None:
        raise LoadError(f"{path} has no VmRSS line (has the process exited?)")
    return int(match[1]) * 1024


_SAMPLE = re.compile(r'^corematching_requests_total\{status="(?P<status>[^"]+)"\}\s+(?P<value>\S+)$', re.MULTILINE)


async def read_status_counts(client: httpx.AsyncClient) -> dict[str, float] | None:
    """corematching_requests_total by status from /metrics (None if /metrics does not answer)."""
    try:
        response = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return {m["status"]: float(m["value"]) for m in _SAMPLE.finditer(response.text)}


async def health(client: httpx.AsyncClient) -> dict[str, Any] | None:
    try:
        response = await client.get("/health")
        body = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    return body if isinstance(body, dict) else None


async def wait_healthy(client: httpx.AsyncClient, server: Server, seconds: float) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not server.alive():
            tail = "\n".join(server.log_tail(15))
            raise LoadError(f"the server exited before it answered /health; its log ends:\n{tail}")
        body = await health(client)
        if body is not None and body.get("status") == "ok":
            return body
        await asyncio.sleep(0.2)
    raise LoadError(f"the server at {server.url} did not answer /health within {seconds:g} s")


async def wait_idle(client: httpx.AsyncClient, seconds: float) -> dict[str, Any] | None:
    """/health once nothing waits and nothing runs; None if that does not happen within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        body = await health(client)
        if body is not None and body.get("queue") == 0 and body.get("busy") is False:
            return body
        await asyncio.sleep(0.1)
    return None
