"""A standard run's report (LoadReport), its figures, and the checks every mode shares."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.load.client import Outcome
from bench.load.config import MIB, LoadConfig
from bench.load.phases import Environment
from bench.load.plan import BAD_KINDS, VALID_KINDS

# Statuses the server counts before it answers (ApiError), so /metrics must match the client's count.
COUNTED_STATUSES = ("400", "404", "415", "429")


@dataclass
class Check:
    passed: bool
    detail: str


def config_json(config: LoadConfig) -> dict[str, Any]:
    """The settings as JSON: paths as strings, an API key masked."""
    out = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    if out.get("api_key"):
        out["api_key"] = "***"
    return out


def json_header(report: Any, command: str | None) -> dict[str, Any]:
    """What every mode's JSON report begins with: the command, when, whether it passed, the settings
    and the machine."""
    return {
        "command": command,
        "finished_at": report.finished_at,
        "passed": report.passed,
        "config": config_json(report.config),
        "environment": asdict(report.environment),
    }


@dataclass
class LoadReport:
    config: LoadConfig
    server: dict[str, Any]
    environment: Environment
    references: dict[str, str]
    warmup: list[Outcome]
    outcomes: list[Outcome]
    not_sent: int
    final: Outcome | None
    rss_reference: int  # after the sequential reference pass
    # The highest reading after the warm-up bursts (each drained): the level the load is measured
    # against. The highest, not the last: what is live at a quiet moment varies by ~10 MiB with the
    # order the burst's requests ran in, and a dip at "before" would read as growth after the load.
    rss_before: int
    rss_after: int
    load_seconds: float
    queue_depth_max: int
    status_delta: dict[str, float] | None  # the server's request counts by status over the load phase
    figures: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Check] = field(default_factory=dict)
    finished_at: str = ""

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks.values())

    def summary_rows(self) -> list[tuple[str, str]]:
        return figure_rows(self)

    def markdown(self, command: str | None = None) -> str:
        return render_markdown(self, command)

    def to_json(self, command: str | None = None) -> dict[str, Any]:
        return {
            **json_header(self, command),
            "server": self.server,
            "figures": self.figures,
            "checks": {name: asdict(check) for name, check in self.checks.items()},
            "server_status_counts_during_load": self.status_delta,
            "references": self.references,
            "warmup_requests": [asdict(o) for o in self.warmup],
            "requests": [asdict(o) for o in self.outcomes],
            "final_request": None if self.final is None else asdict(self.final),
        }


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile, interpolated between the nearest ranks (numpy's default); None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def figures(report: LoadReport) -> dict[str, Any]:
    outcomes = report.outcomes
    results = Counter(o.result for o in outcomes)
    done = [o for o in outcomes if o.result == "completed"]
    ttft = [o.ttft for o in done if o.ttft is not None]
    total = [o.total for o in done if o.total is not None]
    server_ttft = [o.server_ttft for o in done if isinstance(o.server_ttft, (int, float))]
    tolerance = report.config.rss_tolerance(report.rss_before)
    return {
        "planned": len(outcomes) + report.not_sent,
        "sent": len(outcomes),  # a request cut by the time limit was sent, not answered
        "completed": results["completed"],
        "rejected_429": results["rejected"],
        "refused_as_expected": results["refused"],
        "failed": results["failed"],
        "failed_by_kind": dict(Counter(o.detail for o in outcomes if o.result == "failed")),
        "disconnected": results["disconnected"],
        "cut_by_time_limit": results["cut"],
        "not_sent": report.not_sent,
        "sent_by_kind": dict(Counter("bad" if o.kind in BAD_KINDS else o.kind for o in outcomes)),
        "refused_by_kind": {
            kind: dict(Counter(f"{o.status} {o.detail}" for o in outcomes if o.kind == kind)) for kind in BAD_KINDS
        },
        "ttft_p50_ms": _ms(percentile(ttft, 50)),
        "ttft_p95_ms": _ms(percentile(ttft, 95)),
        "total_p50_ms": _ms(percentile(total, 50)),
        "total_p95_ms": _ms(percentile(total, 95)),
        "rejected_p50_ms": _ms(percentile([o.total for o in outcomes if o.result == "rejected" and o.total], 50)),
        "server_ttft_p50_ms": _ms(percentile(server_ttft, 50)),
        "server_ttft_p95_ms": _ms(percentile(server_ttft, 95)),
        "load_seconds": round(report.load_seconds, 2),
        "answers_per_second": round(len(done) / report.load_seconds, 2) if report.load_seconds > 0 else None,
        "queue_depth_max": report.queue_depth_max,
        "max_queue": None if report.config.url else report.config.max_queue,
        "rss_after_reference_mib": round(report.rss_reference / MIB, 1),
        "rss_before_mib": round(report.rss_before / MIB, 1),
        "rss_after_mib": round(report.rss_after / MIB, 1),
        "rss_diff_mib": round((report.rss_after - report.rss_before) / MIB, 1),
        "rss_tolerance_mib": round(tolerance / MIB, 1),
        "reference_requests": len(report.references),
        "warmup_requests": len(report.warmup),
        "warmup_completed": sum(o.result == "completed" for o in report.warmup),
    }


def _listed(outcomes: list[Outcome], show: int = 5) -> str:
    return "".join(
        f"; {o.phase} #{o.index} {o.kind} {o.key!r}: {o.status} {o.detail or o.answer!r}" for o in outcomes[:show]
    )


def check_answers(answered: list[Outcome], references: dict[str, str], final: Outcome | None) -> Check:
    """Every complete answer (and the final request's) equals the same request's answer alone; a stream
    its client cut after the first chunk got the reference's start (the same greedy tokens)."""
    done = [o for o in answered if o.result == "completed"] + ([final] if final else [])
    cut = [o for o in answered if o.result == "disconnected"]
    wrong = [o for o in done if o.answer != references.get(o.key)]
    wrong += [o for o in cut if not references.get(o.key, "").startswith(o.answer or "")]
    final_failed = [final] if final is not None and final.result != "completed" else []
    return Check(
        not wrong and not final_failed,
        f"{len(done) + len(cut) - len(wrong)} of {len(done) + len(cut)} answers equal their reference "
        "(a disconnected one: its start)" + _listed(wrong + final_failed),
    )


def kept(o: Outcome) -> bool:
    """A valid request that got what the server owes it: an answer, or a 429 (a disconnecting one: its
    first chunk)."""
    allowed = ("completed", "rejected", "disconnected") if o.kind == "disconnect" else ("completed", "rejected")
    return o.result in allowed


def check_nothing_lost(outcomes: list[Outcome], what: str = "valid requests") -> Check:
    valid = [o for o in outcomes if o.kind in VALID_KINDS and o.result != "cut"]
    lost = [o for o in valid if not kept(o)]
    return Check(
        not lost,
        f"{len(valid) - len(lost)} of {len(valid)} {what} got a complete answer or a 429 (a disconnecting one: "
        "its first chunk)" + _listed(lost),
    )


def check_bad_refused(outcomes: list[Outcome]) -> Check:
    bad = [o for o in outcomes if o.kind in BAD_KINDS and o.result != "cut"]
    misrefused = [o for o in bad if o.result not in ("refused", "rejected")]  # rejected: FOUND_AFTER_ADMISSION
    return Check(
        not misrefused,
        f"{len(bad) - len(misrefused)} of {len(bad)} bad requests got their 4xx with an OpenAI-shaped error"
        " (or a 429 for an image fault, found only after admission)" + _listed(misrefused),
    )


def check_metrics(outcomes: list[Outcome], delta: dict[str, float] | None) -> Check:
    if delta is None:
        return Check(False, "/metrics did not answer before and after the load")
    seen = Counter(str(o.status) for o in outcomes if o.status is not None)
    pairs = [(s, int(delta.get(s, 0)), seen.get(s, 0)) for s in COUNTED_STATUSES]
    return Check(
        all(server == client for _, server, client in pairs),
        "corematching_requests_total over the load, server vs client: "
        + ", ".join(f"{s}: {server} vs {client}" for s, server, client in pairs),
    )


def check_healthy(end_health: dict[str, Any] | None) -> Check:
    return Check(end_health is not None and end_health.get("status") == "ok", f"/health: {json.dumps(end_health)}")


def check_time_limit(outcomes: list[Outcome], not_sent: int, seconds: float, limit: float) -> Check:
    unfinished = sum(o.result == "cut" for o in outcomes)
    return Check(
        unfinished == 0 and not_sent == 0,
        f"{seconds:.1f} s of the time limit {limit:g} s"
        + (f"; {unfinished} cut in flight, {not_sent} not sent" if unfinished or not_sent else ""),
    )


def status_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    if before is None or after is None:
        return None
    return {s: after.get(s, 0.0) - before.get(s, 0.0) for s in sorted({*after, *before})}


def checks(report: LoadReport, drained: bool, end_health: dict[str, Any] | None) -> dict[str, Check]:
    outcomes = report.outcomes
    result = {
        "answers_match_reference": check_answers(report.warmup + outcomes, report.references, report.final),
        "nothing_lost": check_nothing_lost(report.warmup + outcomes, "valid requests (warm-up included)"),
        "bad_requests_refused": check_bad_refused(outcomes),
        "metrics_agree": check_metrics(outcomes, report.status_delta),
        "drained": Check(drained, "queue 0 and not busy after the load" if drained else "the queue did not drain"),
        "healthy_at_end": check_healthy(end_health),
    }
    growth, tolerance = report.rss_after - report.rss_before, report.config.rss_tolerance(report.rss_before)
    result["rss_within_tolerance"] = Check(
        report.rss_after > 0 and growth <= tolerance,
        f"{report.rss_before / MIB:.1f} -> {report.rss_after / MIB:.1f} MiB ({growth / MIB:+.1f}, "
        f"tolerance {tolerance / MIB:.1f})",
    )
    result["within_time_limit"] = check_time_limit(
        outcomes, report.not_sent, report.load_seconds, report.config.load_time_limit
    )
    return result


FIGURE_LABELS = (
    ("planned", "requests planned"),
    ("sent", "requests sent"),
    ("completed", "completed"),
    ("rejected_429", "rejected (429, not retried)"),
    ("refused_as_expected", "bad requests refused as expected"),
    ("failed", "failed"),
    ("disconnected", "disconnected after the first chunk"),
    ("cut_by_time_limit", "cut by --time-limit"),
    ("ttft_p50_ms", "time to first token p50 (ms, client)"),
    ("ttft_p95_ms", "time to first token p95 (ms, client)"),
    ("total_p50_ms", "total latency p50 (ms, client)"),
    ("total_p95_ms", "total latency p95 (ms, client)"),
    ("server_ttft_p50_ms", "time to first token p50 (ms, server)"),
    ("server_ttft_p95_ms", "time to first token p95 (ms, server)"),
    ("rejected_p50_ms", "time to a 429 p50 (ms, client)"),
    ("load_seconds", "load phase (s)"),
    ("answers_per_second", "completed answers per second"),
    ("queue_depth_max", "deepest queue seen (/health)"),
    ("rss_after_reference_mib", "server RSS after the sequential reference pass (MiB)"),
    ("rss_before_mib", "server RSS before the load: the highest after a warm-up burst (MiB)"),
    ("rss_after_mib", "server RSS after (MiB)"),
    ("rss_diff_mib", "RSS difference (MiB)"),
    ("rss_tolerance_mib", "RSS tolerance (MiB)"),
)


def figure_rows(report: LoadReport) -> list[tuple[str, str]]:
    """(label, value) of the headline figures, for the markdown table and the command's summary."""
    rows = []
    for key, label in FIGURE_LABELS:
        value = report.figures.get(key)
        if key == "failed" and report.figures.get("failed_by_kind"):
            kinds = ", ".join(f"{k}: {n}" for k, n in sorted(report.figures["failed_by_kind"].items()))
            rows.append((label, f"{value} ({kinds})"))
        else:
            rows.append((label, "n/a" if value is None else str(value)))
    return rows


def render_markdown(report: LoadReport, command: str | None) -> str:
    env, fig = report.environment, report.figures
    kinds = ", ".join(f"{k}: {n}" for k, n in sorted(fig["sent_by_kind"].items()))
    lines = [
        "# Load test of the local server",
        "",
        f"Made by `{command or 'run_load(...)'}` on {report.finished_at[:10]}: {report.config.clients} concurrent "
        f"clients, {fig['planned']} requests (seed {report.config.seed}; {kinds}; a conversation is a system "
        "prompt, the image with a first question, an assistant answer and a follow-up question; bad requests "
        f"cycle through {len(BAD_KINDS)} kinds), the server's --max-queue {fig['max_queue'] or 'as started'}, "
        f"max_tokens {report.config.max_tokens}, temperature 0. Server: {report.server['health'].get('backend')} "
        f"on {env.platform}, {env.cpu_count} CPUs, Python {env.python}, onnxruntime {env.onnxruntime}.",
        "",
        "A 429 counts as rejected and is not retried. Times are measured by the client: to the first content "
        "chunk (non-streamed: to the response) and to the end, over completed answers of the load. RSS is the "
        "server's VmRSS: after the sequential reference pass (each distinct request alone), "
        + (
            f"after {report.config.warmup_rounds} warm-up burst(s) of {report.config.clients} concurrent valid "
            'requests, each drained ("before": the highest of these readings; the first concurrent requests raise '
            "the allocator's high-water mark once, and what is live at a quiet moment varies by some MiB), "
            if report.config.warmup_rounds
            else 'which is "before" (no warm-up burst: --warmup-rounds 0), '
        )
        + "and after the load drained"
        + (' and one more request ("after").' if report.config.final_request else ' ("after").'),
        "",
        "| Figure | Value |",
        "| --- | --- |",
        *(f"| {label} | {value} |" for label, value in figure_rows(report)),
        "",
        "| Check | Passed | Detail |",
        "| --- | --- | --- |",
        *(
            f"| {name} | {'yes' if check.passed else 'no'} | {check.detail.replace('|', '/')} |"
            for name, check in report.checks.items()
        ),
        "",
        f"All checks passed: {'yes' if report.passed else 'no'}. Every request's outcome is in load.json.",
        "",
        "## Soak and kill runs",
        "",
        "`--soak` sends the same mix paced over `--duration` seconds (default 1000 requests over 600 s: request "
        "i leaves at i x duration / (n - 1)) and samples the server's VmRSS and open file descriptors every "
        "`--sample-interval` seconds (default 60), then once more after the drain with the load's connections "
        "closed. Its checks add to the ones above: samples before `--soak-warmup` seconds (default 60) are the "
        "warm-up's; no later sample, the last included, exceeds by more than `--rss-growth-percent` (default 5%) "
        "the highest sample up to and including the first later one (drops are shown, not judged); the last "
        "sample has at most `--fd-slack` (default 2) more open fds than the first later one, in all and among "
        "those that are not sockets. Results: soak.md and soak.json.",
        "",
        "`--kill` sends the mix, SIGKILLs the server once `--kill-after` requests were sent (default half; the "
        "kill waits up to 5 s for /health to show an answer being generated) and starts it again with the same "
        "command on the same port; a client whose request failed on the broken connection waits for /health "
        "before its next request. Its checks: each request completed equal to its reference, got a 429 or its "
        "4xx, or, in flight at the kill or sent while the server was down, failed with a connection error or a "
        "5xx; none ran past `--client-timeout`; after the restart every distinct request alone equals its "
        "reference again. Only a server the run started can be killed (`--kill` refuses `--url`). Results: "
        "kill.md and kill.json.",
        "",
    ]
    return "\n".join(lines)
