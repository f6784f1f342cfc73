"""Where a build's prefill spends its time, by ONNX operator type (ONNX Runtime's profiler, CPU).

    python scripts/profile_prefill.py builds/bench/llava-7b-shape-dense builds/bench/llava-7b-shape-k64

Prints, per build, the mean milliseconds per run of the ten most expensive operator types,
for a 623-token prompt (576 image tokens), the shape the benchmark uses.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import buildformat
from buildformat.names import IMAGE_START, INPUTS_EMBEDS
from runtime.ort_backend import SharedWeights


def profile(build: Path, tokens: int, runs: int) -> dict[str, float]:
    manifest = buildformat.read(build)
    weights = SharedWeights(build, manifest, ort)
    options = weights.options("prefill")
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "prefill")
    session = ort.InferenceSession(str(build / "prefill.onnx"), options, providers=["CPUExecutionProvider"])
    feeds = {
        INPUTS_EMBEDS: np.random.default_rng(0).standard_normal(
            (1, tokens, manifest.model.hidden_size), dtype=np.float32
        )
    }
    if IMAGE_START in [i.name for i in session.get_inputs()]:
        feeds[IMAGE_START] = np.array([5], dtype=np.int64)
    for _ in range(runs):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    by_op: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
    return {op: us / runs / 1000 for op, us in by_op.most_common()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("builds", nargs="+", type=Path)
    parser.add_argument("--tokens", type=int, default=623)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for build in args.builds:
        ops = profile(build, args.tokens, args.runs)
        top = ", ".join(f"{op} {ms:.1f}" for op, ms in list(ops.items())[:10])
        print(f"{build.name}: {sum(ops.values()):.1f} ms per run; {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
