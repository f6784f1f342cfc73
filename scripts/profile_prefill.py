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
from runtime.ort_backend import OrtBackend


def profile(build: Path, tokens: int, runs: int) -> dict[str, float]:
    """Mean milliseconds per prefill of each operator type, over every graph a prefill runs (the stacks, the
    selection, the neurons graph): the backend's sessions are remade with ONNX Runtime's profiler on."""
    manifest = buildformat.read(build)
    backend = OrtBackend(build, manifest, provider="cpu")
    folder = Path(tempfile.mkdtemp())
    for name in manifest.graph_names:
        options = backend._weights.options(name)
        options.enable_profiling = True
        options.profile_file_prefix = str(folder / name)
        path = str(build / manifest.graph(name).file)
        backend.sessions[name] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    m = manifest.model
    ids = rng.integers(3, m.vocab_size - 2, (1, tokens), dtype=np.int64)
    ids[0, 5 : 5 + m.num_image_tokens] = m.image_token_id
    backend.vision(rng.standard_normal((1, 3, m.image_size, m.image_size), dtype=np.float32))
    for _ in range(runs):
        backend.prefill(ids, 5, tokens + 1)
    by_op: collections.Counter[str] = collections.Counter()
    for name in manifest.graph_names:
        events = json.loads(Path(backend.sessions[name].end_profiling()).read_text())
        for event in events:
            node = event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
            if node and name != "vision":  # the prefill only
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
