"""What the benchmark records, as frozen dataclasses: the machine, one configuration's measurements, the
report's rows and targets, the GPU section, and the report (`BenchReport`, bench.json).

Each is checked when made and built whole (nothing is added to a record afterwards). `to_json` writes the
JSON of bench.json, one key per field in field order (the layout of docs/benchmarks/bench.json);
`from_json` reads it back, so a written report can be rendered again without measuring.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

ENGINES = ("onnxruntime", "transformers", "coreMatching")
PACKAGES = ("onnxruntime", "torch", "transformers", "numpy")  # the versions a report names, in its order


def _positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{owner}.{name} must be a positive finite number, got {value!r}")


def _counts(owner: str, **values: int | None) -> None:
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{owner}.{name} must be a non-negative integer, got {value!r}")


@dataclass(frozen=True)
class Versions:
    """The versions of the packages the figures depend on ("not installed" where one is absent)."""

    onnxruntime: str
    torch: str
    transformers: str
    numpy: str

    @classmethod
    def installed(cls) -> Versions:
        from importlib import metadata

        def version(package: str) -> str:
            try:
                return metadata.version(package)
            except metadata.PackageNotFoundError:
                return "not installed"

        return cls(*(version(package) for package in PACKAGES))

    def to_json(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Machine:
    """Where a report was measured."""

    cpu: str
    cores: int
    memory_bytes: int  # physical memory; 0 where the system does not say
    python: str
    system: str
    versions: Versions

    def __post_init__(self) -> None:
        _counts("Machine", cores=self.cores, memory_bytes=self.memory_bytes)

    @classmethod
    def this_host(cls) -> Machine:
        cpu = platform.processor() or ""
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass  # not Linux: platform.processor()'s name
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            memory = 0
        return cls(
            cpu=cpu,
            cores=os.cpu_count() or 1,
            memory_bytes=memory,
            python=platform.python_version(),
            system=platform.platform(),
            versions=Versions.installed(),
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Machine:
        return cls(**{**data, "versions": Versions(**data["versions"])})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Samples:
    """Every repeat's figure, in seconds (the medians are taken over these); one entry per repeat."""

    vision: tuple[float, ...]
    prefill: tuple[float, ...]
    decode_step: tuple[float, ...]  # each repeat's median decode step
    end_to_end: tuple[float, ...]
    overhead: tuple[float, ...]  # each repeat's median share of a decode step spent outside the graph

    def __post_init__(self) -> None:
        lengths = {len(getattr(self, f.name)) for f in fields(self)}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(f"Samples must hold one figure per repeat in every series, got lengths {lengths}")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Samples | None:
        return cls(**{key: tuple(values) for key, values in data.items()}) if data else None

    def to_json(self) -> dict[str, list[float]]:
        return {f.name: list(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class Measurement:
    """One configuration measured: medians in seconds over the repeats, and the analytic FLOPs and bytes of
    its prompt (0 until `bench.measure.run_bench` computes them)."""

    name: str
    engine: str  # one of ENGINES
    kept_tokens: int  # image tokens the decoder keeps after the prune layer (576 for dense)
    vision: float
    prefill: float
    decode_step: float
    end_to_end: float
    python_overhead: float | None = None  # share of a decode step spent outside the graph (ONNX Runtime only)
    peak_memory_bytes: int | None = None
    weight_bytes: int | None = None
    kv_cache_bytes: int | None = None
    prefill_flops: int = 0
    decode_flops: int = 0
    decode_bytes: int = 0
    samples: Samples | None = None  # None: only the medians were kept (the PyTorch measurements); JSON {}

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"Measurement.engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if not self.name:
            raise ValueError("Measurement.name must not be empty")
        _positive("Measurement", vision=self.vision, prefill=self.prefill, decode_step=self.decode_step)
        _positive("Measurement", end_to_end=self.end_to_end, kept_tokens=self.kept_tokens)
        if self.python_overhead is not None and not 0 <= self.python_overhead < 1:
            raise ValueError(f"Measurement.python_overhead must be a share in [0, 1), got {self.python_overhead!r}")
        _counts(
            "Measurement",
            peak_memory_bytes=self.peak_memory_bytes,
            weight_bytes=self.weight_bytes,
            kv_cache_bytes=self.kv_cache_bytes,
            prefill_flops=self.prefill_flops,
            decode_flops=self.decode_flops,
            decode_bytes=self.decode_bytes,
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Measurement:
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in data.items() if k in names}, "samples": Samples.from_json(data["samples"])})

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["samples"] = {} if self.samples is None else self.samples.to_json()
        return out


