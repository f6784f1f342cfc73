"""The server's resident memory and open file descriptors, sampled at a fixed interval during a soak."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.load.config import MIB
from bench.load.server import read_fds, read_memory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    seconds: float  # since the load started
    phase: str  # "warm-up" (before --soak-warmup), "load", or "end" (drained, the load's connections closed)
    rss: int  # VmRSS, bytes
    rss_anon: int  # RssAnon, bytes: the heap's part of VmRSS
    fds: int  # entries of /proc/<pid>/fd
    sockets: int  # of which sockets (the listening one, the clients' connections)
    in_flight: int  # requests the clients were waiting on
    finished: int  # requests answered (or refused) so far

    @property
    def other_fds(self) -> int:
        """Files, pipes, eventfds: descriptors no client connection accounts for."""
        return self.fds - self.sockets


def take_sample(pid: int, seconds: float, phase: str, in_flight: int, finished: int) -> Sample:
    rss, anon = read_memory(pid)
    fds, sockets = read_fds(pid)
    return Sample(round(seconds, 2), phase, rss, anon, fds, sockets, in_flight, finished)


class Sampler:
    """Samples every `interval` seconds from `start()` until `stop()`; `counts()` gives (in flight, finished)."""

    def __init__(self, pid: int, interval: float, warmup: float, counts: Callable[[], tuple[int, int]]) -> None:
        self.pid, self.interval, self.warmup, self.counts = pid, interval, warmup, counts
        self.samples: list[Sample] = []
        self._start = 0.0
        self._task: asyncio.Task[None] | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def sample(self, phase: str | None = None) -> Sample:
        seconds = self.elapsed()
        sample = take_sample(
            self.pid, seconds, phase or ("warm-up" if seconds < self.warmup else "load"), *self.counts()
        )
        self.samples.append(sample)
        log.info(
            "sample at %.0f s: VmRSS %.1f MiB, %d fds (%d sockets), %d in flight",
            seconds,
            sample.rss / MIB,
            sample.fds,
            sample.sockets,
            sample.in_flight,
        )
        return sample

    async def _every(self) -> None:
        n = 0
        while True:
            self.sample()
            n += 1
            # On a fixed grid from the start, so that a slow read does not shift the later samples.
            await asyncio.sleep(max(0.0, self._start + n * self.interval - time.perf_counter()))

    def start(self) -> None:
        self._start = time.perf_counter()
        self._task = asyncio.create_task(self._every())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
