"""Weight precisions side by side: one CoreMatching budget built at fp32, fp16, int8 and int4 weights, with
core neurons per request and with a static neuron set, each answered by the runtime on the ONNX Runtime CPU
provider in one run (`scripts/bench_precisions.py`).

Per build: the decode step's median time (medians over repeats, after a warm-up), prefill, the peak
resident memory of a fresh process that answers once, the weights file, and the weight bytes one decode
step reads (the stacks' initializers plus the compacted FFN bound per request). Ratios are taken against
the fp32 and fp16 per-request builds of the same run. A `before` report (an earlier run, e.g. of an older
build format) is set beside the rows it has. The result is a `PrecisionReport`; it writes
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
from bench.measure import measure_onnxruntime, random_checkpoint, same_geometry
from bench.records import Machine, Measurement
from buildformat import Manifest
from buildformat.names import EMBED_TABLE, STACKS, is_ffn
from coreMatching.config import CoreMatchingConfig
from models.presets import from_name

log = logging.getLogger(__name__)

ITEMSIZE = {"float32": 4, "float16": 2, "int8": 1, "uint8": 1, "int64": 8, "int32": 4}
BASES = ("fp32", "fp16")  # the per-request builds every row is set against, where the run has them
NEURONS = ("per-request", "static")
# Peak resident memory over the weights file that the one-copy layout must stay within (docs/benchmarks).
PEAK_OVER_WEIGHTS = {("int4", "static"): 200 * 2**20, ("fp32", "per-request"): 300 * 2**20}


@dataclass(frozen=True)
class PrecisionBenchConfig:
    preset: str = "llava-7b-shape"
    weights: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")
    neurons: tuple[str, ...] = NEURONS
    token_budget: int = 64
    block_size: int = 32  # llava-7b-shape's FFN width 2048 is a multiple of 32 and 64, as 7B's 11008 is
    repeats: int = 5
    new_tokens: int = 16
    work: Path = Path("builds/bench-precision")
    out: Path = Path("docs/benchmarks")
    before: Path | None = None  # an earlier precisions.json to set beside this run's rows

    def __post_init__(self) -> None:
        unknown = set(self.neurons) - set(NEURONS)
        if unknown:
            raise ValueError(f"neurons must be among {', '.join(NEURONS)}, got {', '.join(sorted(unknown))}")

    @property
    def bench(self) -> BenchConfig:
        """The shared benchmark's settings, for its checkpoint and its measurement of one build."""
        return BenchConfig(preset=self.preset, repeats=self.repeats, new_tokens=self.new_tokens, work=self.work)


def decode_weight_bytes(build: Path, manifest: Manifest) -> int:
    """What one decode step reads of weights: the stacks' stored initializers (int4 at half a byte; of the
    embedding table, one row) and the request's compacted FFN (floats, or their stored integers and scales)."""
    total = 0
    assert manifest.weights is not None
    width = manifest.decode_dims["W"].max if "W" in manifest.decode_dims else 0
    for stack in (name for name in manifest.graph_names if name in STACKS):
        for name, entry in manifest.weights.graphs[f"{stack}.onnx"].items():
            count = math.prod(entry.shape)
            if name == EMBED_TABLE:
                count = entry.shape[1]  # a step gathers one row
            total += count // 2 if entry.dtype == "int4" else count * ITEMSIZE[entry.dtype]
        for spec in manifest.graph(stack).inputs:
            if is_ffn(spec.name):
                total += math.prod(width if s == "W" else int(s) for s in spec.shape) * ITEMSIZE[spec.dtype]
    return total


