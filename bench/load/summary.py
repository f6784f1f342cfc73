"""What the soak and kill reports share: the server's description, requests tallied by kind and
outcome, and Markdown tables."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.load.client import Outcome
from bench.load.plan import BAD_KINDS, VALID_KINDS
from bench.load.report import Check
from bench.load.server import Server

KIND_GROUPS = (*VALID_KINDS, "bad")
# How an outcome is counted, in table order.
OUTCOME_LABELS = (
    "completed",
    "disconnected",
    "rejected",
    "refused",
    "connection_error",
    "server_error",
    "timeout",
    "failed",
    "cut",
)


@dataclass
class ServerInfo:
    url: str
    pid: int  # the first process's id (kill mode: the one killed)
    started_here: bool
    command: list[str] | None
    model: str
    backend: str | None
    alive_at_end: bool = True
    log_tail: list[str] = field(default_factory=list)  # only when a check failed

    @classmethod
    def of(cls, server: Server, health: dict[str, Any]) -> ServerInfo:
        return cls(
            server.url,
            server.pid,
            server.started_here,
            server.command,
            str(health.get("model")),
            health.get("backend"),
        )


def kind_group(o: Outcome) -> str:
    return "bad" if o.kind in BAD_KINDS else o.kind


def outcome_label(o: Outcome) -> str:
    if o.result != "failed":
        return o.result
    if o.detail == "client_timeout" or "Timeout" in o.detail:
        return "timeout"
    if o.connection_error:
        return "connection_error"
    if o.server_error:
        return "server_error"
    return "failed"


def tally(outcomes: Iterable[Outcome]) -> dict[str, dict[str, int]]:
    """{kind: {outcome: count}}: kinds as KIND_GROUPS (every bad kind as "bad"), outcomes as OUTCOME_LABELS."""
    counts: dict[str, Counter[str]] = {}
    for o in outcomes:
        counts.setdefault(kind_group(o), Counter())[outcome_label(o)] += 1
    return {kind: dict(counts[kind]) for kind in KIND_GROUPS if kind in counts}


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        return str(value).replace("|", "/").replace("\n", " ")

    return [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---" for _ in headers) + " |",
        *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows),
    ]


def tally_table(counts: dict[str, dict[str, int]], first: str = "kind") -> list[str]:
    """Requests by kind (rows) and outcome (columns, only those that occurred), with totals."""
    labels = [label for label in OUTCOME_LABELS if any(label in row for row in counts.values())]
    rows = [[kind, *(row.get(label, 0) for label in labels), sum(row.values())] for kind, row in counts.items()]
    totals = [sum(row.get(label, 0) for row in counts.values()) for label in labels]
    rows.append(["all", *totals, sum(totals)])
    return md_table([first, *(label.replace("_", " ") for label in labels), "all"], rows)


def check_table(checks: dict[str, Check]) -> list[str]:
    return md_table(
        ["Check", "Passed", "Detail"], [(name, "yes" if c.passed else "no", c.detail) for name, c in checks.items()]
    )
