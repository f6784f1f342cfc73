"""A run's report (LoadReport), its figures and its checks."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.load.client import Outcome
from bench.load.config import MIB, LoadConfig
from bench.load.plan import BAD_KINDS, VALID_KINDS

# Statuses the server counts before it answers (ApiError), so /metrics must match the client's count.
COUNTED_STATUSES = ("400", "404", "415", "429")


@dataclass
class Check:
    passed: bool
    detail: str


@dataclass
class LoadReport:
    config: LoadConfig
    server: dict[str, Any]
    environment: dict[str, Any]
    references: dict[str, str]
    warmup: list[Outcome]
    outcomes: list[Outcome]
    not_sent: int
    final: Outcome | None
    rss_reference: int  # after the sequential reference pass
    rss_before: int  # after the warm-up bursts: the level the load is measured against
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

    def to_json(self, command: str | None = None) -> dict[str, Any]:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.config).items()}
        return {
            "command": command,
            "finished_at": self.finished_at,
            "passed": self.passed,
            "config": config,
            "environment": self.environment,
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


def checks(report: LoadReport, drained: bool, end_health: dict[str, Any] | None) -> dict[str, Check]:
    outcomes, refs = report.outcomes, report.references
    result: dict[str, Check] = {}

    answered = [o for o in report.warmup + outcomes if o.result == "completed"] + (
        [report.final] if report.final else []
    )
    cut = [o for o in outcomes if o.result == "disconnected"]
    wrong = [o for o in answered if o.answer != refs.get(o.key)]
    # A disconnected stream's text must still be the start of the reference (the same greedy tokens).
    wrong += [o for o in cut if not refs.get(o.key, "").startswith(o.answer or "")]
    final_failed = [report.final] if report.final is not None and report.final.result != "completed" else []
    result["answers_match_reference"] = Check(
        not wrong and not final_failed,
        f"{len(answered) + len(cut) - len(wrong)} of {len(answered) + len(cut)} answers equal their reference "
        "(a disconnected one: its start)" + _listed(wrong + final_failed),
    )

    def kept(o: Outcome) -> bool:
        allowed = ("completed", "rejected", "disconnected") if o.kind == "disconnect" else ("completed", "rejected")
        return o.result in allowed

    valid = [o for o in report.warmup + outcomes if o.kind in VALID_KINDS and o.result != "cut"]
    lost = [o for o in valid if not kept(o)]
    result["nothing_lost"] = Check(
        not lost,
        f"{len(valid) - len(lost)} of {len(valid)} valid requests (warm-up included) got a complete answer or a "
        "429 (a disconnecting one: its first chunk)" + _listed(lost),
    )

    bad = [o for o in outcomes if o.kind in BAD_KINDS and o.result != "cut"]
    misrefused = [o for o in bad if o.result not in ("refused", "rejected")]  # rejected: FOUND_AFTER_ADMISSION
    result["bad_requests_refused"] = Check(
        not misrefused,
        f"{len(bad) - len(misrefused)} of {len(bad)} bad requests got their 4xx with an OpenAI-shaped error"
        " (or a 429 for an image fault, found only after admission)" + _listed(misrefused),
    )

    delta = report.status_delta
    if delta is None:
        result["metrics_agree"] = Check(False, "/metrics did not answer before and after the load")
    else:
        seen = Counter(str(o.status) for o in outcomes if o.status is not None)
        pairs = [(s, int(delta.get(s, 0)), seen.get(s, 0)) for s in COUNTED_STATUSES]
        result["metrics_agree"] = Check(
            all(server == client for _, server, client in pairs),
            "corematching_requests_total over the load, server vs client: "
            + ", ".join(f"{s}: {server} vs {client}" for s, server, client in pairs),
        )

    result["drained"] = Check(drained, "queue 0 and not busy after the load" if drained else "the queue did not drain")
    healthy = end_health is not None and end_health.get("status") == "ok"
    result["healthy_at_end"] = Check(healthy, f"/health: {json.dumps(end_health)}")

    growth, tolerance = report.rss_after - report.rss_before, report.config.rss_tolerance(report.rss_before)
    result["rss_within_tolerance"] = Check(
        report.rss_after > 0 and growth <= tolerance,
        f"{report.rss_before / MIB:.1f} -> {report.rss_after / MIB:.1f} MiB ({growth / MIB:+.1f}, "
        f"tolerance {tolerance / MIB:.1f})",
    )

    unfinished = sum(o.result == "cut" for o in outcomes)
    result["within_time_limit"] = Check(
        unfinished == 0 and report.not_sent == 0,
        f"{report.load_seconds:.1f} s of --time-limit {report.config.time_limit:g} s"
        + (f"; {unfinished} cut in flight, {report.not_sent} not sent" if unfinished or report.not_sent else ""),
    )
    return result
