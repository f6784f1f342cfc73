"""A load test of the local server: concurrent clients, good and bad requests, memory before and after.

    python scripts/load_test.py [--clients 16] [--requests 64]      # writes docs/serving/load.{json,md}

    report = run_load(LoadConfig(clients=16, requests=64))
    write_results(report, command)

It starts `python -m serving` on a free port of 127.0.0.1 (or uses a local --url), answers every
distinct valid request of the mix alone first (the reference, greedy), warms the concurrent paths with
bursts of valid requests, reads the server's resident memory, then sends the mix from N concurrent
clients: streamed and non-streamed questions, bad requests of every kind the server must refuse, and
streams whose client hangs up after the first content chunk; then it waits for the drain and reads
the memory again.
A 429 counts as rejected and is not retried: the run measures admission, not a client's patience.
The checks: answers equal their reference, no valid request lost, every bad one refused with its 4xx
and an OpenAI-shaped error, /metrics agrees, the server drains, stays healthy, and its memory holds.

The modules: config (settings, errors), plan (the mix and its HTTP bodies), client (one request and
its outcome), server (the server under test: start, /health, /metrics, memory), run (the phases),
report (figures and checks), results (load.json and load.md).
Torch-free: httpx's async client and the standard library.
"""

from bench.load.config import LoadConfig, LoadConfigError, LoadError, check_local_url
from bench.load.plan import BAD_KINDS, Planned, encode_request, example_pairs, plan_requests
from bench.load.report import Check, LoadReport
from bench.load.results import figure_rows, render_markdown, write_results
from bench.load.run import run_load

__all__ = [
    "BAD_KINDS",
    "Check",
    "LoadConfig",
    "LoadConfigError",
    "LoadError",
    "LoadReport",
    "Planned",
    "check_local_url",
    "encode_request",
    "example_pairs",
    "figure_rows",
    "plan_requests",
    "render_markdown",
    "run_load",
    "write_results",
]
