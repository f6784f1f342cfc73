"""The project's side of the comparison: four builds of the benchmark model, made (or reused) and timed
through `runtime.Pipeline` on the ONNX Runtime CPU provider.

dense fp32, dense int4, CoreMatching fp32 (core neurons per request) and CoreMatching int4 with a static
neuron set: the float pair is set against llama.cpp f32, the int4 pair against Q4_0 (blocks of 32, as ours).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import buildformat
from bench.measure import IMAGE, QUESTION, same_geometry
from bench.peer.config import PeerConfig
from buildformat import Manifest
from buildformat.geometry import Geometry
from coreMatching.config import CoreMatchingConfig

log = logging.getLogger(__name__)

WEIGHTS = ("fp32", "int4")


@dataclass(frozen=True)
class BuildSpec:
    """One of the project's builds: dense (token_budget None) or CoreMatching, fp32 or int4 weights."""

    name: str  # the report's row, e.g. "ours dense int4"
    token_budget: int | None
    weights: str  # "fp32" or "int4"
    static_neurons: bool = False
    accuracy_level: int = 1  # MatMulNBits' (int4): 1 fp32 arithmetic, as validated; 4 int8 activations

    def __post_init__(self) -> None:
        if self.weights not in WEIGHTS:
            raise ValueError(f"{self.name}: weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        if self.static_neurons and self.token_budget is None:
            raise ValueError(f"{self.name}: a static neuron set needs a CoreMatching budget")
        if self.accuracy_level not in (1, 4) or (self.accuracy_level != 1 and self.weights != "int4"):
            raise ValueError(f"{self.name}: accuracy level 4 is int4's alternative, got {self.accuracy_level}")

    def directory(self, preset: str) -> str:
        """Under the work folder; dense fp32 and k<budget> fp32 are `python -m bench`'s names (reused)."""
        base = f"{preset}-dense" if self.token_budget is None else f"{preset}-k{self.token_budget}"
        suffix = "" if self.weights == "fp32" else f"-{self.weights}"
        return base + suffix + ("-static" if self.static_neurons else "")


def build_specs(token_budget: int) -> tuple[BuildSpec, ...]:
    """The four builds the targets are about (the runtime's defaults), then the int4 builds again at
    MatMulNBits' accuracy level 4: int8 activations, the arithmetic of llama.cpp's Q4_0 dot products."""
    k = token_budget
    return (
        BuildSpec("ours dense fp32", None, "fp32"),
        BuildSpec("ours dense int4", None, "int4"),
        BuildSpec(f"ours CoreMatching k={k} fp32", k, "fp32"),
        BuildSpec(f"ours CoreMatching k={k} int4 static", k, "int4", static_neurons=True),
        BuildSpec("ours dense int4, accuracy level 4", None, "int4", accuracy_level=4),
        BuildSpec(f"ours CoreMatching k={k} int4 static, accuracy level 4", k, "int4", True, accuracy_level=4),
    )


def _matches(made: Manifest, spec: BuildSpec, config: PeerConfig, preset: Any) -> bool:
    """Whether an existing build is the spec's, at the preset's current geometry."""
    quant = made.quantization
    weights = quant.weights if quant is not None else ("fp16" if made.precision == "float16" else "fp32")
    if weights != spec.weights or (quant is not None and quant.block_size != config.block_size):
        return False
    budget = None if made.corematching is None else made.corematching.token_budget
    static = made.static_neurons is not None
    return (
        made.weights is not None
        and budget == spec.token_budget
        and static == spec.static_neurons
        and same_geometry(made, preset)
    )


def ensure_build(spec: BuildSpec, config: PeerConfig, checkpoint: Path, preset: Any) -> Path:
    """The spec's build under `config.work`, made unless a matching one is there. Validated; a build that
    fails its validation is made again unvalidated and measured all the same (the row says so)."""
    from export.build import build
    from export.config import ExportConfig
    from export.validate import ValidationError

    out = config.work / spec.directory(preset.name)
    try:
        if _matches(buildformat.read(out), spec, config, preset):
            return out
    except buildformat.ManifestError:
        pass  # not built yet, or in an older format
    sequence = min(2048, preset.max_position_embeddings)

    def export(validate: bool) -> None:
        build(
            ExportConfig(
                out=out,
                model_dir=checkpoint,
                corematching=None if spec.token_budget is None else CoreMatchingConfig(token_budget=spec.token_budget),
                weights=spec.weights,
                block_size=config.block_size,
                static_neurons=spec.static_neurons,
                force=True,
                validate=validate,
                max_prompt_tokens=sequence // 2,  # as `python -m bench` builds, so its builds are reused
                max_sequence=sequence,
            )
        )

    log.info("building %s in %s", spec.name, out)
    try:
        export(validate=True)
    except ValidationError as e:
        log.warning("%s: %s; measuring it unvalidated", spec.name, e)
        export(validate=False)
    return out


def passed_validation(manifest: Manifest) -> bool:
    """Whether the build passed its validation (False where it failed, or was built without one)."""
    return manifest.validation is not None and manifest.validation.passed is True


@dataclass(frozen=True)
class PipelineTimes:
    """A build's answers, in seconds: medians over the repeats (each repeat answers once per new-token count).

    decode_step: the median step of the shortest answer (steps at depths prompt + 1 .. prompt + n - 1, where
    llama-bench's `-n 16 -d <prompt>` times llama.cpp's); end_to_end: one per new-token count, wall time of
    `Pipeline.answer` (image preprocessing, vision, prefill, n - 1 decode steps, detokenising).
    """

    vision: float
    prefill: float
    decode_step: float
    end_to_end: tuple[float, ...]
    decode_step_samples: tuple[float, ...]  # each repeat's median step
    prompt_tokens: int

    def __post_init__(self) -> None:
        if min(self.vision, self.prefill, self.decode_step, *self.end_to_end) <= 0 or self.prompt_tokens < 1:
            raise ValueError(f"PipelineTimes must be positive: {self}")


def measure_pipeline(build: Path, new_tokens: tuple[int, ...], repeats: int, accuracy_level: int = 1) -> PipelineTimes:
    """The build answering the benchmark's question on its image (`bench.measure`'s), `stop_at_eos=False` so
    every answer has its full length; a warm-up answer first."""
    from runtime import Pipeline

    pipeline = Pipeline.load(build, provider="cpu", accuracy_level=accuracy_level)
    pipeline.answer(IMAGE, QUESTION, new_tokens[0], stop_at_eos=False)  # warm-up
    vision, prefill, steps, prompts = [], [], [], set()
    totals: list[list[float]] = [[] for _ in new_tokens]
    for _ in range(repeats):
        for i, n in enumerate(new_tokens):
            start = time.perf_counter()
            answer = pipeline.answer(IMAGE, QUESTION, n, stop_at_eos=False)
            totals[i].append(time.perf_counter() - start)
            vision.append(answer.timings.vision)
            prefill.append(answer.timings.prefill)
            prompts.add(answer.prompt_tokens)
            if i == 0:
                steps.append(statistics.median(answer.timings.decode))
    if len(prompts) != 1:
        raise RuntimeError(f"{build}: the prompt's length changed between answers: {sorted(prompts)}")
    return PipelineTimes(
        vision=statistics.median(vision),
        prefill=statistics.median(prefill),
        decode_step=statistics.median(steps),
        end_to_end=tuple(statistics.median(t) for t in totals),
        decode_step_samples=tuple(steps),
        prompt_tokens=prompts.pop(),
    )


def kv_cache_bytes(manifest: Manifest, length: int) -> int:
    """The KV cache a decode step reads at `length` cached tokens (after the prune layer, a CoreMatching
    build's layers hold the kept image tokens only)."""
    geometry, cm = Geometry.from_manifest(manifest), manifest.corematching
    itemsize = 2 if manifest.precision == "float16" else 4
    if cm is None:
        return geometry.cache_bytes(length, itemsize)
    merged = 1 if cm.token_merge == "summary" else 0  # the summary token is cached too
    return geometry.cache_bytes(length, itemsize, cm.prune_layer, kept=cm.token_budget, merged=merged)
