"""Load-test the local server: concurrent clients, good and bad requests, memory before and after.

    python scripts/load_test.py [--clients 16] [--requests 64] [--max-queue 8] [--out-dir docs/serving] [--force]
    python scripts/load_test.py --url http://127.0.0.1:8000 --pid PID      # a server already running here
    python scripts/load_test.py --soak [--duration 600] [--requests 1000] [--sample-interval 60]
    python scripts/load_test.py --kill [--requests 64] [--kill-after 32] [--duration S]

Starts `python -m serving` for --build on a free port (unless --url), answers each distinct request
alone for reference, then sends the mix from --clients clients and checks the answers, the refusals, the
drain, the server's health and its resident memory (bench/load/). Writes load.json and load.md.
--soak paces the mix over --duration seconds and samples the server's VmRSS and open fds (soak.json,
soak.md); --kill SIGKILLs the server part-way and starts it again on the same port (kill.json, kill.md).
Exit status: 0 every check passed, 1 a check failed, 2 the run could not be made.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.load import LoadConfig, LoadConfigError, LoadError, run, write_results

# Settings only the soak or the kill run takes: left out unless given, so that LoadConfig says which
# mode a stray one belongs to.
MODE_SETTINGS = ("duration", "sample_interval", "soak_warmup", "rss_growth_percent", "fd_slack", "kill_after")
SOAK_ONLY = ("sample_interval", "soak_warmup", "rss_growth_percent", "fd_slack")


def shown_command(argv: list[str]) -> str:
    """The command as the results show it: an --api-key value masked."""
    shown = ["***" if i and argv[i - 1] == "--api-key" else arg for i, arg in enumerate(argv)]
    shown = ["--api-key=***" if arg.startswith("--api-key=") else arg for arg in shown]
    return shlex.join(["python", "scripts/load_test.py", *shown])


def parse(argv: list[str] | None) -> argparse.Namespace:
    defaults = LoadConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, default=defaults.build, help="build to serve (default builds/default)")
    parser.add_argument("--url", help="a server already running on this machine (http://127.0.0.1:PORT)")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id (its memory is read)")
    parser.add_argument("--clients", type=int, default=defaults.clients, help="concurrent clients (default 16)")
    parser.add_argument("--requests", type=int, help="requests in all (default 64; with --soak 1000)")
    parser.add_argument(
        "--max-queue", type=int, default=defaults.max_queue, help="the started server's --max-queue (default 8)"
    )
    parser.add_argument(
        "--time-limit", type=float, help="seconds for the load (default 600, or --duration + 600 where paced)"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="the mix's order and kinds (default 0)")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="max_tokens of valid requests")
    parser.add_argument(
        "--rss-tolerance-mib", type=float, default=defaults.rss_tolerance_mib, help="memory growth allowed (MiB)"
    )
    parser.add_argument(
        "--rss-tolerance-percent",
        type=float,
        default=defaults.rss_tolerance_percent,
        help="memory growth allowed (%% of before); the larger of the two applies",
    )
    parser.add_argument(
        "--warmup-rounds",
        type=int,
        default=defaults.warmup_rounds,
        help="bursts of --clients concurrent requests before memory is first read (default 2; 0: right after "
        "the sequential reference pass)",
    )
    parser.add_argument(
        "--no-final-request", action="store_true", help="read memory right after the drain, without one more request"
    )
    parser.add_argument("--no-conversations", action="store_true", help="leave multi-turn conversations out of the mix")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("COREMATCHING_API_KEY"),
        help="sent as Authorization: Bearer on every request; a started server gets it too "
        "(default: $COREMATCHING_API_KEY)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--soak", action="store_true", help="pace the mix over --duration, sample memory and fds")
    mode.add_argument("--kill", action="store_true", help="SIGKILL the server mid-load and start it again")
    parser.add_argument("--duration", type=float, help="seconds the paced load spans (--soak default 600)")
    parser.add_argument(
        "--sample-interval", type=float, help="--soak: seconds between memory and fd samples (default 60)"
    )
    parser.add_argument(
        "--soak-warmup", type=float, help="--soak: seconds of samples left out of the checks (default 60)"
    )
    parser.add_argument(
        "--rss-growth-percent", type=float, help="--soak: growth allowed over the warm-up's highest sample (default 5)"
    )
    parser.add_argument("--fd-slack", type=int, help="--soak: fds the last sample may add (default 2)")
    parser.add_argument("--kill-after", type=int, help="--kill: requests sent before the kill (default half)")
    parser.add_argument(
        "--client-timeout",
        type=float,
        default=defaults.client_timeout,
        help="--kill: seconds before a request counts as hung (default 120)",
    )
    parser.add_argument("--out-dir", type=Path, default=defaults.out_dir, help="where the results go")
    parser.add_argument("--force", action="store_true", help="overwrite the mode's results")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    command = shown_command(sys.argv[1:] if argv is None else argv)
    stderr = Console(stderr=True)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=stderr, show_time=False, show_path=False)],
    )
    given: dict[str, Any] = {name: getattr(args, name) for name in MODE_SETTINGS if getattr(args, name) is not None}
    stray = [name for name in SOAK_ONLY if name in given and not args.soak]
    if stray:
        print(f"error: --{stray[0].replace('_', '-')} goes with --soak", file=sys.stderr)
        return 2
    try:
        config = LoadConfig(
            mode="soak" if args.soak else "kill" if args.kill else "standard",
            build=args.build,
            url=args.url,
            pid=args.pid,
            clients=args.clients,
            requests=args.requests,
            max_queue=args.max_queue,
            time_limit=args.time_limit,
            seed=args.seed,
            max_tokens=args.max_tokens,
            rss_tolerance_mib=args.rss_tolerance_mib,
            rss_tolerance_percent=args.rss_tolerance_percent,
            final_request=not args.no_final_request,
            warmup_rounds=args.warmup_rounds,
            out_dir=args.out_dir,
            force=args.force,
            api_key=args.api_key or None,
            conversations=not args.no_conversations,
            client_timeout=args.client_timeout,
            **given,
        )
    except LoadConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=False) as bar:
        tasks: dict[str, int] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        try:
            report = run(config, progress)
        except LoadError as e:
            bar.stop()
            print(f"error: {e}", file=sys.stderr)
            return 2

    table = Table(title=f"{config.mode} load test", show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for label, value in report.summary_rows():
        table.add_row(label, value)
    checks = Table(title="checks", show_header=True)
    checks.add_column("check")
    checks.add_column("passed")
    checks.add_column("detail", overflow="fold")
    for name, check in report.checks.items():
        checks.add_row(name, "yes" if check.passed else "[red]no[/red]", check.detail)
    out = Console()
    out.print(table)
    out.print(checks)
    try:
        paths = write_results(report, command)
    except (LoadError, OSError) as e:
        print(f"error: cannot write the results: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(map(str, paths))}; all checks passed: {'yes' if report.passed else 'no'}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
