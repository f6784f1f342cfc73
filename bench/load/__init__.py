"""A load test of the local server: concurrent clients, good and bad requests, memory before and after.

    python scripts/load_test.py [--clients 16] [--requests 64]      # writes docs/serving/load.{json,md}
    python scripts/load_test.py --soak [--duration 600]              # docs/serving/soak.{json,md}
    python scripts/load_test.py --kill                               # docs/serving/kill.{json,md}

    report = run(LoadConfig(clients=16, requests=64))                # or mode="soak" / "kill"
    write_results(report, command)

It starts `python -m serving` on a free port of 127.0.0.1 (or uses a local --url), answers every
distinct valid request of the mix alone first (the reference, greedy), warms the concurrent paths with
bursts of valid requests, reads the server's resident memory, then sends the mix from N concurrent
clients: streamed and non-streamed questions, multi-turn conversations, bad requests of every kind the
server must refuse, and streams whose client hangs up after the first content chunk; then it waits for
the drain and reads the memory again.
A 429 counts as rejected and is not retried: the run measures admission, not a client's patience.
The checks: answers equal their reference, no valid request lost, every bad one refused with its 4xx
and an OpenAI-shaped error, /metrics agrees, the server drains, stays healthy, and its memory holds.

The soak paces the mix over --duration and samples the server's VmRSS and open fds (soak.py,
sampler.py); the kill run SIGKILLs the server part-way and starts it again on the same port (kill.py).

The modules: config (settings, errors), plan (the mix and its HTTP bodies), client (one request and
its outcome), server (the server under test: start, kill, /health, /metrics, memory, fds), phases (the
reference pass, the warm-up, the load), run (the standard run), soak, kill, sampler, report (the
standard figures and the shared checks), summary (tables the soak and kill reports share), results
(the files).
Torch-free: httpx's async client and the standard library.
"""

from __future__ import annotations

from bench.load.config import LoadConfig, LoadConfigError, LoadError, check_local_url
from bench.load.kill import KillReport, run_kill
from bench.load.phases import ProgressFn
from bench.load.plan import BAD_KINDS, Planned, encode_request, example_conversations, example_pairs, plan_requests
from bench.load.report import Check, LoadReport
from bench.load.results import Report, figure_rows, render_markdown, write_results
from bench.load.run import run_load
from bench.load.sampler import Sample
from bench.load.soak import SoakReport, run_soak


def run(config: LoadConfig, progress: ProgressFn | None = None) -> LoadReport | SoakReport | KillReport:
    """The run of config.mode: run_load, run_soak or run_kill."""
    runner = {"standard": run_load, "soak": run_soak, "kill": run_kill}[config.mode]
    return runner(config, progress)


__all__ = [
    "BAD_KINDS",
    "Check",
    "KillReport",
    "LoadConfig",
    "LoadConfigError",
    "LoadError",
    "LoadReport",
    "Planned",
    "Report",
    "Sample",
    "SoakReport",
    "check_local_url",
    "encode_request",
    "example_conversations",
    "example_pairs",
    "figure_rows",
    "plan_requests",
    "render_markdown",
    "run",
    "run_kill",
    "run_load",
    "run_soak",
    "write_results",
]
