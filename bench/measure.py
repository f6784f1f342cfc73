"""`python -m bench`: latency, FLOPs and memory of CoreMatching builds against dense, side by side.

One run measures, after a warm-up and as medians over repeats, on the same
prompt (a shipped example image, a 40-token question):

- ONNX Runtime (CPU provider) through `runtime.Pipeline`: the dense build and
  CoreMatching builds at each budget: vision, prefill, one decode step, end to
  end (prefill and `new_tokens` tokens), Python overhead of a decode step, the
  process's peak memory (a fresh subprocess per build) and the KV-cache bytes;
- `transformers` eager dense generation, and the `coreMatching` PyTorch
  reference at each budget: vision, prefill, one decode step, end to end.

On a CUDA GPU it adds PyTorch prefill and decode-step medians at `gpu_preset`
geometry. This module only measures (into `bench.records.Measurement`); `bench.report`
turns the measurements into a `bench.records.BenchReport` (speedups, FLOPs ratios,
efficiencies and the targets of issue 6), and writes `<out>/bench.json`,
`<out>/bench.md` and two plots. `random_checkpoint` and `measure_onnxruntime` are
shared with `bench.precisions`.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import buildformat
from bench.config import BenchConfig
from bench.records import BenchReport, GpuFigures, GpuRow, GpuSkipped, Machine, Measurement, Samples
from bench.report import build_report, write_report
from buildformat import Manifest
from buildformat.geometry import Geometry
from coreMatching.config import CoreMatchingConfig
from coreMatching.flops import decode_bytes, decode_flops, prefill_flops

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
IMAGE = REPO / "examples" / "shapes_red_circle.png"
# A question of 40 tokens with the chat template (the prompt the FLOPs figures assume).
QUESTION = (
    "Look carefully at the picture and tell me which colour the round shape on the left side has, "
    "and whether it is larger than the square"
)


def _cache_keyword(model: Any) -> str:
    """The forward keyword (and output field) that carries the KV cache from one pass to the next.
    transformers 5.24 renamed `past_key_values` to `cache` (the old name warns, and goes in 5.40); the
    range we admit has both. Asked once per model, outside the timed loops."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def random_checkpoint(config: BenchConfig) -> tuple[Path, Any]:
    """The random-weight checkpoint of the config's preset under `config.work` (written once, then reused),
    and the preset."""
    from models.default_model import write_checkpoint
    from models.presets import from_name

    preset = from_name(config.preset) if isinstance(config.preset, str) else config.preset
    path = config.work / f"checkpoint-{preset.name}"
    if not _checkpoint_matches(path, preset):  # absent, or written for an earlier form of the preset
        log.info("writing a random-weight %s checkpoint to %s", preset.name, path)
        write_checkpoint(path, preset, seed=0)
    return path, preset


def _checkpoint_matches(path: Path, preset: Any) -> bool:
    """Whether `path` holds a checkpoint of the preset's decoder geometry."""
    import json

    try:
        text = json.loads((path / "config.json").read_text())["text_config"]
    except (OSError, KeyError, ValueError):
        return False
    wanted = (preset.hidden_size, preset.intermediate_size, preset.num_hidden_layers, preset.vocab_size)
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
    return tuple(text.get(key) for key in keys) == wanted


def same_geometry(manifest: Manifest, preset: Any) -> bool:
    """Whether a build in the work folder was made from the preset as it is now (a reused build must be)."""
    m = manifest.model
    return (m.hidden_size, m.intermediate_size, m.num_layers, m.vocab_size) == (
        preset.hidden_size,
        preset.intermediate_size,
        preset.num_hidden_layers,
        preset.vocab_size,
    )


def _build(config: BenchConfig, checkpoint: Path, preset: Any, budget: int | None, name: str) -> Path:
    """A build per budget with today's default selector and merge (dense: None), reused when an earlier run
    made the same one. Correctness is the tests' and the build's business; the build of the target budget is
    validated here too, so the report shows the measured graphs equal the reference."""
    corematching = None if budget is None else CoreMatchingConfig(token_budget=budget)
    return build_once(config.work / name, checkpoint, preset, corematching, validate=budget == config.target_budget)


