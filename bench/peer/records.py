"""What the llama.cpp comparison records, as frozen dataclasses checked when made: one row per engine and
build, and the report (llama-cpp.json is `dataclasses.asdict` of `PeerReport`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from bench.peer.check import LogitsCheck
from bench.records import Machine, Target

ENGINES = ("llama.cpp", "onnxruntime")


def _positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{owner}.{name} must be a positive finite number, got {value!r}")


@dataclass(frozen=True)
class PeerRow:
    """One engine's build of the benchmark model, timed (milliseconds, medians over the repeats).

    step_bytes: what one decode step reads at the prompt's depth (weights, of the embedding table one row,
    and the KV cache); floor_ms: step_bytes / the measured memory bandwidth; step_over_floor: the measured
    step / its floor (1.0 would be the machine's limit).
    """

    name: str
    engine: str  # one of ENGINES
    weights: str  # as stored: f32, Q8_0, Q4_0 (llama.cpp); fp32, int4 (ours)
    correct: bool  # llama.cpp: passed the logits check; ours: the build passed its validation
    vision_ms: float | None  # None: not run (llama.cpp runs no vision tower here)
    prefill_ms: float
    decode_step_ms: float
    end_to_end_ms: tuple[float, ...]  # one per PeerReport.new_tokens
    decode_step_samples_ms: tuple[float, ...]
    step_weight_bytes: int
    step_kv_bytes: int
    floor_ms: float
    step_over_floor: float

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"PeerRow.engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if (self.vision_ms is None) != (self.engine == "llama.cpp"):
            raise ValueError(f"{self.name}: vision_ms is None exactly for llama.cpp (which runs no vision tower)")
        _positive(self.name, prefill_ms=self.prefill_ms, decode_step_ms=self.decode_step_ms, floor_ms=self.floor_ms)
        _positive(
            self.name,
            step_over_floor=self.step_over_floor,
            **{f"end_to_end_{i}": t for i, t in enumerate(self.end_to_end_ms)},
        )
        if self.step_weight_bytes <= 0 or self.step_kv_bytes < 0:
            raise ValueError(f"{self.name}: step bytes must be positive")
        if not isinstance(self.correct, bool):
            raise ValueError(f"{self.name}: correct must be a bool, got {self.correct!r}")

    @property
    def step_bytes(self) -> int:
        return self.step_weight_bytes + self.step_kv_bytes


@dataclass(frozen=True)
class PeerReport:
    """One run of `python -m bench --llama-cpp DIR`: llama-cpp.json, and what llama-cpp.md is rendered from."""

    command: str
    machine: Machine
    llama_cpp_build: str  # llama-bench's build number and commit
    preset: str
    prompt_tokens: int  # the project's prompt (image tokens included); llama.cpp is timed at the same length
    threads: int  # llama.cpp's -t; ONNX Runtime's default thread count on this machine
    repeats: int
    new_tokens: tuple[int, ...]
    kv_cache_llama_cpp: str  # llama.cpp's K/V element types, e.g. "f16/f16"
    bandwidth_bytes_per_s: float
    checks: tuple[LogitsCheck, ...]  # llama.cpp on each GGUF against PyTorch
    rows: tuple[PeerRow, ...]
    targets: tuple[Target, ...]

    def __post_init__(self) -> None:
        _positive("PeerReport", prompt_tokens=self.prompt_tokens, threads=self.threads, repeats=self.repeats)
        _positive("PeerReport", bandwidth_bytes_per_s=self.bandwidth_bytes_per_s)
        names = [row.name for row in self.rows]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"PeerReport.rows must name each build once, got {names}")
        for row in self.rows:
            if len(row.end_to_end_ms) != len(self.new_tokens):
                raise ValueError(f"{row.name}: one end-to-end figure per new-token count {self.new_tokens}")
        if not all(check.passed for check in self.checks):
            raise ValueError("PeerReport: a llama.cpp check failed; its timings would not be of the same model")

    @property
    def by_name(self) -> dict[str, PeerRow]:
        return {row.name: row for row in self.rows}
