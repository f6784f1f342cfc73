"""Soak mode: the mix paced over --duration (1000 requests over 10 minutes by default), the server's
VmRSS and open fds sampled every --sample-interval seconds; after the warm-up, memory flat and no fds gained.

The rules, as the checks apply them:
  rss_no_growth: no sample from --soak-warmup seconds on, the last one (taken after the drain) included,
    exceeds the reference by more than --rss-growth-percent; the reference is the highest sample up to and
    including the first one from --soak-warmup seconds on. A drop is shown, not judged: the allocator gives
    freed heap back to the kernel now and then (dips of ~7% between two samples of the short test), and a
    reference taken in such a dip would make the next sample read as growth;
  fds_no_growth: the last sample, taken once the load drained and its connections closed, has at most
    --fd-slack more open fds than the first sample after the warm-up, counting all of them and counting
    those that are not sockets (the first sample's count includes the clients' open connections).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.load.client import Outcome
from bench.load.config import MIB, LoadConfig, LoadError
from bench.load.modes import run_started
from bench.load.phases import (
    Environment,
    Prepared,
    ProgressFn,
    drive,
    environment,
    final_request,
    reference_pass,
    warmup,
)
from bench.load.plan import BAD_KINDS
from bench.load.report import (
    Check,
    check_answers,
    check_bad_refused,
    check_healthy,
    check_metrics,
    check_nothing_lost,
    check_time_limit,
    json_header,
    status_delta,
)
from bench.load.run import http_client
from bench.load.sampler import Sample, Sampler
from bench.load.server import Server, health, read_status_counts, wait_healthy, wait_idle
from bench.load.summary import ServerInfo, check_table, md_table, tally, tally_table

log = logging.getLogger(__name__)
# Seconds between closing the load's connections and the last sample: the server closes its side when
# it reads the end of each stream, on its next turn of the event loop.
CLOSE_SETTLE_SECONDS = 1.0


@dataclass
class SoakReport:
    config: LoadConfig
    server: ServerInfo
    environment: Environment
    references: dict[str, str]
    warmup: list[Outcome]  # the warm-up bursts before the soak (concurrent, drained)
    outcomes: list[Outcome]
    not_sent: int
    final: Outcome | None
    samples: list[Sample]
    load_seconds: float
    queue_depth_max: int
    status_delta: dict[str, float] | None
    checks: dict[str, Check] = field(default_factory=dict)
    finished_at: str = ""

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks.values())

    @property
    def settled(self) -> list[Sample]:
        """The samples the checks judge: from --soak-warmup seconds on, the last one included."""
        return [s for s in self.samples if s.phase != "warm-up"]

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        return tally(self.outcomes)

    def summary_rows(self) -> list[tuple[str, str]]:
        settled = self.settled
        first, last = (settled[0], settled[-1]) if settled else (None, None)
        completed = sum(row.get("completed", 0) for row in self.counts.values())
        return [
            ("requests planned", str(len(self.outcomes) + self.not_sent)),
            ("requests sent", str(len(self.outcomes))),
            ("completed", str(completed)),
            ("load phase (s)", f"{self.load_seconds:.1f} (paced over {self.config.pace_seconds:g})"),
            ("samples (after the warm-up)", f"{len(self.samples)} ({len(settled)})"),
            ("VmRSS first -> last after the warm-up (MiB)", _mib_pair(first, last, "rss")),
            ("open fds first -> last after the warm-up", f"{first.fds} -> {last.fds}" if first and last else "n/a"),
        ]

    def markdown(self, command: str | None = None) -> str:
        return render_soak(self, command)

    def to_json(self, command: str | None = None) -> dict[str, Any]:
        return {
            **json_header(self, command),
            "server": asdict(self.server),
            "load_seconds": round(self.load_seconds, 2),
            "queue_depth_max": self.queue_depth_max,
            "requests_by_kind_and_outcome": self.counts,
            "checks": {name: asdict(check) for name, check in self.checks.items()},
            "samples": [asdict(s) for s in self.samples],
            "server_status_counts_during_load": self.status_delta,
            "references": self.references,
            "warmup_requests": [asdict(o) for o in self.warmup],
            "requests": [asdict(o) for o in self.outcomes],
            "final_request": None if self.final is None else asdict(self.final),
        }


def _mib_pair(first: Sample | None, last: Sample | None, attr: str) -> str:
    if first is None or last is None:
        return "n/a"
    return f"{getattr(first, attr) / MIB:.1f} -> {getattr(last, attr) / MIB:.1f}"


def run_soak(config: LoadConfig, progress: ProgressFn | None = None) -> SoakReport:
    """The soak: server, reference pass, warm-up bursts, the paced load with samples, drain, last sample."""
    return run_started(config, "soak", _soak, progress)


async def _soak(config: LoadConfig, server: Server, prepared: Prepared, progress: ProgressFn) -> SoakReport:
    sent = finished = 0

    def on_send(_item: object, count: int) -> None:
        nonlocal sent
        sent = count

    async def on_done(_outcome: Outcome) -> None:
        nonlocal finished
        finished += 1

    sampler = Sampler(server.pid, config.sample_interval, config.soak_warmup, lambda: (sent - finished, finished))
    async with http_client(config, server.url) as client:
        first_health = await wait_healthy(client, server, config.startup_timeout)
        model = str(first_health.get("model"))
        bodies = {item.index: prepared.encode(item, model, config.max_tokens) for item in prepared.plan}
        references = await reference_pass(client, prepared, model, config.max_tokens, progress)
        if await wait_idle(client, config.idle_timeout) is None:
            raise LoadError(f"the server did not go idle within {config.idle_timeout:g} s after the reference pass")
        warm, _rss = await warmup(client, config, prepared, model, server.pid, progress)
        counts_before = await read_status_counts(client)

        sampler.start()
        try:
            load = await drive(client, config, prepared.plan, bodies, progress, on_send=on_send, on_done=on_done)
        finally:
            await sampler.stop()

        drained = await wait_idle(client, config.idle_timeout)
        counts_after = await read_status_counts(client)  # before the final request: the load's counts only
        drained, final = await final_request(client, config, prepared, model, drained)
        end_health = await health(client)
    # The client is closed: none of the load's connections is open now, so the last fd count holds the
    # server's own descriptors and whatever it failed to close.
    await asyncio.sleep(CLOSE_SETTLE_SECONDS)
    if server.alive():
        sampler.sample("end")

    report = SoakReport(
        config=config,
        server=ServerInfo.of(server, first_health),
        environment=environment(),
        references=references,
        warmup=warm,
        outcomes=load.outcomes,
        not_sent=load.not_sent,
        final=final,
        samples=sampler.samples,
        load_seconds=load.seconds,
        queue_depth_max=load.queue_depth_max,
        status_delta=status_delta(counts_before, counts_after),
        finished_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    report.checks = soak_checks(report, drained is not None, end_health)
    return report


def check_rss_growth(samples: list[Sample], percent: float) -> Check:
    first = next((i for i, s in enumerate(samples) if s.phase != "warm-up"), None)
    settled = [] if first is None else samples[first:]
    if len(settled) < 2:
        return Check(False, f"{len(settled)} sample(s) after the warm-up; the rule needs 2 or more")
    reference = max(samples[: first + 1], key=lambda s: s.rss)
    limit = reference.rss * (1 + percent / 100)
    over = [s for s in settled if s.rss > limit]
    low, high = min(s.rss for s in settled), max(s.rss for s in settled)
    return Check(
        not over,
        f"{len(settled) - len(over)} of {len(settled)} samples after the warm-up at most {percent:g}% above the "
        f"reference {reference.rss / MIB:.1f} MiB (at {reference.seconds:.0f} s; limit {limit / MIB:.1f} MiB); "
        f"range {low / MIB:.1f}..{high / MIB:.1f} MiB"
        + "".join(f"; at {s.seconds:.0f} s: {s.rss / MIB:.1f} MiB" for s in over[:5]),
    )


def check_fds(settled: list[Sample], slack: int) -> Check:
    if len(settled) < 2 or settled[-1].phase != "end":
        return Check(False, "no sample after the warm-up and after the drain to compare")
    first, last = settled[0], settled[-1]
    passed = last.fds <= first.fds + slack and last.other_fds <= first.other_fds + slack
    return Check(
        passed,
        f"open fds {first.fds} at {first.seconds:.0f} s ({first.sockets} sockets, {first.in_flight} requests in "
        f"flight) -> {last.fds} after the drain ({last.sockets} sockets); not sockets {first.other_fds} -> "
        f"{last.other_fds}; slack {slack}",
    )


def soak_checks(report: SoakReport, drained: bool, end_health: dict[str, Any] | None) -> dict[str, Check]:
    outcomes, config = report.outcomes, report.config
    return {
        "answers_match_reference": check_answers(report.warmup + outcomes, report.references, report.final),
        "nothing_lost": check_nothing_lost(report.warmup + outcomes, "valid requests (warm-up included)"),
        "bad_requests_refused": check_bad_refused(outcomes),
        "metrics_agree": check_metrics(outcomes, report.status_delta),
        "drained": Check(drained, "queue 0 and not busy after the load" if drained else "the queue did not drain"),
        "healthy_at_end": check_healthy(end_health),
        "spans_duration": Check(
            report.load_seconds >= config.pace_seconds,
            f"{report.load_seconds:.1f} s of load for --duration {config.pace_seconds:g} s",
        ),
        "rss_no_growth": check_rss_growth(report.samples, config.rss_growth_percent),
        "fds_no_growth": check_fds(report.settled, config.fd_slack),
        "within_time_limit": check_time_limit(outcomes, report.not_sent, report.load_seconds, config.load_time_limit),
    }


def render_soak(report: SoakReport, command: str | None) -> str:
    config, env, server = report.config, report.environment, report.server
    settled = report.settled
    samples = [
        (
            f"{s.seconds:.0f}",
            s.phase,
            f"{s.rss / MIB:.1f}",
            f"{s.rss_anon / MIB:.1f}",
            s.fds,
            s.sockets,
            s.other_fds,
            s.in_flight,
            s.finished,
        )
        for s in report.samples
    ]
    lines = [
        "# Soak test of the local server",
        "",
        f"Made by `{command or 'run_soak(...)'}` on {report.finished_at[:10]}: {len(report.outcomes)} of "
        f"{len(report.outcomes) + report.not_sent} planned requests from {config.clients} clients, paced over "
        f"{config.pace_seconds:g} s (request i leaves at i x duration / (n - 1)), seed {config.seed}, the "
        f"server's --max-queue {config.max_queue if config.url is None else 'as started'}, max_tokens "
        f"{config.max_tokens}, temperature 0. Server: {server.backend} on {env.platform}, {env.cpu_count} CPUs, "
        f"Python {env.python}, onnxruntime {env.onnxruntime}.",
        "",
        "Before the soak: each distinct request alone (the reference, "
        f"{len(report.references)} of them), then {config.warmup_rounds} warm-up burst(s) of {config.clients} "
        "concurrent valid requests. A 429 counts as rejected and is not retried. The machine was shared with "
        "other work during the run, so no latency is reported as a figure (each request's duration is in the JSON).",
        "",
        "## Requests by kind and outcome",
        "",
        *tally_table(report.counts),
        "",
        f"Bad requests cycle through {len(BAD_KINDS)} kinds; a conversation is a system prompt, the image with a "
        "first question, an assistant answer and a follow-up question (half of them streamed). Load phase: "
        f"{report.load_seconds:.1f} s; deepest queue seen on /health: {report.queue_depth_max}.",
        "",
        f"## Server memory and file descriptors (every {config.sample_interval:g} s)",
        "",
        *md_table(
            ["s", "phase", "VmRSS MiB", "RssAnon MiB", "fds", "sockets", "other fds", "in flight", "finished"],
            samples,
        ),
        "",
        f"Rules: samples before {config.soak_warmup:g} s are the warm-up's. rss_no_growth: no later sample, the "
        f"last included, exceeds by more than {config.rss_growth_percent:g}% the reference, the highest sample up "
        "to and including the first later one; a drop is shown, not judged (the allocator gives freed heap "
        "back to the kernel now and then, and a reference taken in such a dip would read the next sample as "
        "growth). fds_no_growth: the last sample (taken after the drain, once the load's connections were "
        f"closed) has at most {config.fd_slack} more fds than the first later one, in all and among those that "
        f"are not sockets. VmRSS first -> last after the warm-up: "
        f"{_mib_pair(settled[0] if settled else None, settled[-1] if settled else None, 'rss')} MiB.",
        "",
        "## Checks",
        "",
        *check_table(report.checks),
        "",
        f"All checks passed: {'yes' if report.passed else 'no'}. Every request's outcome is in {config.outputs[0]}.",
        "",
    ]
    return "\n".join(lines)
