"""The load test's settings (LoadConfig, checked when made), its errors, and the local-URL rule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[2]
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MIB = 1024 * 1024
# standard: one burst of the mix; soak: the mix paced over --duration with memory and fds sampled;
# kill: the mix with the server SIGKILLed part-way and started again on the same port.
MODES = ("standard", "soak", "kill")
DEFAULT_REQUESTS = {"standard": 64, "soak": 1000, "kill": 64}
DEFAULT_SOAK_SECONDS = 600.0
# Seconds the load may run past its pace (--duration) before the unfinished requests are cut.
TIME_LIMIT_MARGIN = 600.0


class LoadConfigError(ValueError):
    """A load-test setting is out of range; the message names the flag."""


class LoadError(RuntimeError):
    """The run could not be made (no build, the server did not start, a reference failed, outputs exist)."""


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _non_negative(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


@dataclass(frozen=True)
class LoadConfig:
    build: Path = Path("builds/default")
    # A server already running on this machine (http://127.0.0.1:PORT); None: start one for --build.
    url: str | None = None
    # The --url server's process id, whose /proc/<pid>/status gives its resident memory.
    pid: int | None = None
    mode: str = "standard"  # one of MODES (--soak, --kill)
    clients: int = 16
    requests: int | None = None  # None: DEFAULT_REQUESTS of the mode
    # The started server's --max-queue (low enough that 16 clients meet 429s); ignored with --url.
    max_queue: int = 8
    # Seconds the load phase may take; requests not sent by then are reported, and a check fails.
    # None: 600, or --duration + 600 where the load is paced.
    time_limit: float | None = None
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
    force: bool = False  # overwrite the mode's results (load.*, soak.*, kill.*)
    # Sent as `Authorization: Bearer KEY` on every request; a started server gets --api-key KEY.
    api_key: str | None = None
    # Multi-turn conversations in the mix; False (--no-conversations) for a server that answers one turn.
    conversations: bool = True
    # Seconds the paced load spans (request i leaves at i * duration / (requests - 1)); soak and kill
    # only. None: 600 for a soak, no pacing for a kill run (the clients go as fast as answers come).
    duration: float | None = None
    # soak: seconds between samples of the server's VmRSS and open fds (a short test samples often).
    sample_interval: float = 60.0
    # soak: samples taken before this many seconds of the load are the warm-up's, outside the checks.
    soak_warmup: float = 60.0
    # soak: no sample after the warm-up exceeds the warm-up's highest (up to the first sample after it) by
    # more than this percent.
    rss_growth_percent: float = 5.0
    # soak: the last fd count may exceed the first one after the warm-up by at most this many.
    fd_slack: int = 2
    # kill: SIGKILL the server once this many requests were sent; None: half of --requests.
    kill_after: int | None = None
    # kill: seconds a request may take before it counts as hung (the client gives up on it then).
    client_timeout: float = 120.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise LoadConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.url is not None:
            if self.mode == "kill":
                # The run must kill the server and start it again: only a server it started itself.
                raise LoadConfigError("--kill needs a server this run starts; leave out --url and --pid")
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
            ("fd_slack", "--fd-slack", 0, 1000),
        ):
            value = getattr(self, name)
            if name == "requests" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise LoadConfigError(f"{flag} must be an integer in {low}..{high}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise LoadConfigError(f"--seed must be an integer, got {self.seed!r}")
        for name, flag in (
            ("startup_timeout", "startup_timeout"),
            ("idle_timeout", "idle_timeout"),
            ("sample_interval", "--sample-interval"),
            ("client_timeout", "--client-timeout"),
        ):
            if not _positive(getattr(self, name)):
                raise LoadConfigError(f"{flag} must be a positive number of seconds, got {getattr(self, name)!r}")
        if self.time_limit is not None and not _positive(self.time_limit):
            raise LoadConfigError(f"--time-limit must be a positive number of seconds, got {self.time_limit!r}")
        if not (isinstance(self.server_timeout, (int, float)) and self.server_timeout >= 0):
            raise LoadConfigError(f"server_timeout must be 0 (no limit) or seconds, got {self.server_timeout!r}")
        for name, flag in (
            ("rss_tolerance_mib", "--rss-tolerance-mib"),
            ("rss_tolerance_percent", "--rss-tolerance-percent"),
            ("rss_growth_percent", "--rss-growth-percent"),
            ("soak_warmup", "--soak-warmup"),
        ):
            if not _non_negative(getattr(self, name)):
                raise LoadConfigError(f"{flag} must be 0 or more, got {getattr(self, name)!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise LoadConfigError("--api-key must be a non-empty string (or leave it out)")
        self._check_modes()

    def _check_modes(self) -> None:
        if self.duration is not None:
            if self.mode == "standard":
                raise LoadConfigError("--duration goes with --soak or --kill (the standard run is not paced)")
            if not _positive(self.duration):
                raise LoadConfigError(f"--duration must be a positive number of seconds, got {self.duration!r}")
        if self.mode == "soak":
            if self.soak_warmup >= self.pace_seconds:
                raise LoadConfigError(
                    f"--soak-warmup ({self.soak_warmup:g} s) must end before --duration ({self.pace_seconds:g} s)"
                )
            if self.sample_interval > self.pace_seconds - self.soak_warmup:
                raise LoadConfigError(
                    f"--sample-interval ({self.sample_interval:g} s) leaves no sample after the warm-up; make it at "
                    f"most --duration - --soak-warmup ({self.pace_seconds - self.soak_warmup:g} s)"
                )
        if self.kill_after is not None:
            if self.mode != "kill":
                raise LoadConfigError("--kill-after goes with --kill")
            count = self.request_count
            if isinstance(self.kill_after, bool) or not isinstance(self.kill_after, int):
                raise LoadConfigError(f"--kill-after must be an integer, got {self.kill_after!r}")
            if not 1 <= self.kill_after < count:
                raise LoadConfigError(
                    f"--kill-after must be in 1..{count - 1} (some requests before the kill and some after), "
                    f"got {self.kill_after}"
                )
        if self.mode == "kill" and self.request_count < 2:
            raise LoadConfigError("--kill needs --requests 2 or more (some before the kill and some after)")
        if self.time_limit is not None and self.pace_seconds and self.time_limit <= self.pace_seconds:
            raise LoadConfigError(
                f"--time-limit ({self.time_limit:g} s) must exceed --duration ({self.pace_seconds:g} s)"
            )

    @property
    def request_count(self) -> int:
        return DEFAULT_REQUESTS[self.mode] if self.requests is None else self.requests

    @property
    def pace_seconds(self) -> float:
        """Seconds the load is spread over; 0: not paced (each client sends as soon as it has its answer)."""
        if self.duration is not None:
            return float(self.duration)
        return DEFAULT_SOAK_SECONDS if self.mode == "soak" else 0.0

    @property
    def load_time_limit(self) -> float:
        if self.time_limit is not None:
            return float(self.time_limit)
        return self.pace_seconds + TIME_LIMIT_MARGIN

    @property
    def kill_at(self) -> int:
        """The number of requests sent when the server is killed (kill mode)."""
        return self.kill_after if self.kill_after is not None else max(1, self.request_count // 2)

    @property
    def outputs(self) -> tuple[str, str]:
        """The result files of this mode: (json, markdown)."""
        stem = {"standard": "load", "soak": "soak", "kill": "kill"}[self.mode]
        return f"{stem}.json", f"{stem}.md"

    def rss_tolerance(self, before: int) -> int:
        """Bytes the server may grow by: max(--rss-tolerance-mib, --rss-tolerance-percent of before)."""
        return int(max(self.rss_tolerance_mib * MIB, before * self.rss_tolerance_percent / 100))

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


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
