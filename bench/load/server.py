"""The server under test: started here (or a local --url one), its /health, /metrics and resident memory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.load.config import LoadConfig, LoadError, check_local_url
from serving.http.process import ROOT, serve_subprocess

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
    # A server started again after a kill (kill mode): its own process and log, stopped by local_server.
    restarted: subprocess.Popen[bytes] | None = None
    restart_log: Path | None = None
    api_key: str | None = field(default=None, repr=False)

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return Path(f"/proc/{self.pid}").exists()

    def log_tail(self, lines: int = 40) -> list[str]:
        path = self.restart_log or self.log_path
        if path is None or not path.exists():
            return []
        return path.read_text(errors="replace").splitlines()[-lines:]

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
        if self.command is None:
            raise LoadError("only a server this run started can be started again")
        fd, name = tempfile.mkstemp(prefix="corematching-server-restarted-", suffix=".log")
        with os.fdopen(fd, "wb") as log_file:
            process = subprocess.Popen(
                self.command,
                cwd=ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**_server_env(self.api_key), "PYTHONUNBUFFERED": "1"},
            )
        self.process, self.pid, self.restarted, self.restart_log = process, process.pid, process, Path(name)
        log.info("started the server again (pid %d) on %s", process.pid, self.url)
        return process.pid


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
    with contextlib.ExitStack() as stack:
        with _key_in_environment(config.api_key):  # the child copies the environment when it starts
            child = stack.enter_context(serve_subprocess(build, args))
        server = Server(child.url, child.process.pid, True, child.command, child.process, child.log_path)
        server.api_key = config.api_key
        try:
            yield server
        finally:
            if server.restarted is not None:
                _stop(server.restarted)
                if server.restart_log is not None:
                    server.restart_log.unlink(missing_ok=True)


def _server_env(api_key: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    return env if api_key is None else {**env, API_KEY_ENV: api_key}


@contextlib.contextmanager
def _key_in_environment(api_key: str | None) -> Iterator[None]:
    saved = os.environ.pop(API_KEY_ENV, None)
    if api_key is not None:
        os.environ[API_KEY_ENV] = api_key
    try:
        yield
    finally:
        os.environ.pop(API_KEY_ENV, None)
        if saved is not None:
            os.environ[API_KEY_ENV] = saved


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        log.warning("the server (pid %d) did not stop in 20 s; killing it", process.pid)
        process.kill()
        process.wait(timeout=10)


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


def read_memory(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) in bytes: all resident memory, and the anonymous part (the heap, where a leak
    shows; the rest is mapped files the kernel may drop and read back at any time)."""
    path = Path(f"/proc/{pid}/status")
    try:
        text = path.read_text()
    except OSError as e:
        raise LoadError(f"cannot read {path} ({e.strerror}); the memory check needs Linux") from None
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
