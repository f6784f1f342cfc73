"""A follow-up question about another object of the same image: in a two-turn conversation and alone.

    python scripts/followup.py                       # embedded model, 500 conversations of the shapes test split

Writes results.json (every conversation and the summaries) and README.md (the tables) to --out-dir
(docs/evaluation/followup by default). See evaluation/followup.py for what is asked and measured.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from coreMatching.errors import ConfigError
from evaluation.followup import OUTPUTS, FollowupConfig


def main(argv: list[str] | None = None) -> int:
    defaults = FollowupConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="llava-hf directory (default: the embedded model)")
    parser.add_argument("--split", default=defaults.split, help=f"shapes split (default {defaults.split})")
    parser.add_argument("--count", type=int, default=defaults.count, help=f"conversations (default {defaults.count})")
    parser.add_argument(
        "--budget", type=int, default=defaults.budget, help=f"image tokens the pruned setting keeps ({defaults.budget})"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the follow-up questions (default 0)")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine more threads than free cores run far slower)",
    )
    parser.add_argument("--out-dir", type=Path, default=Path("docs/evaluation/followup"))
    parser.add_argument("--force", action="store_true", help="replace existing outputs in --out-dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    existing = [args.out_dir / name for name in OUTPUTS if (args.out_dir / name).exists()]
    if existing and not args.force:
        print(f"error: {existing[0]} exists; pass --force to replace the outputs in {args.out_dir}", file=sys.stderr)
        return 2
    try:
        config = FollowupConfig(
            split=args.split,
            count=args.count,
            seed=args.seed,
            budget=args.budget,
            max_new_tokens=args.max_new_tokens,
            model_dir=args.model,
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.threads < 1:
        print(f"error: --threads must be at least 1, got {args.threads}", file=sys.stderr)
        return 2

    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from transformers.utils import logging as hf_logging

    from evaluation.followup import run_followup, write_report
    from models import ModelLoadError
    from vqadata.shapes import DatasetError

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # the one bar is ours
    columns = (TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns) as bar:
        task = bar.add_task("conversations", total=config.count)
        try:
            report = run_followup(config, lambda done: bar.update(task, completed=done))
        except (ModelLoadError, DatasetError, ConfigError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    command = "python scripts/followup.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    paths = write_report(report, args.out_dir, command.strip())
    for s in report.settings:
        r = s.overall
        stale = "" if r.stale is None else f"  Q1's kept tokens {100 * (r.stale.accuracy or 0):5.1f}%"
        print(
            f"{s.setting:<26} Q2 in conversation {100 * (r.followup.accuracy or 0):5.1f}%  "
            f"alone {100 * (r.alone.accuracy or 0):5.1f}%{stale}"
        )
    if report.coverage is not None:
        c = report.coverage.mean
        print(
            f"Q2's object patches kept: selection on Q2 {100 * c.second_by_followup:.1f}%, "
            f"on Q1 {100 * c.second_by_first:.1f}% (chance {100 * report.coverage.chance:.1f}%)"
        )
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
