"""The comparison, start to end: `run_peer(PeerConfig)` builds, checks, measures and writes the report."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import buildformat
from bench.measure import random_checkpoint
from bench.peer.check import LogitsCheck, build_probe, check_gguf, check_token_ids, reference_logits
from bench.peer.config import PeerConfig
from bench.peer.footprint import gguf_step_weight_bytes, llama_cpp_kv_bytes, memory_bandwidth
from bench.peer.gguf_export import DecoderGeometry, write_gguf
from bench.peer.llama_timing import LlamaTimes, time_gguf
from bench.peer.ours import (
    BuildSpec,
    PipelineTimes,
    build_specs,
    ensure_build,
    kv_cache_bytes,
    measure_pipeline,
    passed_validation,
)
from bench.peer.records import PeerReport, PeerRow
from bench.peer.report import targets, write_report
from bench.precisions import decode_weight_bytes
from bench.records import Machine

log = logging.getLogger(__name__)


def command(config: PeerConfig) -> str:
    """The command line that reproduces the run (what the report's header names)."""
    return (
        f"python -m bench --llama-cpp {config.llama_cpp} --peer-only --preset {config.preset} "
        f"--repeats {config.repeats}"
    )


@dataclass(frozen=True)
class _Gguf:
    """One of llama.cpp's model files: its precision name ("f32", "Q8_0", "Q4_0") and path."""

    kind: str
    path: Path


def _fresh(path: Path, source: Path) -> bool:
    return path.is_file() and path.stat().st_mtime >= source.stat().st_mtime


def _llama_cpp_models(
    config: PeerConfig, checkpoint: Path, stage: Callable[[str], None]
) -> tuple[list[_Gguf], list[LogitsCheck], DecoderGeometry]:
    """The f32 GGUF (written unless one newer than the checkpoint is there) and its quantized forms, each
    checked against the PyTorch model by llama.cpp itself (LlamaCppMismatch if one disagrees)."""
    from models import load_llava

    folder = config.work / "llama-cpp"
    f32 = folder / f"{config.preset}-f32.gguf"
    weights = next(checkpoint.glob("*.safetensors"), checkpoint / "config.json")
    model, _ = load_llava(checkpoint)
    geometry = DecoderGeometry.from_text_config(model.config.text_config)
    if not _fresh(f32, weights):
        stage("export the decoder to GGUF")
        write_gguf(model, f32)
    ids = check_token_ids(
        geometry.vocab_size, [model.config.image_token_id], geometry.bos_id, config.check_prompt_ids + 1
    )
    reference = reference_logits(model, ids, config.check_prompt_ids)
    del model  # ~1 GB at the benchmark's width: not held through the timings
    ggufs = [_Gguf("f32", f32)]
    for kind in config.quants:
        stage(f"llama-quantize {kind}")
        ggufs.append(
            _Gguf(kind, config.tools.quantize(f32, folder / f"{config.preset}-{kind}.gguf", kind, config.threads))
        )
    stage("check llama.cpp against PyTorch")
    probe = build_probe(config.llama_cpp, folder / "llama-logits")
    checks = [check_gguf(probe, g.path, g.kind, reference, ids, config.check_prompt_ids, config.threads) for g in ggufs]
    return ggufs, checks, geometry


def _our_row(spec: BuildSpec, build: Path, times: PipelineTimes, bandwidth: float) -> PeerRow:
    manifest = buildformat.read(build)
    weights = decode_weight_bytes(build, manifest)
    kv = kv_cache_bytes(manifest, times.prompt_tokens)
    return _row(spec.name, "onnxruntime", spec.weights, passed_validation(manifest), times, weights, kv, bandwidth)


def _llama_row(gguf: _Gguf, times: LlamaTimes, geometry: DecoderGeometry, prompt: int, bandwidth: float) -> PeerRow:
    weights = gguf_step_weight_bytes(gguf.path)
    kv = llama_cpp_kv_bytes(
        geometry.num_layers, geometry.num_kv_heads * geometry.head_dim, prompt, times.type_k, times.type_v
    )
    # check_gguf raised before timing where llama.cpp disagreed: a timed file is correct.
    return _row(f"llama.cpp {gguf.kind}", "llama.cpp", gguf.kind, True, times, weights, kv, bandwidth)


def _row(
    name: str,
    engine: str,
    weights_name: str,
    correct: bool,
    times: PipelineTimes | LlamaTimes,
    weights: int,
    kv: int,
    bandwidth: float,
) -> PeerRow:
    """One row: the times in ms, and the step's floor (the bytes it reads / the measured bandwidth)."""
    floor = (weights + kv) / bandwidth
    return PeerRow(
        name=name,
        engine=engine,
        weights=weights_name,
        correct=correct,
        vision_ms=times.vision * 1e3 if isinstance(times, PipelineTimes) else None,  # llama.cpp runs no vision
        prefill_ms=times.prefill * 1e3,
        decode_step_ms=times.decode_step * 1e3,
        end_to_end_ms=tuple(t * 1e3 for t in times.end_to_end),
        decode_step_samples_ms=tuple(t * 1e3 for t in times.decode_step_samples),
        step_weight_bytes=weights,
        step_kv_bytes=kv,
        floor_ms=floor * 1e3,
        step_over_floor=times.decode_step / floor,
    )


def run_peer(config: PeerConfig, stage: Callable[[str], None] = lambda s: None) -> PeerReport:
    """Builds ours, exports and checks llama.cpp's models, times both, and writes `<out>/llama-cpp.{json,md}`.
    `stage` is told each step's name. Raises LlamaCppMismatch (llama.cpp disagrees with PyTorch) or
    LlamaCppError (a llama.cpp tool failed) before anything is written."""
    config.work.mkdir(parents=True, exist_ok=True)
    stage("checkpoint")
    checkpoint, preset = random_checkpoint(config.bench)
    specs = build_specs(config.token_budget)
    builds: dict[BuildSpec, Path] = {}
    for spec in specs:
        stage(f"build {spec.name}")
        builds[spec] = ensure_build(spec, config, checkpoint, preset)  # an accuracy level's row reuses its build
    ggufs, checks, geometry = _llama_cpp_models(config, checkpoint, stage)

    ours: dict[BuildSpec, PipelineTimes] = {}
    for spec, build in builds.items():
        stage(f"measure {spec.name}")
        ours[spec] = measure_pipeline(build, config.new_tokens, config.repeats, spec.accuracy_level)
    prompts = {times.prompt_tokens for times in ours.values()}
    if len(prompts) != 1:
        raise RuntimeError(f"the builds' prompts differ in length: {sorted(prompts)}")
    prompt = prompts.pop()
    theirs: dict[str, LlamaTimes] = {}
    for gguf in ggufs:
        stage(f"llama-bench {gguf.kind}")
        theirs[gguf.kind] = time_gguf(
            config.tools, gguf.path, prompt, config.new_tokens, config.repeats, config.threads
        )
    stage("memory bandwidth")
    bandwidth = memory_bandwidth(config.bandwidth_bytes)

    rows = [_llama_row(g, theirs[g.kind], geometry, prompt, bandwidth) for g in ggufs]
    rows += [_our_row(spec, builds[spec], ours[spec], bandwidth) for spec in specs]
    dense, dense_int4, _, sparse_int4 = (spec.name for spec in specs[:4])  # the targets: the defaults
    any_times = next(iter(theirs.values()))
    report = PeerReport(
        command=command(config),
        machine=Machine.this_host(),
        llama_cpp_build=any_times.build,
        preset=preset.name,
        prompt_tokens=prompt,
        threads=config.threads,
        repeats=config.repeats,
        new_tokens=config.new_tokens,
        kv_cache_llama_cpp=f"{any_times.type_k}/{any_times.type_v}",
        bandwidth_bytes_per_s=bandwidth,
        checks=tuple(checks),
        rows=tuple(rows),
        targets=targets(rows, config.new_tokens, dense, dense_int4, sparse_int4),
    )
    stage("write")
    write_report(report, config.out)
    log.info("wrote %s", config.out / "llama-cpp.md")
    return report