def build_once(
    out: Path, checkpoint: Path, preset: Any, corematching: CoreMatchingConfig | None, validate: bool
) -> Path:
    """The preset's checkpoint built at `out` with `corematching` (None: dense), unless `out` already holds a
    build of the same geometry, budget, selector and merge."""
    from export.build import build
    from export.config import ExportConfig

    try:
        made = buildformat.read(out)
    except buildformat.ManifestError:
        made = None  # not built yet, or from an older format: build it
    if made is not None and made.weights is not None and same_geometry(made, preset):
        cm = made.corematching
        if (corematching is None and cm is None) or (
            corematching is not None
            and cm is not None
            and (cm.token_budget, cm.token_selector, cm.token_merge)
            == (corematching.token_budget, corematching.token_selector, corematching.token_merge)
        ):
            return out
    sequence = min(2048, preset.max_position_embeddings)
    build(
        ExportConfig(
            out=out,
            model_dir=checkpoint,
            corematching=corematching,
            force=True,
            validate=validate,
            max_prompt_tokens=sequence // 2,
            max_sequence=sequence,
        )
    )
    return out


def measure_onnxruntime(build: Path, name: str, config: BenchConfig) -> Measurement:
    """The build answered through `runtime.Pipeline` on the CPU provider: medians over `config.repeats` after a
    warm-up, the peak memory of a fresh process, the weight and KV-cache bytes (FLOPs left 0: `run_bench`'s)."""
    from runtime import Pipeline

    pipeline = Pipeline.load(build, provider="cpu")
    samples: dict[str, list[float]] = {"vision": [], "prefill": [], "decode_step": [], "end_to_end": [], "overhead": []}
    for repeat in range(config.repeats + 1):  # the first run warms up
        start = time.perf_counter()
        answer = pipeline.answer(IMAGE, QUESTION, config.new_tokens, stop_at_eos=False)
        total = time.perf_counter() - start
        if repeat == 0:
            continue
        timings = answer.timings
        steps, runs = timings.decode, timings.decode_graph
        samples["vision"].append(timings.vision)
        samples["prefill"].append(timings.prefill)
        samples["decode_step"].append(_median(list(timings.decode)))
        samples["end_to_end"].append(total)
        samples["overhead"].append(_median([(s - r) / s for s, r in zip(steps, runs, strict=True)]))
    manifest = pipeline.manifest
    kept = manifest.model.num_image_tokens if manifest.corematching is None else manifest.corematching.token_budget
    return Measurement(
        name=name,
        engine="onnxruntime",
        kept_tokens=kept,
        vision=_median(samples["vision"]),
        prefill=_median(samples["prefill"]),
        decode_step=_median(samples["decode_step"]),
        end_to_end=_median(samples["end_to_end"]),
        python_overhead=_median(samples["overhead"]),
        peak_memory_bytes=_peak_memory(build, config.new_tokens),
        weight_bytes=_weight_bytes(build, manifest),
        kv_cache_bytes=_kv_bytes(manifest, answer),
        samples=Samples(**{key: tuple(values) for key, values in samples.items()}),
    )


def _peak_memory(build: Path, new_tokens: int) -> int:
    """Peak resident memory of a fresh process that loads the build and answers once."""
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from runtime import Pipeline\n"
        f"p = Pipeline.load({str(build)!r}, provider='cpu')\n"
        f"p.answer({str(IMAGE)!r}, {QUESTION!r}, {new_tokens}, stop_at_eos=False)\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child started by a big
        # parent (this benchmark holds a torch model) would report the parent's peak.
        "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1]) * 1024  # kB


def _weight_bytes(build: Path, manifest: Manifest) -> int:
    """The build's weight bytes: weights.bin (each weight once) and the graphs' own small constants."""
    names = [name for name in manifest.files if name.endswith((".onnx", ".onnx.data", ".bin"))]
    return sum((build / name).stat().st_size for name in names)


def _kv_bytes(manifest: Manifest, answer: Any) -> int:
    geometry, cm = Geometry.from_manifest(manifest), manifest.corematching
    itemsize = 2 if manifest.precision == "float16" else 4
    total_len = answer.prompt_tokens + len(answer.token_ids)
    if cm is None:
        return geometry.cache_bytes(total_len, itemsize)
    merged = 1 if cm.token_merge == "summary" else 0  # the summary token is cached too
    return geometry.cache_bytes(total_len, itemsize, cm.prune_layer, kept=cm.token_budget, merged=merged)


