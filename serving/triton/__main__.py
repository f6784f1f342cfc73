"""`python -m serving.triton BUILD --out REPO`: write a Triton model repository (torch-free)."""

from __future__ import annotations

import logging
import sys

from serving.triton.cli import build_parser, run_triton


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    return run_triton(args)


if __name__ == "__main__":
    sys.exit(main())