def _build(config: PrecisionBenchConfig, checkpoint: Path, weights: str, neurons: str) -> Path:
    from export.build import build
    from export.config import ExportConfig
    from export.validate import ValidationError

    static = neurons == "static"
    out = config.work / f"cm{config.token_budget}-{weights}-{neurons}"
    try:
        made = buildformat.read(out)
        quant = made.quantization.weights if made.quantization else ("fp16" if made.precision == "float16" else "fp32")
        block = made.quantization.block_size if made.quantization else None
        current = same_geometry(made, from_name(config.preset)) and block in (None, config.block_size)
        if quant == weights and (made.static_neurons is not None) == static and current:
            return out
    except buildformat.ManifestError:
        pass

    def export_config(validate: bool) -> ExportConfig:
        return ExportConfig(
            out=out,
            model_dir=checkpoint,
            corematching=CoreMatchingConfig(token_budget=config.token_budget),
            fp16=weights == "fp16",
            weights=weights,
            block_size=config.block_size,
            static_neurons=static,
            force=True,
            # fp16 at these widths misses the fp16 validation criteria (docs/benchmarks/7b-width.md): the
            # speed is measured on the unvalidated build and the table says so.
            validate=validate,
            max_prompt_tokens=1024,
            max_sequence=2048,
        )

    try:
        build(export_config(validate=weights != "fp16"))
    except ValidationError as e:
        # Measured all the same, unvalidated: the table says so, and the report next to the build says why.
        log.warning("%s %s: %s; measuring it unvalidated", weights, neurons, e)
        build(export_config(validate=False))
    return out


@dataclass(frozen=True)
class PrecisionRow:
    """One weight precision's build, measured. The ratios against a base are None where the run has no build
    at that base (and then absent from the JSON)."""

    weights: str  # as built: fp32, fp16, int8 or int4
    neurons: str  # per-request or static
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
    # The same configuration in the `before` report: (decode step ms, prefill ms, peak bytes).
    before_decode_step_ms: float | None = None
    before_prefill_ms: float | None = None
    before_peak_memory_bytes: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.weights, self.neurons

    def __post_init__(self) -> None:
        if self.neurons not in NEURONS:
            raise ValueError(f"{self.weights}: neurons must be one of {', '.join(NEURONS)}, got {self.neurons!r}")
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
        # Reports from before static rows were measured hold per-request builds only.
        row = {"neurons": "per-request", **data}
        return cls(**{**row, "decode_step_samples_ms": tuple(data["decode_step_samples_ms"])})

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
        keys = [row.key for row in self.rows]
        if not keys or len(set(keys)) != len(keys):
            raise ValueError(f"PrecisionReport.rows must name each (weights, neurons) once, got {keys}")

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
    neurons: str
    build: Path
    manifest: Manifest
    measurement: Measurement

    @property
    def decode_weight_bytes(self) -> int:
        return decode_weight_bytes(self.build, self.manifest)


def _passed(manifest: Manifest) -> bool:
    """Whether the build passed its validation (False where it failed, or was built without one)."""
    return manifest.validation is not None and manifest.validation.passed is True


def _row(measured: _Measured, bases: Mapping[str, _Measured], before: PrecisionRow | None) -> PrecisionRow:
    m, step_ms, step_bytes = measured.measurement, measured.measurement.decode_step * 1e3, measured.decode_weight_bytes
    assert m.peak_memory_bytes is not None and m.samples is not None  # measure_onnxruntime fills both
    ratios: dict[str, float] = {}
    for name, base in bases.items():
        ratios[f"decode_speedup_vs_{name}"] = base.measurement.decode_step * 1e3 / step_ms
        ratios[f"decode_bytes_vs_{name}"] = step_bytes / base.decode_weight_bytes
    if before is not None:
        ratios |= {
            "before_decode_step_ms": before.decode_step_ms,
            "before_prefill_ms": before.prefill_ms,
            "before_peak_memory_bytes": before.peak_memory_bytes,
        }
    return PrecisionRow(
        weights=measured.weights,
        neurons=measured.neurons,
        activations=measured.manifest.precision,
        validated=_passed(measured.manifest),
        decode_step_ms=step_ms,
        prefill_ms=m.prefill * 1e3,
        end_to_end_ms=m.end_to_end * 1e3,
        peak_memory_bytes=m.peak_memory_bytes,
        weights_file_bytes=(measured.build / "weights.bin").stat().st_size,
        decode_weight_bytes=step_bytes,
        decode_step_samples_ms=tuple(sample * 1e3 for sample in m.samples.decode_step),
        **ratios,  # type: ignore[arg-type]
    )


