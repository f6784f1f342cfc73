"""Two runs of `python -m bench` side by side: the ONNX Runtime rows both measured, before and after.

    python scripts/compare_bench.py BEFORE/bench.json AFTER/bench.json [--bandwidth-gbs 20.6]

Prints a markdown table of each configuration's prefill, decode step, end to end and peak memory in both
runs, with after / before; with a measured memory bandwidth, the decode step's physical limit beside them
(the bytes a step reads / the bandwidth). Compare runs made on the same machine in one session: absolute times move
between machines, ratios in one run hold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.records import BenchReport


def table(before: BenchReport, after: BenchReport, bandwidth: float | None = None) -> str:
    old = {row.name: row.measurement for row in before.rows if row.measurement.engine == "onnxruntime"}
    lines = [
        "| configuration | prefill ms before | after | after / before | decode step ms before | after "
        "| after / before | end to end ms before | after | peak memory MiB before | after |"
        + (" decode limit ms (bytes / bandwidth) |" if bandwidth else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if bandwidth else ""),
    ]
    for row in after.rows:
        new, was = row.measurement, old.get(row.name)
        if was is None or new.engine != "onnxruntime":
            continue
        mib = 2**20
        peak = [m.peak_memory_bytes for m in (was, new)]
        lines.append(
            f"| {row.name} | {was.prefill * 1e3:.1f} | {new.prefill * 1e3:.1f} | {new.prefill / was.prefill:.2f} | "
            f"{was.decode_step * 1e3:.2f} | {new.decode_step * 1e3:.2f} | {new.decode_step / was.decode_step:.2f} | "
            f"{was.end_to_end * 1e3:.1f} | {new.end_to_end * 1e3:.1f} | "
            + " | ".join("-" if p is None else f"{p / mib:.0f}" for p in peak)
            + " |"
            + (f" {new.decode_bytes / (bandwidth * 1e9) * 1e3:.2f} |" if bandwidth else "")
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="measured memory bandwidth, GB/s")
    args = parser.parse_args()
    reports = [BenchReport.from_json(json.loads(path.read_text())) for path in (args.before, args.after)]
    print(table(*reports, args.bandwidth_gbs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
