"""Kill mode: the mix sent, the server SIGKILLed once --kill-after requests were sent (half, by default),
started again with the same command on the same port, and the mix goes on.

A client whose request failed on the broken connection waits until the server answers /health again
before it takes its next request, as a client with a health check would, rather than spending the rest
of the mix on refused connections. The checks: each request completed (equal to the same request alone),
got a 429 or its expected 4xx, or, sent before the server was back, failed with a connection error or a
5xx; none ran past --client-timeout; and once back, the server answers every distinct request as before.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.load.client import Outcome, send
from bench.load.config import LoadConfig, LoadError
from bench.load.modes import run_started
from bench.load.phases import (
    Environment,
    Prepared,
    ProgressFn,
    drive,
    environment,
    reference_pass,
)
from bench.load.plan import BAD_KINDS, Planned
from bench.load.report import Check, check_answers, check_healthy, check_time_limit, json_header, kept
from bench.load.run import http_client
from bench.load.server import Server, health, wait_healthy, wait_idle
from bench.load.summary import (
    OUTCOME_LABELS,
    ServerInfo,
    check_table,
    md_table,
    outcome_label,
    tally,
    tally_table,
)

log = logging.getLogger(__name__)
# Seconds the kill may wait, once due, for the server to be answering something.
BUSY_WAIT_SECONDS = 5.0


@dataclass
class KillEvent:
    """The kill and the restart, in seconds from the start of the load."""

    after_sent: int  # requests sent when the kill was due (--kill-after)
    sent: int = 0  # requests sent when it came (it waits for the server to be answering something)
    at: float | None = None
    busy: bool = False  # /health said an answer was being generated (or requests waited) at the kill
    in_flight: int = 0  # requests the clients were waiting on at the kill
    killed_pid: int | None = None
    exit_code: int | None = None  # -9: ended by SIGKILL
    new_pid: int | None = None
    back_at: float | None = None  # /health answered ok again
    error: str = ""  # why the restart failed

    @property
    def restart_seconds(self) -> float | None:
        return None if self.at is None or self.back_at is None else self.back_at - self.at


@dataclass
class KillReport:
    config: LoadConfig
    server: ServerInfo
    environment: Environment
    references: dict[str, str]
    outcomes: list[Outcome]
    not_sent: int
    kill: KillEvent
    after_restart: list[Outcome]  # each distinct request alone, once the load was over
    load_seconds: float
    checks: dict[str, Check] = field(default_factory=dict)
    finished_at: str = ""

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks.values())

    def window(self, o: Outcome) -> str:
        """When the request was sent: before the kill, while the server was down, or after it was back."""
        kill = self.kill
        if kill.at is None or o.started is None or o.started < kill.at:
            return "before the kill"
        if kill.back_at is None or o.started < kill.back_at:
            return "while down"
        return "after the restart"

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        return tally(self.outcomes)

    def counts_by_window(self) -> dict[str, dict[str, int]]:
        table: dict[str, dict[str, int]] = {}
        for o in self.outcomes:
            row = table.setdefault(self.window(o), {})
            row[outcome_label(o)] = row.get(outcome_label(o), 0) + 1
        return table

    def summary_rows(self) -> list[tuple[str, str]]:
        k = self.kill
        return [
            ("requests planned", str(len(self.outcomes) + self.not_sent)),
            ("requests sent", str(len(self.outcomes))),
            ("killed after (requests sent)", f"{k.sent} (due at {k.after_sent})"),
            ("in flight at the kill", f"{k.in_flight}{' (server answering)' if k.busy else ''}"),
            ("killed at (s)", "n/a" if k.at is None else f"{k.at:.1f}"),
            ("back after (s)", "n/a" if k.restart_seconds is None else f"{k.restart_seconds:.1f}"),
            *((f"sent {w}", ", ".join(f"{n} {lbl}" for lbl, n in row.items())) for w, row in self._windows()),
            ("answers after the restart", f"{sum(o.result == 'completed' for o in self.after_restart)} alone"),
        ]

    def _windows(self) -> list[tuple[str, dict[str, int]]]:
        by = self.counts_by_window()
        return [(w, by[w]) for w in ("before the kill", "while down", "after the restart") if w in by]

    def markdown(self, command: str | None = None) -> str:
        return render_kill(self, command)

    def to_json(self, command: str | None = None) -> dict[str, Any]:
        return {
            **json_header(self, command),
            "server": asdict(self.server),
            "kill": {**asdict(self.kill), "restart_seconds": self.kill.restart_seconds},
            "load_seconds": round(self.load_seconds, 2),
            "requests_by_kind_and_outcome": self.counts,
            "requests_by_window_and_outcome": self.counts_by_window(),
            "checks": {name: asdict(check) for name, check in self.checks.items()},
            "references": self.references,
            "requests": [{**asdict(o), "window": self.window(o)} for o in self.outcomes],
            "after_restart": [asdict(o) for o in self.after_restart],
        }


def run_kill(config: LoadConfig, progress: ProgressFn | None = None) -> KillReport:
    """The kill run: server, reference pass, the load with a SIGKILL and a restart in it, each request alone."""
    return run_started(config, "kill", _kill_run, progress)


async def _kill_run(config: LoadConfig, server: Server, prepared: Prepared, progress: ProgressFn) -> KillReport:
    event = KillEvent(config.kill_at)
    back = asyncio.Event()
    sent_now = finished = 0
    killer: asyncio.Task[None] | None = None
    # A request's own bound, so that a read stuck on a dead connection shows as a hang, not as a stall.
    async with http_client(config, server.url, read_timeout=config.client_timeout) as client:
        first_health = await wait_healthy(client, server, config.startup_timeout)
        info = ServerInfo.of(server, first_health)
        model = str(first_health.get("model"))
        bodies = {item.index: prepared.encode(item, model, config.max_tokens) for item in prepared.plan}
        references = await reference_pass(client, prepared, model, config.max_tokens, progress)
        if await wait_idle(client, config.idle_timeout) is None:
            raise LoadError(f"the server did not go idle within {config.idle_timeout:g} s after the reference pass")
        start = time.perf_counter()

        async def kill_and_restart() -> None:
            # Killed while it answers, so that the kill breaks a generation and open connections, not an
            # idle loop: the next /health that shows work, or the bound's end.
            deadline = time.monotonic() + BUSY_WAIT_SECONDS
            while time.monotonic() < deadline:
                body = await health(client)
                if body is not None and (body.get("busy") or body.get("queue")):
                    event.busy = True
                    break
                await asyncio.sleep(0.02)
            event.at, event.sent, event.in_flight = time.perf_counter() - start, sent_now, sent_now - finished
            try:
                event.killed_pid = server.kill()
                event.exit_code = server.process.returncode if server.process else None
                event.new_pid = server.start_again()
                await wait_healthy(client, server, config.startup_timeout)
                event.back_at = time.perf_counter() - start
                log.info("the server is back after %.1f s", event.restart_seconds)
            except LoadError as e:
                event.error = str(e)
                log.error("the server did not come back: %s", e)
            finally:
                back.set()  # the clients go on either way; their failures then show why

        def on_send(_item: Planned, sent: int) -> None:
            nonlocal killer, sent_now
            sent_now = sent
            if sent == config.kill_at and killer is None:
                # A task of its own: the request that reached the count goes out first, then the kill.
                killer = asyncio.create_task(kill_and_restart())

        async def on_done(outcome: Outcome) -> None:
            nonlocal finished
            finished += 1
            if killer is not None and (outcome.connection_error or outcome.server_error):
                await back.wait()

        load = await drive(
            client,
            config,
            prepared.plan,
            bodies,
            progress,
            client_timeout=config.client_timeout,
            on_send=on_send,
            on_done=on_done,
        )
        if killer is not None:
            await killer
        after: list[Outcome] = []
        if back.is_set() and not event.error:
            await wait_idle(client, config.idle_timeout)
            progress("after restart", 0, len(prepared.distinct))
            for n, item in enumerate(prepared.distinct, 1):
                body = prepared.encode(item, model, config.max_tokens)
                after.append(await send(client, item, *body, phase="after_restart"))
                progress("after restart", n, len(prepared.distinct))
        end_health = await health(client)

    report = KillReport(
        config=config,
        server=info,
        environment=environment(),
        references=references,
        outcomes=load.outcomes,
        not_sent=load.not_sent,
        kill=event,
        after_restart=after,
        load_seconds=load.seconds,
        finished_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    report.checks = kill_checks(report, end_health)
    return report


def _allowed(report: KillReport, o: Outcome) -> bool:
    """The outcomes a request may have in a run whose server is killed."""
    if o.kind in BAD_KINDS:
        if o.result in ("refused", "rejected"):
            return True
    elif kept(o):
        return True
    # A broken connection or a 5xx only for a request in flight at the kill or sent while the server was down.
    kill = report.kill
    if not (o.connection_error or o.server_error) or kill.at is None or o.started is None:
        return False
    ended = o.started + (o.total or 0.0)
    return ended >= kill.at and (kill.back_at is None or o.started < kill.back_at)


def _listed(outcomes: list[Outcome], show: int = 5) -> str:
    return "".join(f"; #{o.index} {o.kind} at {o.started or 0:.1f} s: {o.status} {o.detail}" for o in outcomes[:show])


def kill_checks(report: KillReport, end_health: dict[str, Any] | None) -> dict[str, Check]:
    config, kill, outcomes = report.config, report.kill, report.outcomes
    windows = [report.window(o) for o in outcomes]
    result = {
        "killed_mid_load": Check(
            kill.at is not None and kill.exit_code == -9 and "before the kill" in windows,
            f"SIGKILL once {kill.sent} requests were sent, at {kill.at or 0:.1f} s, with {kill.in_flight} in "
            f"flight{', the server answering' if kill.busy else ''}; pid {kill.killed_pid} exited with "
            f"{kill.exit_code}",
        ),
        "restarted_on_same_port": Check(
            kill.back_at is not None and not kill.error,
            f"pid {kill.new_pid} answered /health at {report.server.url} {kill.restart_seconds or 0:.1f} s after "
            "the kill" + (f"; {kill.error}" if kill.error else ""),
        ),
    }
    odd = [o for o in outcomes if o.result != "cut" and not _allowed(report, o)]
    result["outcomes_allowed"] = Check(
        not odd,
        f"{len(outcomes) - len(odd)} of {len(outcomes)} requests completed, got a 429 or their 4xx, or, in "
        "flight at the kill or sent while the server was down, failed with a connection error or a 5xx" + _listed(odd),
    )
    hung = [o for o in outcomes if o.detail == "client_timeout" or (o.total or 0.0) > config.client_timeout]
    longest = max((o.total or 0.0 for o in outcomes), default=0.0)
    result["none_hung"] = Check(
        not hung,
        f"{len(hung)} requests ran past --client-timeout {config.client_timeout:g} s; the longest took "
        f"{longest:.1f} s" + _listed(hung),
    )
    result["answers_match_reference"] = check_answers(outcomes, report.references, None)
    after = [o for o, w in zip(outcomes, windows, strict=True) if w == "after the restart"]
    wrong = [o for o in report.after_restart if o.result != "completed" or o.answer != report.references.get(o.key)]
    result["answers_after_restart"] = Check(
        bool(report.after_restart) and not wrong and any(o.result == "completed" for o in after),
        f"{len(report.after_restart) - len(wrong)} of {len(report.after_restart)} distinct requests alone after "
        f"the restart equal their reference; {sum(o.result == 'completed' for o in after)} load requests sent "
        "after the restart completed" + "".join(f"; {o.key!r}: {o.status} {o.detail or o.answer!r}" for o in wrong[:5]),
    )
    result["healthy_at_end"] = check_healthy(end_health)
    result["within_time_limit"] = check_time_limit(
        outcomes, report.not_sent, report.load_seconds, config.load_time_limit
    )
    return result


def _durations(outcomes: list[Outcome]) -> list[tuple[str, int, str]]:
    """(outcome, requests, the longest one's seconds): that nothing hung, not how fast it was."""
    longest: dict[str, list[float]] = {}
    for o in outcomes:
        longest.setdefault(outcome_label(o), []).append(o.total or 0.0)
    ordered = sorted(longest.items(), key=lambda item: OUTCOME_LABELS.index(item[0]))
    return [(label.replace("_", " "), len(times), f"{max(times):.2f}") for label, times in ordered]


def render_kill(report: KillReport, command: str | None) -> str:
    config, env, server, kill = report.config, report.environment, report.server, report.kill
    paced = f"paced over {config.pace_seconds:g} s" if config.pace_seconds else "not paced"
    slowest = sorted(report.outcomes, key=lambda o: o.total or 0.0, reverse=True)[:1]
    lines = [
        "# Kill test of the local server",
        "",
        f"Made by `{command or 'run_kill(...)'}` on {report.finished_at[:10]}: {len(report.outcomes)} of "
        f"{len(report.outcomes) + report.not_sent} planned requests from {config.clients} clients ({paced}; seed "
        f"{config.seed}; the server's --max-queue {config.max_queue}; max_tokens {config.max_tokens}; temperature "
        f"0); the server SIGKILLed once {kill.sent} requests were sent (due at {kill.after_sent}, it waits for the "
        "server to be answering something), then started again with the same command on the same port. "
        f"Server: {server.backend} on {env.platform}, {env.cpu_count} CPUs, Python {env.python}, onnxruntime "
        f"{env.onnxruntime}.",
        "",
        "A client whose request failed on the broken connection waits for /health to answer again before its "
        "next request; a 429 counts as rejected and is not retried. The machine was shared with other work, so "
        "durations say only that nothing hung.",
        "",
        "## The kill",
        "",
        *md_table(
            ["Event", "Value"],
            [
                ("the kill was due once this many requests were sent", kill.after_sent),
                ("requests sent when it came", kill.sent),
                ("requests in flight at the kill", kill.in_flight),
                ("server answering at the kill (/health busy or queued)", "yes" if kill.busy else "no"),
                ("killed at (s from the start of the load)", "n/a" if kill.at is None else f"{kill.at:.2f}"),
                ("killed process, exit code", f"{kill.killed_pid}, {kill.exit_code}"),
                ("new process", kill.new_pid),
                ("back on /health after (s)", "n/a" if kill.restart_seconds is None else f"{kill.restart_seconds:.2f}"),
                ("load phase (s)", f"{report.load_seconds:.1f}"),
                ("longest request (s)", f"{slowest[0].total or 0:.2f}" if slowest else "n/a"),
                ("--client-timeout (s)", f"{config.client_timeout:g}"),
            ],
        ),
        "",
        "## Requests by kind and outcome",
        "",
        *tally_table(report.counts),
        "",
        "## Requests by when they were sent",
        "",
        *tally_table(report.counts_by_window(), "when sent"),
        "",
        "## How long the requests took, by outcome",
        "",
        *md_table(["outcome", "requests", "longest (s)"], _durations(report.outcomes)),
        "",
        f"After the load, each of the {len(report.references)} distinct requests alone again: "
        f"{sum(o.result == 'completed' and o.answer == report.references.get(o.key) for o in report.after_restart)}"
        f" of {len(report.after_restart)} equal their reference from before the kill.",
        "",
        "## Checks",
        "",
        *check_table(report.checks),
        "",
        f"All checks passed: {'yes' if report.passed else 'no'}. Every request's outcome, duration and window "
        f"are in {config.outputs[0]}.",
        "",
    ]
    return "\n".join(lines)
