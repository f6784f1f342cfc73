"""`python -m planner`: the memory plan of a deployment (torch-free; see planner/cli.py)."""

from __future__ import annotations

import sys

from planner.cli import build_parser, run_plan


def main(argv: list[str] | None = None) -> int:
    return run_plan(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
