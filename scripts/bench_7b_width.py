"""The 7B geometry built end to end on a CPU: llava-1.5-7b's widths, vocabulary and CLIP-L/336 tower with
4 decoder layers (`llava-7b-width`, random weights), built dense and CoreMatching at fp16 and int4,
validated, answered by the runtime, and its measured peak memory set against the planner's figure for
the same configuration (docs/benchmarks/7b-width.md).

    python scripts/bench_7b_width.py [--work builds/7b-width] [--builds cm-int4-static,cm-fp16,dense-fp16]

Each build takes minutes and ~20 GB of memory at its peak on a 2-core machine; builds already in --work
are reused. The measured memory is the peak resident set (VmHWM) of a fresh process that loads the build
and answers one question with the ONNX Runtime CPU provider.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PRESET = "llava-7b-width"
IMAGE = REPO / "examples" / "shapes_red_circle.png"
QUESTION = "What colour is the circle?"
# name -> (dense, weights, fp16, static neurons). int4 takes a static neuron set: the build refuses int4 with
# per-request neurons (no fused kernel for gathered int4 weights).
BUILDS = {
    "cm-int4-static": (False, "int4", True, True),
    "cm-fp16": (False, "fp16", True, False),
    "dense-fp16": (True, "fp16", True, False),
}
CALIBRATION_COUNT = 8  # prompts counted for a static set (each one a 7B-width prefill)
ANSWER = """
import json, sys, time
sys.path.insert(0, {repo!r})
from runtime import Pipeline
start = time.perf_counter()
p = Pipeline.load({build!r}, provider="cpu")
loaded = time.perf_counter() - start
a = p.answer({image!r}, {question!r}, 8, stop_at_eos=False)
hwm = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
kept = None if a.kept_image_tokens is None else len(a.kept_image_tokens)
print(json.dumps({{"load_s": loaded, "tokens": a.token_ids, "kept": kept, "prompt_tokens": a.prompt_tokens,
       "prefill_s": a.timings.prefill, "decode_step_s": sorted(a.timings.decode)[len(a.timings.decode) // 2],
       "peak_bytes": int(hwm) * 1024}}))
"""


def checkpoint(work: Path) -> Path:
    import torch

    from models.default_model import write_checkpoint
    from models.presets import from_name

    path = work / "checkpoint"
    if not (path / "config.json").exists():
        write_checkpoint(path, from_name(PRESET), seed=0, dtype=torch.float16)
    return path


def build(work: Path, ckpt: Path, name: str) -> tuple[Path, float | None]:
    import buildformat

    out = work / name
    try:
        buildformat.read(out)
        return out, None
    except buildformat.ManifestError:
        pass
    dense, weights, fp16, static = BUILDS[name]
    argv = [sys.executable, "-m", "export", "build", "--model", str(ckpt), "--out", str(out), "--force"]
    argv += ["--weights", weights] + (["--fp16"] if fp16 else []) + (["--dense"] if dense else [])
    argv += ["--static-neurons", "--calibration-count", str(CALIBRATION_COUNT)] if static else []
    start = time.perf_counter()
    subprocess.run(argv, cwd=REPO, check=True)
    return out, time.perf_counter() - start


def answer(out: Path) -> dict:
    code = ANSWER.format(repo=str(REPO), build=str(out), image=str(IMAGE), question=QUESTION)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def predicted(manifest, prompt_tokens: int) -> dict:
    """The planner's figures (bytes) for the build's configuration and prompt, on the CPU pseudo-device."""
    from dataclasses import asdict

    from planner.plan import plan_manifest

    estimate = plan_manifest(manifest, model=PRESET, max_sequence=manifest.max_sequence, prompt_tokens=prompt_tokens)
    return asdict(estimate)


def main(argv: list[str] | None = None) -> int:
    import buildformat

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "builds" / "7b-width")
    parser.add_argument("--builds", default=",".join(BUILDS))
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    args = parser.parse_args(argv)
    names = args.builds.split(",")
    unknown = [n for n in names if n not in BUILDS]
    if unknown:
        print(f"error: unknown build {unknown[0]!r}; use some of {', '.join(BUILDS)}", file=sys.stderr)
        return 2
    ckpt = checkpoint(args.work)
    rows = []
    for name in names:
        out, seconds = build(args.work, ckpt, name)
        manifest = buildformat.read(out)
        measured = answer(out)
        plan = predicted(manifest, measured["prompt_tokens"])
        rows.append(
            {
                "build": name,
                "build_seconds": seconds if seconds is not None else manifest.build_seconds,
                "validated": manifest.validation is not None and manifest.validation.passed is True,
                "weights_file_bytes": (out / "weights.bin").stat().st_size,
                "measured": measured,
                "planned": plan,
                "peak_vs_plan": measured["peak_bytes"] / plan["total"],
            }
        )
        print(f"{name}: peak {measured['peak_bytes'] / 2**30:.2f} GiB, planned {plan['total'] / 2**30:.2f} GiB")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "7b-width.json").write_text(json.dumps({"preset": PRESET, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