@dataclass(frozen=True)
class ReportRow:
    """A measurement set against the dense ONNX build of the same run (ratios: dense / this, so > 1 is better).

    efficiency: the measured speedup over the analytic ratio (FLOPs for prefill; for a decode step, which is
    memory bound, the bytes it reads).
    """

    measurement: Measurement
    prefill_speedup: float
    decode_speedup: float
    end_to_end_speedup: float
    end_to_end_vs_transformers: float | None  # None: transformers was not measured
    prefill_flops_ratio: float
    decode_flops_ratio: float
    decode_bytes_ratio: float
    prefill_efficiency: float
    decode_efficiency: float

    def __post_init__(self) -> None:
        ratios = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "measurement"}
        _positive("ReportRow", **{k: v for k, v in ratios.items() if v is not None})

    @property
    def name(self) -> str:
        return self.measurement.name

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ReportRow:
        ratios = {f.name: data[f.name] for f in fields(cls) if f.name != "measurement"}
        return cls(measurement=Measurement.from_json(data), **ratios)

    def to_json(self) -> dict[str, Any]:
        ratios = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "measurement"}
        return self.measurement.to_json() | ratios


@dataclass(frozen=True)
class Target:
    """One of issue 6's targets, for the target budget's ONNX row."""

    target: str  # what is asked, in words
    measured: float
    required: float  # the bound: a floor, or for a share or bytes a ceiling
    met: bool

    def __post_init__(self) -> None:
        if not isinstance(self.met, bool):
            raise ValueError(f"Target.met must be a bool, got {self.met!r}")

    @classmethod
    def at_least(cls, what: str, measured: float, required: float) -> Target:
        return cls(what, measured, required, measured >= required)

    @classmethod
    def at_most(cls, what: str, measured: float, limit: float) -> Target:
        return cls(what, measured, limit, measured <= limit)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GpuRow:
    name: str
    prefill: float  # median seconds, the GPU synchronised around it
    decode_step: float

    def __post_init__(self) -> None:
        _positive("GpuRow", prefill=self.prefill, decode_step=self.decode_step)


@dataclass(frozen=True)
class GpuFigures:
    """PyTorch prefill and decode-step medians on a GPU (`bench.measure.torch_device_figures`)."""

    device: str  # the GPU's name
    preset: str
    dtype: str  # of the random weights, e.g. "bfloat16"
    prompt_tokens: int
    rows: tuple[GpuRow, ...]

    def __post_init__(self) -> None:
        _positive("GpuFigures", prompt_tokens=self.prompt_tokens)
        if not self.rows:
            raise ValueError("GpuFigures.rows must not be empty")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GpuFigures:
        return cls(**{**data, "rows": tuple(GpuRow(**row) for row in data["rows"])})

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "rows": [asdict(row) for row in self.rows]}


@dataclass(frozen=True)
class GpuSkipped:
    """Why the GPU section was not measured (JSON {"skipped": reason})."""

    reason: str

    def __post_init__(self) -> None:
        if not self.reason:
            raise ValueError("GpuSkipped.reason must say why")

    def to_json(self) -> dict[str, str]:
        return {"skipped": self.reason}


@dataclass(frozen=True)
class BenchReport:
    """One run of `python -m bench`: bench.json, and what bench.md and the plots are rendered from."""

    command: str  # the command that reproduces the run
    machine: Machine
    preset: str
    prompt_tokens: int  # S, the image's tokens included
    num_image_tokens: int
    new_tokens: int
    repeats: int
    target_budget: int
    rows: tuple[ReportRow, ...]
    targets: tuple[Target, ...]  # empty where the target budget was not measured
    gpu: GpuFigures | GpuSkipped

    def __post_init__(self) -> None:
        _positive(
            "BenchReport",
            prompt_tokens=self.prompt_tokens,
            num_image_tokens=self.num_image_tokens,
            new_tokens=self.new_tokens,
            repeats=self.repeats,
            target_budget=self.target_budget,
        )
        names = [row.name for row in self.rows]
        if "onnxruntime dense" not in names or len(set(names)) != len(names):
            raise ValueError(f"BenchReport.rows must name each configuration once, the dense ONNX one too: {names}")

    @property
    def by_name(self) -> dict[str, ReportRow]:
        return {row.name: row for row in self.rows}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BenchReport:
        gpu = data["gpu"]
        return cls(
            **{
                **data,
                "machine": Machine.from_json(data["machine"]),
                "rows": tuple(ReportRow.from_json(row) for row in data["rows"]),
                "targets": tuple(Target(**t) for t in data["targets"]),
                "gpu": GpuSkipped(gpu["skipped"]) if "skipped" in gpu else GpuFigures.from_json(gpu),
            }
        )

    def to_json(self) -> dict[str, Any]:
        return {
            **{f.name: getattr(self, f.name) for f in fields(self)},
            "machine": self.machine.to_json(),
            "rows": [row.to_json() for row in self.rows],
            "targets": [t.to_json() for t in self.targets],
            "gpu": self.gpu.to_json(),
        }