def _torch(checkpoint: Path, config: BenchConfig, budgets: list[int | None]) -> list[Measurement]:
    """transformers eager dense, and the coreMatching reference at each budget (None: dense config)."""
    import torch

    from coreMatching import CoreMatchingLlava
    from models import load_llava, num_image_tokens
    from models.answer import build_prompt, load_image

    torch.set_num_threads(os.cpu_count() or 1)
    model, processor = load_llava(checkpoint)
    model.config._attn_implementation = "eager"
    for sub in (model.config.text_config, model.config.vision_config):
        sub._attn_implementation = "eager"
    inputs = processor(images=load_image(IMAGE), text=build_prompt(processor, QUESTION), return_tensors="pt")
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    n_img = num_image_tokens(model.config)
    results = []

    def repeat(measure: Callable[[], dict[str, float]]) -> dict[str, float]:
        measure()  # warm-up
        runs = [measure() for _ in range(config.repeats)]
        return {key: _median([run[key] for run in runs]) for key in runs[0]}

    cache = _cache_keyword(model)

    @torch.inference_mode()
    def hf() -> dict[str, float]:
        t0 = time.perf_counter()
        model.model.get_image_features(pixel_values=pixels)
        t1 = time.perf_counter()
        out = model(input_ids=ids, pixel_values=pixels, use_cache=True)
        t2 = time.perf_counter()
        token, steps = out.logits[:, -1:].argmax(-1), []
        for _ in range(config.new_tokens - 1):
            s = time.perf_counter()
            out = model(input_ids=token, **{cache: getattr(out, cache)}, use_cache=True)
            steps.append(time.perf_counter() - s)
            token = out.logits[:, -1:].argmax(-1)
        t3 = time.perf_counter()
        model.generate(**inputs, max_new_tokens=config.new_tokens, min_new_tokens=config.new_tokens, do_sample=False)
        return {
            "vision": t1 - t0,
            "prefill": t2 - t1,
            "decode_step": _median(steps),
            "end_to_end": time.perf_counter() - t3,
        }

    m = repeat(hf)
    results.append(Measurement("transformers eager dense", "transformers", n_img, **m))
    for budget in budgets:
        cm = CoreMatchingConfig.keep_all(n_img) if budget is None else CoreMatchingConfig(token_budget=budget)
        reference = CoreMatchingLlava(model, cm)

        def ref(reference: CoreMatchingLlava = reference) -> dict[str, float]:
            t0 = time.perf_counter()
            features = reference.image_features(pixels)
            t1 = time.perf_counter()
            state = reference.prefill(ids, image_features=features)
            t2 = time.perf_counter()
            steps, token = [], int(state.logits.argmax())
            for _ in range(config.new_tokens - 1):
                s = time.perf_counter()
                token = int(reference.decode_step(state, token).argmax())
                steps.append(time.perf_counter() - s)
            return {
                "vision": t1 - t0,
                "prefill": t2 - t1,
                "decode_step": _median(steps),
                "end_to_end": time.perf_counter() - t0,
            }

        name = "coreMatching reference dense" if budget is None else f"coreMatching reference k={budget}"
        results.append(Measurement(name, "coreMatching", n_img if budget is None else budget, **repeat(ref)))
    return results


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def torch_device_figures(preset: Any, device: str, budget: int, repeats: int, dtype: Any = None) -> GpuFigures:
    """Prefill and decode-step medians of the PyTorch dense model and the reference on `device`.

    A random-weight model of the preset (bf16 by default: llava-1.5-7b fits a 24 GB GPU), a prompt
    of the image's tokens and 40 text tokens; the GPU is synchronised around every timing.
    """
    import torch

    from coreMatching import CoreMatchingLlava
    from models.presets import build_random_model, from_name

    spec = from_name(preset) if isinstance(preset, str) else preset
    dtype = dtype or torch.bfloat16
    model = build_random_model(spec, seed=0, device=device, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(3, spec.vocab_size - 2, (40,), generator=generator)
    ids = torch.cat([text[:3], torch.full((spec.num_image_tokens,), spec.image_token_id), text[3:]])[None].to(device)
    pixels = torch.randn(1, 3, spec.image_size, spec.image_size, generator=generator).to(device, dtype)
    cuda = torch.device(device).type == "cuda"

    def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    cache = _cache_keyword(model)

    @torch.inference_mode()
    def dense() -> tuple[float, float]:
        prefill, out = timed(lambda: model(input_ids=ids, pixel_values=pixels, use_cache=True))
        token, past = out.logits[:, -1:].argmax(-1), {cache: getattr(out, cache)}
        step, _ = timed(lambda: model(input_ids=token, **past, use_cache=True))
        return prefill, step

    reference = CoreMatchingLlava(model, CoreMatchingConfig(token_budget=budget))

    def sparse() -> tuple[float, float]:
        prefill, state = timed(lambda: reference.prefill(ids, pixels))
        step, _ = timed(lambda: reference.decode_step(state, int(state.logits.argmax())))
        return prefill, step

    rows = []
    for name, run in (("transformers dense", dense), (f"coreMatching reference k={budget}", sparse)):
        run()  # warm-up
        runs = [run() for _ in range(repeats)]
        rows.append(GpuRow(name, prefill=_median([r[0] for r in runs]), decode_step=_median([r[1] for r in runs])))
    gpu = torch.cuda.get_device_name(torch.device(device)) if cuda else platform.processor() or "cpu"
    return GpuFigures(
        device=gpu,
        preset=spec.name,
        dtype=str(dtype).replace("torch.", ""),
        prompt_tokens=int(ids.shape[1]),
        rows=tuple(rows),
    )


def run_bench(config: BenchConfig, stage: Callable[[str], None] = lambda s: None) -> BenchReport:
    """Builds, measures and writes the report (`bench.report.write_report`); `stage` is told each step's name."""
    config.work.mkdir(parents=True, exist_ok=True)
    stage("checkpoint")
    checkpoint, preset = random_checkpoint(config)
    hf = preset.hf_config()
    geometry = Geometry.from_hf_config(hf)
    n_img = preset.num_image_tokens
    measured: list[Measurement] = []
    builds: dict[str, Path] = {}
    for budget in (None, *config.budgets):
        name = "dense" if budget is None else f"k{budget}"
        stage(f"build {name}")
        builds[name] = _build(config, checkpoint, preset, budget, f"{preset.name}-{name}")
    for name, build in builds.items():
        stage(f"measure onnxruntime {name}")
        measured.append(measure_onnxruntime(build, f"onnxruntime {name}", config))
    if config.torch_baselines:
        stage("measure transformers and the reference")
        measured += _torch(checkpoint, config, [None, *config.budgets])

    manifest = buildformat.read(builds["dense"])
    from runtime.text import PromptTokenizer

    prompt_tokens = PromptTokenizer.from_build(builds["dense"], manifest).encode(QUESTION).prompt_tokens
    measurements = [_with_flops(m, geometry, prompt_tokens, n_img) for m in measured]
    gpu: GpuFigures | GpuSkipped = GpuSkipped("no CUDA GPU on this machine")
    if config.torch_baselines and _cuda_available():
        stage(f"measure PyTorch on the GPU at {config.gpu_preset} geometry")
        gpu = torch_device_figures(config.gpu_preset, "cuda", config.target_budget, config.repeats)
    report = build_report(config, n_img, prompt_tokens, measurements, Machine.this_host(), gpu)
    stage("write")
    write_report(report, config.out)
    return report


def _with_flops(m: Measurement, geometry: Geometry, prompt_tokens: int, n_img: int) -> Measurement:
    """`m` with the analytic FLOPs and bytes of its configuration on the benchmark's prompt."""
    budgets = (
        None
        if m.kept_tokens == n_img and "dense" in m.name
        else CoreMatchingConfig(token_budget=m.kept_tokens).resolve(
            num_layers=geometry.num_layers, intermediate_size=geometry.intermediate_size, num_image_tokens=n_img
        )
    )
    return replace(
        m,
        prefill_flops=prefill_flops(geometry, prompt_tokens, budgets),
        decode_flops=decode_flops(geometry, prompt_tokens, budgets),
        decode_bytes=decode_bytes(geometry, prompt_tokens, budgets),
    )
