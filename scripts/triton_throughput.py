"""Throughput of a build on a local Triton server with 1 and 2 instances (docs/serving/triton.md).

    python scripts/triton_throughput.py --triton-python .venv-triton/bin/python [--build builds/default]

Needs an environment with the triton extra (pip install -e ".[ort,triton]"; nvidia-pytriton pins numpy < 2).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.triton.throughput import ThroughputConfig, ThroughputError, measure, render
from serving.triton.local import TritonUnavailable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, default=Path("builds/default"))
    parser.add_argument("--triton-python", type=Path, default=os.environ.get("COREMATCHING_TRITON_PYTHON"))
    parser.add_argument("--instances", default="1,2", help="instance counts, comma separated (default 1,2)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("docs/serving/triton.md"))
    parser.add_argument("--force", action="store_true", help="overwrite --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.triton_python is None:
            raise ThroughputError("--triton-python is required (or COREMATCHING_TRITON_PYTHON)")
        if args.out.exists() and not args.force:
            raise ThroughputError(f"{args.out} already exists; pass --force to overwrite it")
        config = ThroughputConfig(
            build=args.build,
            triton_python=args.triton_python,
            instances=tuple(int(n) for n in args.instances.split(",")),
            requests=args.requests,
            concurrency=args.concurrency,
            max_tokens=args.max_tokens,
        )
        rows = measure(config)
    except (ThroughputError, TritonUnavailable, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = "python scripts/triton_throughput.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(render(config, rows, command.strip()))
    tmp.replace(args.out)
    for row in rows:
        print(
            f"{row['instances']} instance(s): {row['answers_per_second']:.2f} answers/s, p50 {row['latency_p50']:.3f} s"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
