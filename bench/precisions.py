"""Weight precisions side by side: one CoreMatching budget built at fp32, fp16, int8 and int4 weights, each
answered by the runtime on the ONNX Runtime CPU provider in one run (`scripts/bench_precisions.py`).

Per build: the decode step's median time (medians over repeats, after a warm-up), prefill, the peak
resident memory of a fresh process that answers once, the weights file, and the weight bytes one decode
step reads (the decode graph's initializers plus the compacted FFN it takes per request). Ratios are
taken against the fp32 and fp16 builds of the same run. The result is a `PrecisionReport`; it writes
`<out>/precisions.json` and `.md`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import buildformat
from bench.config import BenchConfig
from bench.measure import measure_onnxruntime, random_checkpoint
from bench.records import Machine, Measurement
from buildformat import Manifest
from buildformat.names import is_ffn
from coreMatching.config import CoreMatchingConfig

log = logging.getLogger(__name__)

ITEMSIZE = {"float32": 4, "float16": 2, "int8": 1, "uint8": 1, "int64": 8, "int32": 4}
BASES = ("fp32", "fp16")  # the builds every row is set against, where the run has them


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
        if is_ffn(spec.name):
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


@dataclass(frozen=True)
class PrecisionRow:
    """One weight precision's build, measured. The ratios against a base are None where the run has no build
    at that base (and then absent from the JSON)."""

    weights: str  # as built: fp32, fp16, int8 or int4
    activations: str  # the manifest's precision: float32 or float16
    validated: bool  # the build passed its validation (fp16 is measured unvalidated)
    decode_step_ms: float  # medians over the repeats
    prefill_ms: float
    end_to_end_ms: float
    peak_memory_bytes: int  # of a fresh process that answers once
    weights_file_bytes: int  # weights.bin
    decode_weight_bytes: int  # read by one decode step (`decode_weight_bytes`)
    decode_step_samples_ms: tuple[float, ...]  # every repeat's median decode step
    decode_speedup_vs_fp32: float | None = None  # fp32's decode step / this one
    decode_bytes_vs_fp32: float | None = None  # this step's weight bytes / fp32's
    decode_speedup_vs_fp16: float | None = None
    decode_bytes_vs_fp16: float | None = None

    def __post_init__(self) -> None:
        if self.decode_step_ms <= 0 or self.prefill_ms <= 0 or self.end_to_end_ms <= 0:
            raise ValueError(f"{self.weights}: times must be positive")
        if not isinstance(self.validated, bool):
            raise ValueError(f"{self.weights}: validated must be a bool, got {self.validated!r}")
        for base in BASES:
            pair = (getattr(self, f"decode_speedup_vs_{base}"), getattr(self, f"decode_bytes_vs_{base}"))
            if (pair[0] is None) != (pair[1] is None):
                raise ValueError(f"{self.weights}: the speedup and the bytes against {base} come together")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PrecisionRow:
        return cls(**{**data, "decode_step_samples_ms": tuple(data["decode_step_samples_ms"])})

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        out["decode_step_samples_ms"] = list(self.decode_step_samples_ms)
        return out


@dataclass(frozen=True)
class PrecisionReport:
    """One run of `scripts/bench_precisions.py`: precisions.json, and what precisions.md is rendered from."""

    preset: str
    token_budget: int
    block_size: int
    repeats: int
    new_tokens: int
    machine: Machine
    rows: tuple[PrecisionRow, ...]

    def __post_init__(self) -> None:
        weights = [row.weights for row in self.rows]
        if not weights or len(set(weights)) != len(weights):
            raise ValueError(f"PrecisionReport.rows must name each weight precision once, got {weights}")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PrecisionReport:
        return cls(
            **{
                **data,
                "machine": Machine.from_json(data["machine"]),
                "rows": tuple(PrecisionRow.from_json(row) for row in data["rows"]),
            }
        )

    def to_json(self) -> dict[str, Any]:
        return {
            **{f.name: getattr(self, f.name) for f in fields(self)},
            "machine": self.machine.to_json(),
            "rows": [row.to_json() for row in self.rows],
        }


@dataclass(frozen=True)
class _Measured:
    """A build and its measurement, before the ratios against the bases can be taken."""

    weights: str
    build: Path
    manifest: Manifest
    measurement: Measurement

    @property
    def decode_weight_bytes(self) -> int:
        return decode_weight_bytes(self.build, self.manifest)


def _passed(manifest: Manifest) -> bool:
    """Whether the build passed its validation (False where it failed, or was built without one)."""
    return manifest.validation is not None and manifest.validation.passed is True


def _row(measured: _Measured, bases: Mapping[str, _Measured]) -> PrecisionRow:
    m, step_ms, step_bytes = measured.measurement, measured.measurement.decode_step * 1e3, measured.decode_weight_bytes
    assert m.peak_memory_bytes is not None and m.samples is not None  # measure_onnxruntime fills both
    ratios: dict[str, float] = {}
    for name, base in bases.items():
        ratios[f"decode_speedup_vs_{name}"] = base.measurement.decode_step * 1e3 / step_ms
        ratios[f"decode_bytes_vs_{name}"] = step_bytes / base.decode_weight_bytes
    return PrecisionRow(
        weights=measured.weights,
        activations=measured.manifest.precision,
        validated=_passed(measured.manifest),
        decode_step_ms=step_ms,
        prefill_ms=m.prefill * 1e3,
        end_to_end_ms=m.end_to_end * 1e3,
        peak_memory_bytes=m.peak_memory_bytes,
        weights_file_bytes=(measured.build / "weights.bin").stat().st_size,
        decode_weight_bytes=step_bytes,
        decode_step_samples_ms=tuple(sample * 1e3 for sample in m.samples.decode_step),
        **ratios,
    )


def run_precision_bench(config: PrecisionBenchConfig) -> PrecisionReport:
    checkpoint, _ = random_checkpoint(config.bench)
    measured = []
    for weights in config.weights:
        log.info("building %s", weights)
        build = _build(config, checkpoint, weights)
        log.info("measuring %s", weights)
        m = measure_onnxruntime(build, weights, config.bench)
        measured.append(_Measured(weights, build, buildformat.read(build), m))
    bases = {base: next(x for x in measured if x.weights == base) for base in BASES if base in config.weights}
    report = PrecisionReport(
        preset=config.preset,
        token_budget=config.token_budget,
        block_size=config.block_size,
        repeats=config.repeats,
        new_tokens=config.new_tokens,
        machine=Machine.this_host(),
        rows=tuple(_row(x, bases) for x in measured),
    )
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "precisions.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    (config.out / "precisions.md").write_text(markdown(report))
    return report


def _ratio(value: float | None) -> float:
    return float("nan") if value is None else value


def markdown(report: PrecisionReport) -> str:
    mib = 2**20
    lines = [
        "# Weight precisions side by side (ONNX Runtime, CPU)",
        "",
        f"`{report.preset}`, CoreMatching at k = {report.token_budget}, int4 blocks of "
        f"{report.block_size}; medians of {report.repeats} repeats after a warm-up, {report.new_tokens} "
        f"tokens per answer, one run. Generated by `python scripts/bench_precisions.py`.",
        "",
        "| weights | activations | validated | decode step (ms) | vs fp32 | vs fp16 | decode weight bytes (MiB) "
        "| vs fp16 | prefill (ms) | peak RSS (MiB) | weights.bin (MiB) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report.rows:
        lines.append(
            f"| {r.weights} | {r.activations} | {'yes' if r.validated else 'no'} | "
            f"{r.decode_step_ms:.2f} | {_ratio(r.decode_speedup_vs_fp32):.2f}x | "
            f"{_ratio(r.decode_speedup_vs_fp16):.2f}x | {r.decode_weight_bytes / mib:.1f} | "
            f"{_ratio(r.decode_bytes_vs_fp16):.2f} | {r.prefill_ms:.0f} | "
            f"{r.peak_memory_bytes / mib:.0f} | {r.weights_file_bytes / mib:.1f} |"
        )
    m = report.machine
    lines += [
        "",
        f"Machine: {m.cpu}, {m.cores} cores, onnxruntime {m.versions.onnxruntime}.",
        "",
    ]
    return "\n".join(lines)
