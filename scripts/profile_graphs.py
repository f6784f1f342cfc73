"""Where a build's prefill or decode step spends its time, by ONNX operator type (ONNX Runtime's profiler, CPU).

    python scripts/profile_graphs.py builds/bench/llava-7b-shape-dense builds/bench/llava-7b-shape-k64
    python scripts/profile_graphs.py --phase decode --steps 16 BUILD ...

Prints, per build, the mean milliseconds per prefill (or per decode step) of the most expensive operator
types over every graph the phase runs, and the nodes run per prefill or step, for a 623-token prompt
(576 image tokens), the shape the benchmark uses. The profiler adds its own overhead to every node.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import buildformat
from runtime.ort_backend import OrtBackend


@dataclass(frozen=True)
class Profile:
    ms_by_op: dict[str, float]  # operator type -> mean milliseconds per prefill or step
    nodes: float  # nodes run per prefill or step

    @property
    def total_ms(self) -> float:
        return sum(self.ms_by_op.values())


def profile(build: Path, tokens: int, runs: int, phase: str, accuracy_level: int = 1, fused: bool = True) -> Profile:
    """The backend's sessions remade with ONNX Runtime's profiler on; `runs` prefills, or one prefill and
    `runs` decode steps (the events of each session's first run, its prefill, are then left out)."""
    manifest = buildformat.read(build)
    backend = OrtBackend(build, manifest, provider="cpu", accuracy_level=accuracy_level, fused=fused)
    folder = Path(tempfile.mkdtemp())
    for name, graph in backend.graphs.items():
        options = backend._weights.options(graph.file)
        options.enable_profiling = True
        options.profile_file_prefix = str(folder / name)
        path = str(build / graph.file)
        backend.sessions[name] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    m = manifest.model
    ids = rng.integers(3, m.vocab_size - 2, (1, tokens), dtype=np.int64)
    ids[0, 5 : 5 + m.num_image_tokens] = m.image_token_id
    backend.vision(rng.standard_normal((1, 3, m.image_size, m.image_size), dtype=np.float32))
    for _ in range(runs if phase == "prefill" else 1):
        backend.prefill(ids, 5, tokens + runs + 1)
    if phase == "decode":
        for _ in range(runs):
            backend.decode(int(rng.integers(3, m.vocab_size - 2)))
    by_op: collections.Counter[str] = collections.Counter()
    nodes = 0
    for name in manifest.graph_names:
        if name == "vision":
            continue
        events = json.loads(Path(backend.sessions[name].end_profiling()).read_text())
        model_runs = sorted((e for e in events if e["name"] == "model_run"), key=lambda e: e["ts"])
        if not model_runs:
            continue
        after = model_runs[0]["ts"] + model_runs[0]["dur"] if phase == "decode" else -1
        for event in events:
            node = event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
            if node and event["ts"] > after:
                by_op[event["args"]["op_name"]] += event["dur"]
                nodes += 1
    return Profile({op: us / runs / 1000 for op, us in by_op.most_common()}, nodes / runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("builds", nargs="+", type=Path)
    parser.add_argument("--phase", choices=("prefill", "decode"), default="prefill")
    parser.add_argument("--tokens", type=int, default=623, help="prompt tokens (default 623)")
    parser.add_argument("--runs", type=int, default=3, help="prefills, or decode steps (default 3)")
    parser.add_argument("--top", type=int, default=12, help="operator types listed (default 12)")
    parser.add_argument("--portable", action="store_true", help="the stacks' portable form (as TensorRT reads)")
    parser.add_argument("--accuracy-level", type=int, default=1, help="MatMulNBits' (quantized builds; default 1)")
    args = parser.parse_args()
    for build in args.builds:
        p = profile(build, args.tokens, args.runs, args.phase, args.accuracy_level, not args.portable)
        top = ", ".join(f"{op} {ms:.2f}" for op, ms in list(p.ms_by_op.items())[: args.top])
        form = "portable" if args.portable else "fused where built"
        print(f"{build.name} {args.phase} ({form}): {p.total_ms:.1f} ms per run, {p.nodes:.0f} nodes; {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
