"""`python -m serving` as a child process on a free loopback port (the load tester, the page's
screenshot script and tests start it this way)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]  # the checkout (or site-packages): `-m serving` resolves here


class ServerStartError(RuntimeError):
    """The server exited or did not answer /health; the message ends with its log."""


def free_port() -> int:
    """A port free on 127.0.0.1 now (the server checks it again and says so if it was taken since)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ServerProcess:
    url: str
    command: list[str]
    process: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> list[str]:
        if not self.log_path.exists():
            return []
        return self.log_path.read_text(errors="replace").splitlines()[-lines:]

    def wait_ready(self, seconds: float = 60.0) -> None:
        """Returns once GET /health says ok; ServerStartError if the server exits or the time runs out."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServerStartError("the server exited before it answered /health:\n" + "\n".join(self.log_tail(15)))
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if json.load(response).get("status") == "ok":
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        raise ServerStartError(f"the server at {self.url} did not answer /health within {seconds:g} s")


@contextlib.contextmanager
def serve_subprocess(
    build: Path, args: Sequence[str] = (), port: int | None = None, env: Mapping[str, str] | None = None
) -> Iterator[ServerProcess]:
    """The server on `build` (plus `args`), started now, not yet ready (`wait_ready`); stopped after.
    `port`: a free one unless given (a restart takes its predecessor's); `env`: the environment (default
    this process's)."""
    port = free_port() if port is None else port
    command = [sys.executable, "-m", "serving", "--build", str(Path(build).resolve())]
    command += ["--host", "127.0.0.1", "--port", str(port), *args]
    fd, name = tempfile.mkstemp(prefix="corematching-server-", suffix=".log")
    log_path = Path(name)
    with os.fdopen(fd, "wb") as log_file:
        # The log goes to a file: a pipe nobody reads would block the server once full.
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
        )
    log.info("started the server (pid %d) on 127.0.0.1:%d", process.pid, port)
    try:
        yield ServerProcess(f"http://127.0.0.1:{port}", command, process, log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            log.warning("the server (pid %d) did not stop in 20 s; killing it", process.pid)
            process.kill()
            process.wait(timeout=10)
        log_path.unlink(missing_ok=True)
