"""What the token selector and the merge cost in a pruned prefill, measured (docs/benchmarks/selectors.md).

    python scripts/bench_selectors.py [--work builds/bench] [--budget 64] [--repeats 7]

Builds the benchmark preset (`llava-7b-shape`, random weights; the checkpoint `python -m bench` writes)
at one budget with each selector+merge, and times the prefill through `runtime.Pipeline` on the CPU
provider (medians over the repeats after a warm-up, one process, in turn). `random` without a merge
is the floor: its scores are a constant, so its prefill is the pruned model's prefill plus a TopK and
a Gather; every other row's extra milliseconds over it are what its selection and merge cost. The
analytic FLOPs of each (`coreMatching.flops.selection_flops`) are printed beside them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.config import BenchConfig  # noqa: E402
from bench.measure import IMAGE, QUESTION, build_once, random_checkpoint  # noqa: E402

FLOOR = "random+none"
DEFAULT_SETTINGS = "random+none,core-coverage+nearest,max-min+nearest,conditional-dpp+mass,conditional-dpp+nearest"


def prefill_ms(paths: list[Path], repeats: int) -> list[float]:
    """Median prefill milliseconds of each build, the builds taking turns within every repeat (so a drift of the
    machine's speed over the run falls on all of them alike)."""
    from runtime import Pipeline

    pipelines = [Pipeline.load(path, provider="cpu") for path in paths]
    samples: list[list[float]] = [[] for _ in paths]
    for repeat in range(repeats + 1):  # the first round warms up
        for pipeline, mine in zip(pipelines, samples, strict=True):
            answer = pipeline.answer(IMAGE, QUESTION, 2, stop_at_eos=False)
            if repeat:
                mine.append(answer.timings.prefill * 1000)
    return [statistics.median(mine) for mine in samples]


def measured_peak_flops() -> float:
    """The machine's float32 matrix-multiply rate in this process (best of 5 [2048, 2048] products), FLOP/s:
    the physical limit the prefill's FLOPs are set against."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("builds/bench"))
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"SELECTOR+MERGE,... (first: the floor, {FLOOR})")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "selectors.md")
    parser.add_argument("--build-only", action="store_true", help="make the builds and stop (time them later)")
    args = parser.parse_args(argv)
    from transformers import AutoConfig

    from buildformat.geometry import Geometry
    from coreMatching import CoreMatchingConfig
    from coreMatching.flops import prefill_flops, selection_flops

    checkpoint, preset = random_checkpoint(BenchConfig(work=args.work))
    settings = [tuple(s.split("+")) for s in args.settings.split(",")]
    rows = []
    for selector, merge in settings:
        out = args.work / f"{preset.name}-k{args.budget}-{selector}-{merge}"
        print(f"building {selector}+{merge} ...", flush=True)
        wanted = CoreMatchingConfig(token_budget=args.budget, token_selector=selector, token_merge=merge)
        # the default model's builds of every rule are validated by the tests
        path = build_once(out, checkpoint, preset, wanted, validate=False)
        rows.append((selector, merge, path))
    if args.build_only:
        return 0
    peak = measured_peak_flops()
    medians = prefill_ms([path for _, _, path in rows], args.repeats)  # timed after every build, on a quiet machine
    measured = {}
    for (selector, merge, _), ms in zip(rows, medians, strict=True):
        measured[(selector, merge)] = ms
        print(f"{selector}+{merge}: prefill {ms:.1f} ms", flush=True)
    geometry = Geometry.from_hf_config(AutoConfig.from_pretrained(checkpoint))
    floor = measured[settings[0]]
    prompt = 623
    lines = [
        "# What the token selector and the merge cost in a pruned prefill",
        "",
        f"`{preset.name}` (random weights), k = {args.budget} of 576, a {prompt}-token prompt, ONNX Runtime CPU "
        f"provider on 2 cores. Prefill medians of {args.repeats} after a warm-up round, one process, the builds "
        f"taking turns within every round. `{FLOOR}` is the floor: its scores are a constant, so the other "
        "rows' extra time over it is their selection and merge. The physical limit beside each: its FLOPs at the "
        f"machine's float32 matrix-multiply rate measured in the same run ({peak / 1e9:.0f} GFLOP/s, best of five "
        "[2048, 2048] products). llama.cpp has no token selection; its prefill of the same model and prompt (no "
        "pruning) is in [llama-cpp.md](llama-cpp.md), from another run. Generated by:",
        "",
        f"    python scripts/bench_selectors.py --budget {args.budget} --repeats {args.repeats}",
        "",
        "| selector | merge | prefill (ms) | prefill FLOPs / peak (ms) | over the floor (ms) | share of the prefill | "
        "selection + merge (GFLOPs) | their FLOPs / peak (ms) | share of the prefill FLOPs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for selector, merge in settings:
        ms = measured[(selector, merge)]
        budgets = CoreMatchingConfig(token_budget=args.budget, token_selector=selector, token_merge=merge).resolve(
            num_layers=preset.num_hidden_layers, intermediate_size=preset.intermediate_size, num_image_tokens=576
        )
        sel = selection_flops(geometry, prompt, budgets)
        total = prefill_flops(geometry, prompt, budgets)
        lines.append(
            f"| {selector} | {merge} | {ms:.1f} | {1000 * total / peak:.1f} | {ms - floor:+.1f} | "
            f"{100 * (ms - floor) / ms:+.1f}% | {sel / 1e9:.2f} | {1000 * sel / peak:.1f} | {100 * sel / total:.2f}% |"
        )
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
