"""The server under test: started here (or a local --url one), its /health, /metrics and resident memory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.load.config import LoadConfig, LoadError, check_local_url
from serving.http.process import ServerProcess, serve_subprocess

log = logging.getLogger(__name__)
# The server reads its key from this variable (as from --api-key), and the variable keeps it out of the
# process list: a started server gets the run's key this way, and no key when the run has none.
API_KEY_ENV = "COREMATCHING_API_KEY"


@dataclass
class Server:
    url: str
    pid: int
    started_here: bool
    command: list[str] | None = None
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    # Kill mode: starts the same server again on its port, stopped with the run (local_server).
    restart: Callable[[], ServerProcess] | None = field(default=None, repr=False)

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return Path(f"/proc/{self.pid}").exists()

    def log_tail(self, lines: int = 40) -> list[str]:
        if self.log_path is None or not self.log_path.exists():
            return []
        return self.log_path.read_text(errors="replace").splitlines()[-lines:]

    def kill(self) -> int:
        """SIGKILL, as a crash or the OOM killer would end it; -> the dead process's id."""
        if self.process is None or self.command is None:
            raise LoadError("only a server this run started can be killed; leave out --url")
        pid = self.process.pid
        os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        log.info("killed the server (pid %d)", pid)
        return pid

    def start_again(self) -> int:
        """The same command (so the same port) in a new process; -> its id. It is not yet ready."""
        if self.restart is None:
            raise LoadError("only a server this run started can be started again")
        child = self.restart()
        self.process, self.pid, self.log_path = child.process, child.process.pid, child.log_path
        log.info("started the server again (pid %d) on %s", self.pid, self.url)
        return self.pid


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
    # The child gets the run's key (or none) through the environment, which keeps it out of the process list.
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    if config.api_key is not None:
        env[API_KEY_ENV] = config.api_key
    with contextlib.ExitStack() as stack:
        child = stack.enter_context(serve_subprocess(build, args, env=env))
        port = int(child.url.rsplit(":", 1)[1])
        server = Server(child.url, child.process.pid, True, child.command, child.process, child.log_path)
        server.restart = lambda: stack.enter_context(serve_subprocess(build, args, port=port, env=env))
        yield server


def read_rss(pid: int) -> int:
    """The process's resident memory in bytes (VmRSS of /proc/<pid>/status)."""
    return read_memory(pid)[0]


def read_memory(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) in bytes: all resident memory, and the anonymous part (the heap, where a leak
    shows; the rest is mapped files the kernel may drop and read back at any time)."""
    path = Path(f"/proc/{pid}/status")
    try:
        text = path.read_text()
    except OSError as e:
        raise LoadError(
            f"cannot read {path} ({e.strerror}); the memory check needs Linux and the server's pid"
        ) from None
    values = [re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE) for key in ("VmRSS", "RssAnon")]
    if values[0] is None:
        raise LoadError(f"{path} has no VmRSS line (has the process exited?)")
    return int(values[0][1]) * 1024, int(values[1][1]) * 1024 if values[1] else 0


def read_fds(pid: int) -> tuple[int, int]:
    """(open file descriptors, of which sockets) of the process, from /proc/<pid>/fd."""
    path = Path(f"/proc/{pid}/fd")
    try:
        names = os.listdir(path)
    except OSError as e:
        raise LoadError(f"cannot list {path} ({e.strerror}); the fd check needs Linux and the server's pid") from None
    sockets = 0
    for name in names:
        with contextlib.suppress(OSError):  # closed between the listing and the look
            sockets += os.readlink(path / name).startswith("socket:")
    return len(names), sockets


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
