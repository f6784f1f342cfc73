"""Weight precisions side by side on the llava-7b-shape benchmark model (docs/benchmarks/precisions.md).

    python scripts/bench_precisions.py [--weights fp32,fp16,int8,int4] [--neurons per-request,static]
        [--before docs/benchmarks/precisions-format3.json] [--repeats 5]

Builds CoreMatching at k = 64 with each weight precision, with core neurons per request and with a static
neuron set (reused from --work when already built), answers through the runtime on the ONNX Runtime CPU
provider, and writes docs/benchmarks/precisions.{json,md}; --before sets an earlier report's figures beside.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    from bench.precisions import PrecisionBenchConfig, run_precision_bench

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llava-7b-shape")
    parser.add_argument("--weights", default="fp32,fp16,int8,int4")
    parser.add_argument("--neurons", default="per-request,static")
    parser.add_argument("--before", type=Path, default=None, help="an earlier precisions.json to set beside")
    parser.add_argument("--block-size", type=int, default=32, help="int4's block (default 32)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--work", type=Path, default=Path("builds/bench-precision"))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = PrecisionBenchConfig(
        preset=args.preset,
        weights=tuple(args.weights.split(",")),
        neurons=tuple(args.neurons.split(",")),
        before=args.before,
        block_size=args.block_size,
        repeats=args.repeats,
        new_tokens=args.new_tokens,
        work=args.work,
        out=args.out,
    )
    report = run_precision_bench(config)
    for row in report.rows:
        print(
            f"{row.weights} {row.neurons}: decode step {row.decode_step_ms:.2f} ms, "
            f"{row.decode_weight_bytes / 2**20:.1f} MiB read"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