def run_precision_bench(config: PrecisionBenchConfig) -> PrecisionReport:
    checkpoint, _ = random_checkpoint(config.bench)
    measured = []
    for neurons in config.neurons:
        for weights in config.weights:
            if (weights, neurons) == ("int4", "per-request"):
                log.info("int4 with per-request neurons: refused by the build (no fused kernel), not measured")
                continue
            log.info("building %s, %s neurons", weights, neurons)
            build = _build(config, checkpoint, weights, neurons)
            log.info("measuring %s, %s neurons", weights, neurons)
            m = measure_onnxruntime(build, f"{weights}-{neurons}", config.bench)
            measured.append(_Measured(weights, neurons, build, buildformat.read(build), m))
    per_request = [x for x in measured if x.neurons == "per-request"]
    bases = {base: next(x for x in per_request if x.weights == base) for base in BASES if base in config.weights}
    before: dict[tuple[str, str], PrecisionRow] = {}
    if config.before is not None:
        earlier = PrecisionReport.from_json(json.loads(config.before.read_text()))
        before = {row.key: row for row in earlier.rows}
    report = PrecisionReport(
        preset=config.preset,
        token_budget=config.token_budget,
        block_size=config.block_size,
        repeats=config.repeats,
        new_tokens=config.new_tokens,
        machine=Machine.this_host(),
        rows=tuple(_row(x, bases, before.get((x.weights, x.neurons))) for x in measured),
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
        f'tokens per answer, one run. Generated by `python scripts/bench_precisions.py`. "before": the '
        "same configuration in the earlier report set beside this run (-: none).",
        "",
        "| weights | neurons | activations | validated | decode step (ms) | before | vs fp32 | vs fp16 "
        "| decode weight bytes (MiB) | vs fp16 | prefill (ms) | before | peak RSS (MiB) | before "
        "| weights.bin (MiB) | peak - weights.bin (MiB) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def before(value: float | None, scale: float = 1.0, digits: int = 0) -> str:
        return "-" if value is None else f"{value / scale:.{digits}f}"

    for r in report.rows:
        lines.append(
            f"| {r.weights} | {r.neurons} | {r.activations} | {'yes' if r.validated else 'no'} | "
            f"{r.decode_step_ms:.2f} | {before(r.before_decode_step_ms, digits=2)} | "
            f"{_ratio(r.decode_speedup_vs_fp32):.2f}x | "
            f"{_ratio(r.decode_speedup_vs_fp16):.2f}x | {r.decode_weight_bytes / mib:.1f} | "
            f"{_ratio(r.decode_bytes_vs_fp16):.2f} | {r.prefill_ms:.0f} | {before(r.before_prefill_ms)} | "
            f"{r.peak_memory_bytes / mib:.0f} | {before(r.before_peak_memory_bytes, mib)} | "
            f"{r.weights_file_bytes / mib:.1f} | {(r.peak_memory_bytes - r.weights_file_bytes) / mib:.0f} |"
        )
    rows = {r.key: r for r in report.rows}
    if "int4" in {r.weights for r in report.rows} and ("int4", "per-request") not in rows:
        lines += [
            "",
            "int4 with per-request neurons is not measured: the build refuses it (no fused kernel takes int4 "
            "weights gathered per request; every decode step would dequantize them). int4 runs with a static set.",
        ]
    targets = [(key, limit) for key, limit in PEAK_OVER_WEIGHTS.items() if key in rows]
    if targets:
        lines += ["", "| target | measured | required | met |", "|---|---:|---:|---|"]
        for (weights, neurons), limit in targets:
            r = rows[(weights, neurons)]
            over = r.peak_memory_bytes - r.weights_file_bytes
            met = "yes" if over <= limit else "**no**"
            lines.append(
                f"| {weights} {neurons}: peak RSS <= weights.bin + {limit // mib} MiB | "
                f"{r.peak_memory_bytes / mib:.0f} MiB | {(r.weights_file_bytes + limit) / mib:.0f} MiB | {met} |"
            )
    m = report.machine
    lines += [
        "",
        f"Machine: {m.cpu}, {m.cores} cores, onnxruntime {m.versions.onnxruntime}.",
        "",
    ]
    return "\n".join(lines)
