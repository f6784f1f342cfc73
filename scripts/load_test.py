"""Load-test the local server: concurrent clients, good and bad requests, memory before and after.

    python scripts/load_test.py [--clients 16] [--requests 64] [--max-queue 8] [--out-dir docs/serving] [--force]
    python scripts/load_test.py --url http://127.0.0.1:8000 --pid PID      # a server already running here

Starts `python -m serving` for --build on a free port (unless --url), answers each distinct question
alone for reference, then sends the mix from --clients clients and checks the answers, the refusals, the
drain, the server's health and its resident memory (bench/load/). Writes load.json and load.md.
Exit status: 0 every check passed, 1 a check failed, 2 the run could not be made.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.load import LoadConfig, LoadConfigError, LoadError, figure_rows, run_load, write_results


def parse(argv: list[str] | None) -> argparse.Namespace:
    defaults = LoadConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, default=defaults.build, help="build to serve (default builds/default)")
    parser.add_argument("--url", help="a server already running on this machine (http://127.0.0.1:PORT)")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id (its memory is read)")
    parser.add_argument("--clients", type=int, default=defaults.clients, help="concurrent clients (default 16)")
    parser.add_argument("--requests", type=int, default=defaults.requests, help="requests in all (default 64)")
    parser.add_argument(
        "--max-queue", type=int, default=defaults.max_queue, help="the started server's --max-queue (default 8)"
    )
    parser.add_argument(
        "--time-limit", type=float, default=defaults.time_limit, help="seconds for the load (default 600)"
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
    parser.add_argument("--out-dir", type=Path, default=defaults.out_dir, help="where load.json and load.md go")
    parser.add_argument("--force", action="store_true", help="overwrite load.json and load.md")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    command = shlex.join(["python", "scripts/load_test.py", *(sys.argv[1:] if argv is None else argv)])
    stderr = Console(stderr=True)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=stderr, show_time=False, show_path=False)],
    )
    try:
        config = LoadConfig(
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
            report = run_load(config, progress)
        except LoadError as e:
            bar.stop()
            print(f"error: {e}", file=sys.stderr)
            return 2

    table = Table(title="load test", show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for label, value in figure_rows(report):
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
