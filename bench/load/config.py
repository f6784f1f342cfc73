"""The load test's settings (LoadConfig, checked when made), its errors, and the local-URL rule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[2]
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MIB = 1024 * 1024


class LoadConfigError(ValueError):
    """A load-test setting is out of range; the message names the flag."""


class LoadError(RuntimeError):
    """The run could not be made (no build, the server did not start, a reference failed, outputs exist)."""


@dataclass(frozen=True)
class LoadConfig:
    build: Path = Path("builds/default")
    # A server already running on this machine (http://127.0.0.1:PORT); None: start one for --build.
    url: str | None = None
    # The --url server's process id, whose /proc/<pid>/status gives its resident memory.
    pid: int | None = None
    clients: int = 16
    requests: int = 64
    # The started server's --max-queue (low enough that 16 clients meet 429s); ignored with --url.
    max_queue: int = 8
    # Seconds the load phase may take; requests not sent by then are reported, and a check fails.
    time_limit: float = 600.0
    seed: int = 0
    max_tokens: int = 32
    # Memory after the load may exceed memory before by max(this many MiB, this percent of before).
    rss_tolerance_mib: float = 32.0
    rss_tolerance_percent: float = 10.0
    # One more valid request after the load, before memory is read again (it must still answer alike).
    final_request: bool = True
    # Bursts of --clients concurrent valid requests after the reference pass, before memory is first read:
    # the reference pass is sequential, and the first concurrent requests raise the allocator's high-water
    # mark (threadpool arenas, a full queue's prompts) once; without a burst that one-off rise would read
    # as growth under load. 0: memory "before" is read right after the reference pass.
    warmup_rounds: int = 2
    server_timeout: float = 300.0  # the started server's --timeout
    startup_timeout: float = 180.0  # seconds for /health to answer
    idle_timeout: float = 120.0  # seconds for the queue to drain after the load
    examples: Path = REPO / "examples"  # questions.json and its images: the valid requests
    out_dir: Path = Path("docs/serving")
    force: bool = False  # overwrite load.json / load.md

    def __post_init__(self) -> None:
        if self.url is not None:
            check_local_url(self.url)
            if self.pid is None:
                raise LoadConfigError("--url needs --pid (the server's process id) to read its resident memory")
        elif self.pid is not None:
            raise LoadConfigError("--pid goes with --url; the server this run starts is measured by its own id")
        if self.pid is not None and (isinstance(self.pid, bool) or not isinstance(self.pid, int) or self.pid < 1):
            raise LoadConfigError(f"--pid must be a positive process id, got {self.pid!r}")
        for name, flag, low, high in (
            ("clients", "--clients", 1, 512),
            ("requests", "--requests", 1, 100_000),
            ("max_queue", "--max-queue", 0, 10_000),
            ("max_tokens", "--max-tokens", 1, 4096),
            ("warmup_rounds", "--warmup-rounds", 0, 100),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise LoadConfigError(f"{flag} must be an integer in {low}..{high}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise LoadConfigError(f"--seed must be an integer, got {self.seed!r}")
        for name, flag in (
            ("time_limit", "--time-limit"),
            ("startup_timeout", "startup_timeout"),
            ("idle_timeout", "idle_timeout"),
        ):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise LoadConfigError(f"{flag} must be a positive number of seconds, got {value!r}")
        if not (isinstance(self.server_timeout, (int, float)) and self.server_timeout >= 0):
            raise LoadConfigError(f"server_timeout must be 0 (no limit) or seconds, got {self.server_timeout!r}")
        for name, flag in (
            ("rss_tolerance_mib", "--rss-tolerance-mib"),
            ("rss_tolerance_percent", "--rss-tolerance-percent"),
        ):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise LoadConfigError(f"{flag} must be 0 or more, got {value!r}")

    def rss_tolerance(self, before: int) -> int:
        """Bytes the server may grow by: max(--rss-tolerance-mib, --rss-tolerance-percent of before)."""
        return int(max(self.rss_tolerance_mib * MIB, before * self.rss_tolerance_percent / 100))


def check_local_url(url: str) -> str:
    """The server's root URL if it is on this machine; LoadConfigError otherwise (one line)."""
    try:
        parts = urlsplit(url)
        host, _port = parts.hostname, parts.port  # .port raises on a malformed port
    except ValueError as e:
        raise LoadConfigError(f"--url {url!r} is not a URL ({e}); give http://127.0.0.1:PORT") from None
    if parts.scheme not in ("http", "https") or host is None:
        raise LoadConfigError(f"--url {url!r} is not an http URL; give http://127.0.0.1:PORT")
    if host.lower() not in LOCAL_HOSTS:
        # The run floods the server with bad requests and reads its memory from /proc: this machine only.
        raise LoadConfigError(f"--url must be on this machine (127.0.0.1 or localhost), got {host!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise LoadConfigError(f"--url is the server's root (http://127.0.0.1:PORT), got {url!r}")
    return url.rstrip("/")
