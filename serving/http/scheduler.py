"""One pipeline, one worker thread, requests answered in arrival order.

The pipeline holds one request's cache at a time (runtime/backend.py), so the worker runs one
generation at a time; the others wait in a FIFO of at most `max_queue`. The event loop never
runs the graphs: the worker hands each token to the request's asyncio queue. A request that is
abandoned (its client went away, or its time ran out) is skipped if still waiting, and stopped at
its next token if running; the generator's close frees the request's cache.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from runtime.pipeline import Answer, Pipeline, Prompt
from runtime.sampling import Sampling
from serving.http.errors import ApiError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Token:
    token_id: int
    text: str


@dataclass(frozen=True)
class Done:
    answer: Answer


@dataclass(frozen=True)
class Failed:
    error: ApiError


Event = Token | Done | Failed


def timeout_error(seconds: float) -> ApiError:
    return ApiError(
        504,
        f"the request took longer than the server's --timeout of {seconds:g} s; ask for fewer tokens or retry later",
        "timeout",
        kind="timeout_error",
    )


@dataclass
class Job:
    prompt: Prompt
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    timeout: float  # seconds from arrival, 0: none
    arrived: float = field(default_factory=time.monotonic)
    stop: tuple[str, ...] = ()  # the request's stop strings (Pipeline.generate cuts the answer there)
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    abandoned: threading.Event = field(default_factory=threading.Event)
    state: str = "waiting"  # waiting -> running -> finished, or waiting -> abandoned
    checked: float = field(default_factory=time.monotonic)  # when the server last saw the client there

    @property
    def deadline(self) -> float:
        return math.inf if self.timeout == 0 else self.arrived + self.timeout

    def emit(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"retry after {retry_after} s")
        self.retry_after = retry_after


class Scheduler:
    def __init__(self, pipeline: Pipeline, max_queue: int) -> None:
        self.pipeline = pipeline
        self.max_queue = max_queue
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._running: Job | None = None
        self._recent = deque(maxlen=20)  # seconds per finished request, for Retry-After
        self._thread: threading.Thread | None = None

    # -- the event loop's side -----------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def busy(self) -> bool:
        return self._running is not None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="pipeline", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            if self._running is not None:
                self._running.abandoned.set()
            self._jobs.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def reserve(self) -> None:
        """Takes a place in the queue before the request's image is decoded, or raises QueueFull when
        `max_queue` requests already wait behind a running one (a refused request costs nothing)."""
        with self._lock:
            if self._waiting >= self.max_queue and (self._running is not None or self._waiting > 0):
                raise QueueFull(self._retry_after())
            self._waiting += 1

    def unreserve(self) -> None:
        """Gives back a place whose request was refused while it was prepared."""
        with self._lock:
            self._waiting -= 1

    def submit(self, job: Job) -> None:
        """Queues a job in the place `reserve` took for it."""
        self._jobs.put(job)

    def abandon(self, job: Job) -> None:
        """The client is gone or out of time: skip the job if it waits, stop it at its next token if it runs."""
        job.abandoned.set()
        with self._lock:
            if job.state == "waiting":
                job.state = "abandoned"
                self._waiting -= 1

    def _retry_after(self) -> int:
        per_request = statistics.median(self._recent) if self._recent else 1.0
        return max(1, math.ceil(per_request * (self._waiting + 1)))

    # -- the worker thread ---------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                if job.state == "abandoned":
                    continue
                job.state = "running"
                self._waiting -= 1
                self._running = job
            started = time.monotonic()
            try:
                self._run(job)
            finally:
                with self._lock:
                    job.state = "finished"
                    self._running = None
                self._recent.append(time.monotonic() - started)

    def _run(self, job: Job) -> None:
        if time.monotonic() > job.deadline:
            job.emit(Failed(timeout_error(job.timeout)))
            return
        tokens = self.pipeline.generate(job.prompt, job.sampling, stop=job.stop)
        try:
            while True:
                try:
                    token_id, text = next(tokens)
                except StopIteration as done:
                    job.emit(Done(done.value))
                    return
                job.emit(Token(token_id, text))
                if job.abandoned.is_set():
                    return
                if time.monotonic() > job.deadline:
                    job.emit(Failed(timeout_error(job.timeout)))
                    return
        except Exception as e:  # the backend failed: this request gets a 500, the server goes on
            log.exception("generation failed")
            job.emit(Failed(ApiError(500, f"generation failed ({type(e).__name__}: {e})", "generation_failed")))
        finally:
            tokens.close()  # an early stop frees the request's cache (Pipeline.generate)
