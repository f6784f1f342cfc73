"""Weight precisions side by side: one CoreMatching budget built at fp32, fp16, int8 and int4 weights, each
answered by the runtime on the ONNX Runtime CPU provider in one run (`scripts/bench_precisions.py`).

Per build: the decode step's median time (medians over repeats, after a warm-up), prefill, the peak
resident memory of a fresh process that answers once, the weights file, and the weight bytes one decode
step reads (the decode graph's initializers plus the compacted FFN it takes per request). Ratios are
taken against the fp32 and fp16 builds of the same run. Writes `<out>/precisions.json` and `.md`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import buildformat
from buildformat import Manifest
from coreMatching.config import CoreMatchingConfig
from export.bench import BenchConfig, _checkpoint, _ort, machine

log = logging.getLogger(__name__)

ITEMSIZE = {"float32": 4, "float16": 2, "int8": 1, "uint8": 1, "int64": 8, "int32": 4}


@dataclass(frozen=True)
class PrecisionBenchConfig:
    preset: str = "llava-7b-shape"
    weights: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")
    token_budget: int = 64
    block_size: int = 16  # llava-7b-shape's FFN width 2064 is a multiple of 16, not of 32
    repeats: int = 5
    new_tokens: int = 16
    work: Path = Path("builds/bench-precision")
    out: Path = Path("docs/benchmarks")

    @property
    def bench(self) -> BenchConfig:
        """The shared benchmark's settings, for its checkpoint and its measurement of one build."""
        return BenchConfig(preset=self.preset, repeats=self.repeats, new_tokens=self.new_tokens, work=self.work)


def decode_weight_bytes(build: Path, manifest: Manifest) -> int:
    """What one decode step reads of weights: the decode graph's stored initializers (int4 at half a byte)
    and the compacted FFN inputs of the request (floats, or their stored integers and scales)."""
    total = 0
    assert manifest.weights is not None
    for entry in manifest.weights.graphs["decode.onnx"].values():
        count = math.prod(entry.shape)
        total += count // 2 if entry.dtype == "int4" else count * ITEMSIZE[entry.dtype]
    for spec in manifest.graph("decode").inputs:
        if spec.name.startswith("ffn."):
            total += math.prod(int(s) for s in spec.shape) * ITEMSIZE[spec.dtype]
    return total


def _build(config: PrecisionBenchConfig, checkpoint: Path, weights: str) -> Path:
    from export.build import build
    from export.config import ExportConfig

    out = config.work / f"cm{config.token_budget}-{weights}"
    try:
        made = buildformat.read(out)
        quant = made.quantization.weights if made.quantization else ("fp16" if made.precision == "float16" else "fp32")
        if quant == weights:
            return out
    except buildformat.ManifestError:
        pass
    build(
        ExportConfig(
            out=out,
            model_dir=checkpoint,
            corematching=CoreMatchingConfig(token_budget=config.token_budget),
            fp16=weights == "fp16",
            weights=weights,
            block_size=config.block_size,
            force=True,
            # fp16 at these widths misses the fp16 validation criteria (docs/benchmarks/7b-width.md): the
            # speed is measured on the unvalidated build and the table says so.
            validate=weights != "fp16",
            max_prompt_tokens=1024,
            max_sequence=2048,
        )
    )
    return out


def run_precision_bench(config: PrecisionBenchConfig) -> dict[str, Any]:
    checkpoint, _ = _checkpoint(config.bench)
    rows = []
    for weights in config.weights:
        log.info("building %s", weights)
        build = _build(config, checkpoint, weights)
        manifest = buildformat.read(build)
        log.info("measuring %s", weights)
        m = _ort(build, weights, config.bench)
        rows.append(
            {
                "weights": weights,
                "activations": manifest.precision,
                "validated": bool((manifest.validation or {}).get("passed")),
                "decode_step_ms": m.decode_step * 1e3,
                "prefill_ms": m.prefill * 1e3,
                "end_to_end_ms": m.end_to_end * 1e3,
                "peak_memory_bytes": m.peak_memory_bytes,
                "weights_file_bytes": (build / "weights.bin").stat().st_size,
                "decode_weight_bytes": decode_weight_bytes(build, manifest),
                "decode_step_samples_ms": [s * 1e3 for s in m.samples["decode_step"]],
            }
        )
    by = {row["weights"]: row for row in rows}
    for row in rows:
        for base in ("fp32", "fp16"):
            if base in by:
                row[f"decode_speedup_vs_{base}"] = by[base]["decode_step_ms"] / row["decode_step_ms"]
                row[f"decode_bytes_vs_{base}"] = row["decode_weight_bytes"] / by[base]["decode_weight_bytes"]
    result = {
        "preset": config.preset,
        "token_budget": config.token_budget,
        "block_size": config.block_size,
        "repeats": config.repeats,
        "new_tokens": config.new_tokens,
        "machine": machine(),
        "rows": rows,
    }
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "precisions.json").write_text(json.dumps(result, indent=2) + "\n")
    (config.out / "precisions.md").write_text(_markdown(result))
    return result


def _markdown(result: dict[str, Any]) -> str:
    mib = 2**20
    lines = [
        "# Weight precisions side by side (ONNX Runtime, CPU)",
        "",
        f"`{result['preset']}`, CoreMatching at k = {result['token_budget']}, int4 blocks of "
        f"{result['block_size']}; medians of {result['repeats']} repeats after a warm-up, {result['new_tokens']} "
        f"tokens per answer, one run. Generated by `python scripts/bench_precisions.py`.",
        "",
        "| weights | activations | validated | decode step (ms) | vs fp32 | vs fp16 | decode weight bytes (MiB) "
        "| vs fp16 | prefill (ms) | peak RSS (MiB) | weights.bin (MiB) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['weights']} | {r['activations']} | {'yes' if r['validated'] else 'no'} | "
            f"{r['decode_step_ms']:.2f} | {r.get('decode_speedup_vs_fp32', float('nan')):.2f}x | "
            f"{r.get('decode_speedup_vs_fp16', float('nan')):.2f}x | {r['decode_weight_bytes'] / mib:.1f} | "
            f"{r.get('decode_bytes_vs_fp16', float('nan')):.2f} | {r['prefill_ms']:.0f} | "
            f"{r['peak_memory_bytes'] / mib:.0f} | {r['weights_file_bytes'] / mib:.1f} |"
        )
    m = result["machine"]
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, onnxruntime {m['versions']['onnxruntime']}.",
        "",
    ]
    return "\n".join(lines)
