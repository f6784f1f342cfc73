"""`python -m export bench`: latency, FLOPs and memory of CoreMatching builds against dense, side by side.

One run measures, after a warm-up and as medians over repeats, on the same
prompt (a shipped example image, a 40-token question):

- ONNX Runtime (CPU provider) through `runtime.Pipeline`: the dense build and
  CoreMatching builds at each budget: vision, prefill, one decode step, end to
  end (prefill and `new_tokens` tokens), Python overhead of a decode step, the
  process's peak memory (a fresh subprocess per build) and the KV-cache bytes;
- `transformers` eager dense generation, and the `coreMatching` PyTorch
  reference at each budget: vision, prefill, one decode step, end to end.

It reports speedups against the dense ONNX build and against `transformers`,
the analytic FLOPs ratios, the efficiency (measured speedup / analytic ratio;
for a decode step the analytic ratio is that of the bytes it reads, since a
step is memory bound), and checks the targets of issue 6. Results go to
`<out>/bench.json`, `<out>/bench.md` and two plots.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coreMatching.config import CoreMatchingConfig
from coreMatching.flops import DecoderGeometry, decode_bytes, decode_flops, prefill_flops

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
IMAGE = REPO / "examples" / "shapes_red_circle.png"
# A question of 40 tokens with the chat template (the prompt the FLOPs figures assume).
QUESTION = (
    "Look carefully at the picture and tell me which colour the round shape on the left side has, "
    "and whether it is larger than the square"
)


@dataclass(frozen=True)
class BenchConfig:
    preset: Any = "llava-7b-shape"  # a preset name or a ModelPreset
    budgets: tuple[int, ...] = (192, 128, 64, 32)
    repeats: int = 5
    new_tokens: int = 16
    work: Path = Path("builds/bench")
    out: Path = Path("docs/benchmarks")
    torch_baselines: bool = True
    target_budget: int = 64
    # On a CUDA GPU: the PyTorch dense model and the reference at this geometry (random bf16 weights).
    gpu_preset: str = "llava-1.5-7b"

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.new_tokens < 2:
            raise ValueError("repeats must be >= 1 and new_tokens >= 2")
        if not self.budgets or min(self.budgets) < 1:
            raise ValueError(f"budgets must be positive token counts, got {self.budgets}")


@dataclass
class Measurement:
    """Medians in seconds, over the repeats."""

    name: str
    engine: str  # "onnxruntime", "transformers" or "coreMatching"
    kept_tokens: int  # image tokens the decoder keeps after the prune layer (576 for dense)
    vision: float
    prefill: float
    decode_step: float
    end_to_end: float
    python_overhead: float | None = None  # share of a decode step spent outside the graph
    peak_memory_bytes: int | None = None
    weight_bytes: int | None = None
    kv_cache_bytes: int | None = None
    prefill_flops: int = 0
    decode_flops: int = 0
    decode_bytes: int = 0
    samples: dict[str, list[float]] = field(default_factory=dict)


def _cache_keyword(model: Any) -> str:
    """The forward keyword (and output field) that carries the KV cache from one pass to the next.
    transformers 5.24 renamed `past_key_values` to `cache` (the old name warns, and goes in 5.40); the
    range we admit has both. Asked once per model, outside the timed loops."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _checkpoint(config: BenchConfig) -> tuple[Path, Any]:
    from models.default_model import write_checkpoint
    from models.presets import from_name

    preset = from_name(config.preset) if isinstance(config.preset, str) else config.preset
    path = config.work / f"checkpoint-{preset.name}"
    if not (path / "config.json").exists():
        log.info("writing a random-weight %s checkpoint to %s", preset.name, path)
        write_checkpoint(path, preset, seed=0)
    return path, preset


def _build(config: BenchConfig, checkpoint: Path, preset: Any, budget: int | None, name: str) -> Path:
    """A build per configuration, reused when an earlier run made the same one."""
    from export.build import build
    from export.config import ExportConfig

    out = config.work / name
    manifest = out / "manifest.json"
    if manifest.exists():
        made = json.loads(manifest.read_text())
        cm = made["corematching"]
        same = (budget is None and cm["dense"]) or (budget is not None and cm.get("token_budget") == budget)
        if same and "weights" in made:
            return out
    corematching = None if budget is None else CoreMatchingConfig(token_budget=budget)
    sequence = min(2048, preset.max_position_embeddings)
    # Correctness is the tests' and the build's business; the build of the target budget is validated
    # here too, so the report shows the measured graphs equal the reference.
    build(
        ExportConfig(
            out=out,
            model_dir=checkpoint,
            corematching=corematching,
            force=True,
            validate=budget == config.target_budget,
            max_prompt_tokens=sequence // 2,
            max_sequence=sequence,
        )
    )
    return out


def _ort(build: Path, name: str, config: BenchConfig) -> Measurement:
    from runtime import Pipeline

    pipeline = Pipeline.load(build, provider="cpu")
    backend = pipeline.backend
    samples: dict[str, list[float]] = {"vision": [], "prefill": [], "decode_step": [], "end_to_end": [], "overhead": []}
    for repeat in range(config.repeats + 1):  # the first run warms up
        start = time.perf_counter()
        steps: list[float] = []
        runs: list[float] = []
        stream = pipeline.stream(IMAGE, QUESTION, config.new_tokens, stop_at_eos=False)
        for _ in stream:
            if pipeline.last.timings["decode"] and len(steps) < len(pipeline.last.timings["decode"]):
                steps.append(pipeline.last.timings["decode"][-1])
                runs.append(backend.last_run_seconds)
        total = time.perf_counter() - start
        if repeat == 0:
            continue
        timings = pipeline.last.timings
        samples["vision"].append(timings["vision"])
        samples["prefill"].append(timings["prefill"])
        samples["decode_step"].append(_median(timings["decode"]))
        samples["end_to_end"].append(total)
        samples["overhead"].append(_median([(s - r) / s for s, r in zip(steps, runs, strict=True)]))
    manifest = pipeline.manifest
    kept = (
        manifest["model"]["num_image_tokens"]
        if manifest["corematching"]["dense"]
        else manifest["corematching"]["token_budget"]
    )
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
        kv_cache_bytes=_kv_bytes(manifest, pipeline.last),
        samples={k: v for k, v in samples.items()},
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


def _weight_bytes(build: Path, manifest: dict[str, Any]) -> int:
    """The build's weight bytes: weights.bin (each weight once) and the graphs' own small constants."""
    names = [name for name in manifest["files"] if name.endswith((".onnx", ".onnx.data", ".bin"))]
    return sum((build / name).stat().st_size for name in names)


def _kv_bytes(manifest: dict[str, Any], answer: Any) -> int:
    model, cm = manifest["model"], manifest["corematching"]
    per_token = 2 * model["num_kv_heads"] * model["head_dim"] * (2 if manifest["precision"] == "float16" else 4)
    total_len = answer.prompt_tokens + len(answer.token_ids)
    if cm["dense"]:
        return model["num_layers"] * total_len * per_token
    kept = total_len - model["num_image_tokens"] + cm["token_budget"]
    full = cm["prune_layer"] + 1
    return (full * total_len + (model["num_layers"] - full) * kept) * per_token


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
        cm = CoreMatchingConfig.dense(n_img) if budget is None else CoreMatchingConfig(token_budget=budget)
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


def torch_device_figures(preset: Any, device: str, budget: int, repeats: int, dtype: Any = None) -> dict[str, Any]:
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
        rows.append(
            {"name": name, "prefill": _median([r[0] for r in runs]), "decode_step": _median([r[1] for r in runs])}
        )
    gpu = torch.cuda.get_device_name(torch.device(device)) if cuda else platform.processor() or "cpu"
    return {
        "device": gpu,
        "preset": spec.name,
        "dtype": str(dtype).replace("torch.", ""),
        "prompt_tokens": ids.shape[1],
        "rows": rows,
    }


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = 0
    from importlib import metadata

    versions = {}
    for package in ("onnxruntime", "torch", "transformers", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": memory,
        "python": platform.python_version(),
        "system": platform.platform(),
        "versions": versions,
    }


def run_bench(config: BenchConfig, stage: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    config.work.mkdir(parents=True, exist_ok=True)
    stage("checkpoint")
    checkpoint, preset = _checkpoint(config)
    hf = preset.hf_config()
    geometry = DecoderGeometry.from_text_config(hf.text_config)
    n_img = preset.num_image_tokens
    measurements: list[Measurement] = []
    builds: dict[str, Path] = {}
    for budget in (None, *config.budgets):
        name = "dense" if budget is None else f"k{budget}"
        stage(f"build {name}")
        builds[name] = _build(config, checkpoint, preset, budget, f"{preset.name}-{name}")
    for name, build in builds.items():
        stage(f"measure onnxruntime {name}")
        measurements.append(_ort(build, f"onnxruntime {name}", config))
    if config.torch_baselines:
        stage("measure transformers and the reference")
        measurements += _torch(checkpoint, config, [None, *config.budgets])

    manifest = json.loads((builds["dense"] / "manifest.json").read_text())
    from runtime.text import PromptTokenizer

    prompt_tokens = int(PromptTokenizer.from_build(builds["dense"], manifest).encode(QUESTION).shape[1])
    for m in measurements:
        budgets = (
            None
            if m.kept_tokens == n_img and "dense" in m.name
            else CoreMatchingConfig(token_budget=m.kept_tokens).resolve(
                num_layers=geometry.num_layers, intermediate_size=geometry.intermediate_size, num_image_tokens=n_img
            )
        )
        m.prefill_flops = prefill_flops(geometry, prompt_tokens, budgets)
        m.decode_flops = decode_flops(geometry, prompt_tokens, budgets)
        m.decode_bytes = decode_bytes(geometry, prompt_tokens, budgets)
    report = _report(config, preset, prompt_tokens, measurements)
    report["gpu"] = {"skipped": "no CUDA GPU on this machine"}
    if config.torch_baselines and _cuda_available():
        stage(f"measure PyTorch on the GPU at {config.gpu_preset} geometry")
        report["gpu"] = torch_device_figures(config.gpu_preset, "cuda", config.target_budget, config.repeats)
    stage("write")
    write_report(report, config.out)
    return report


def _report(config: BenchConfig, preset: Any, prompt_tokens: int, measurements: list[Measurement]) -> dict[str, Any]:
    by_name = {m.name: m for m in measurements}
    dense = by_name["onnxruntime dense"]
    hf = by_name.get("transformers eager dense")
    rows = []
    for m in measurements:
        rows.append(
            asdict(m)
            | {
                "prefill_speedup": dense.prefill / m.prefill,
                "decode_speedup": dense.decode_step / m.decode_step,
                "end_to_end_speedup": dense.end_to_end / m.end_to_end,
                "end_to_end_vs_transformers": None if hf is None else hf.end_to_end / m.end_to_end,
                "prefill_flops_ratio": dense.prefill_flops / m.prefill_flops,
                "decode_flops_ratio": dense.decode_flops / m.decode_flops,
                "decode_bytes_ratio": dense.decode_bytes / m.decode_bytes,
                "prefill_efficiency": (dense.prefill / m.prefill) / (dense.prefill_flops / m.prefill_flops),
                "decode_efficiency": (dense.decode_step / m.decode_step) / (dense.decode_bytes / m.decode_bytes),
            }
        )
    target = (
        next(r for r in rows if r["name"] == f"onnxruntime k{config.target_budget}")
        if any(r["name"] == f"onnxruntime k{config.target_budget}" for r in rows)
        else None
    )
    targets = []
    if target is not None:
        targets = [
            _target(
                "prefill speedup >= 0.9 x analytic FLOPs ratio",
                target["prefill_speedup"],
                0.9 * target["prefill_flops_ratio"],
            ),
            _target(
                "decode-step speedup >= 0.85 x ratio of bytes read per step",
                target["decode_speedup"],
                0.85 * target["decode_bytes_ratio"],
            ),
            _target("end to end >= 3x the dense ONNX build", target["end_to_end_speedup"], 3.0),
            _target("Python overhead < 5% of a decode step", 0.05, target["python_overhead"], "share"),
            _target(
                "peak memory <= 1.3 x the build's weight bytes",
                1.3 * target["weight_bytes"],
                target["peak_memory_bytes"],
                "bytes",
            ),
        ]
        if target["end_to_end_vs_transformers"] is not None:
            targets.insert(
                3, _target("end to end >= 5x transformers eager dense", target["end_to_end_vs_transformers"], 5.0)
            )
    budgets = ",".join(map(str, config.budgets))
    preset_name = config.preset if isinstance(config.preset, str) else config.preset.name
    return {
        "command": f"python -m export bench --preset {preset_name} --budgets {budgets} --repeats {config.repeats} "
        f"--new-tokens {config.new_tokens}",
        "machine": machine(),
        "preset": preset_name,
        "prompt_tokens": prompt_tokens,
        "num_image_tokens": preset.num_image_tokens,
        "new_tokens": config.new_tokens,
        "repeats": config.repeats,
        "target_budget": config.target_budget,
        "rows": rows,
        "targets": targets,
    }


def _target(what: str, value: float, bound: float, kind: str = "ratio") -> dict[str, Any]:
    """met when value >= bound (for "share" and "bytes" the arguments are (limit, measured))."""
    if kind == "ratio":
        return {"target": what, "measured": value, "required": bound, "met": value >= bound}
    limit, measured = value, bound
    return {"target": what, "measured": measured, "required": limit, "met": measured <= limit}


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(report))
    plot(report, out)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Benchmarks: CoreMatching builds against dense",
        "",
        f"Produced by `{report['command']}` on {m['cpu']} ({m['cores']} cores, "
        f"{m['memory_bytes'] / 2**30:.0f} GiB), {m['system']}, onnxruntime {m['versions']['onnxruntime']}, "
        f"torch {m['versions']['torch']}.",
        f"Model: preset `{report['preset']}`, random weights; prompt {report['prompt_tokens']} tokens "
        f"({report['num_image_tokens']} image); "
        f"{report['new_tokens']} new tokens; medians of {report['repeats']} repeats after a warm-up. "
        "Speedups are against the dense ONNX build measured in the same run.",
        "",
        "| configuration | kept image tokens | vision ms | prefill ms | decode step ms | end to end ms "
        "| prefill speedup (FLOPs ratio, efficiency) | decode speedup (bytes ratio, efficiency) "
        "| end-to-end speedup | vs transformers | Python overhead | peak memory MB | KV cache MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:

        def opt(value: Any, fmt: str) -> str:
            return "-" if value is None else format(value, fmt)

        lines.append(
            f"| {r['name']} | {r['kept_tokens']} | {_ms(r['vision'])} | {_ms(r['prefill'])} | {_ms(r['decode_step'])} "
            f"| {_ms(r['end_to_end'])} | {r['prefill_speedup']:.2f}x ({r['prefill_flops_ratio']:.2f}x, "
            f"{r['prefill_efficiency']:.2f}) | {r['decode_speedup']:.2f}x ({r['decode_bytes_ratio']:.2f}x, "
            f"{r['decode_efficiency']:.2f}) | {r['end_to_end_speedup']:.2f}x "
            f"| {opt(r['end_to_end_vs_transformers'], '.2f')} "
            f"| {opt(r['python_overhead'] and 100 * r['python_overhead'], '.1f')}{'%' if r['python_overhead'] else ''} "
            f"| {opt(r['peak_memory_bytes'] and r['peak_memory_bytes'] / 2**20, '.0f')} "
            f"| {opt(r['kv_cache_bytes'] and r['kv_cache_bytes'] / 2**20, '.1f')} |"
        )
    if report["targets"]:
        lines += [
            "",
            f"## Targets (ONNX Runtime CPU, k = {report['target_budget']}, prune layer 2)",
            "",
            "| target | measured | required | met |",
            "|---|---:|---:|---|",
        ]
        for t in report["targets"]:
            fmt = (
                (lambda v: f"{v / 2**20:.0f} MB")
                if "memory" in t["target"]
                else ((lambda v: f"{100 * v:.1f}%") if "overhead" in t["target"] else (lambda v: f"{v:.2f}x"))
            )
            lines.append(
                f"| {t['target']} | {fmt(t['measured'])} | {fmt(t['required'])} | {'yes' if t['met'] else '**no**'} |"
            )
    gpu = report.get("gpu") or {}
    if gpu.get("rows"):
        lines += [
            "",
            f"## PyTorch on {gpu['device']} ({gpu['preset']} geometry, random {gpu['dtype']} weights, "
            f"{gpu['prompt_tokens']}-token prompt)",
            "",
            "| configuration | prefill ms | decode step ms |",
            "|---|---:|---:|",
        ]
        lines += [f"| {r['name']} | {_ms(r['prefill'])} | {_ms(r['decode_step'])} |" for r in gpu["rows"]]
    elif gpu.get("skipped"):
        lines += ["", f"PyTorch on a GPU at llava-1.5-7b geometry: not measured ({gpu['skipped']})."]
    lines += [
        "",
        "Plots: `latency.png` (latency against kept image tokens), `stages.png` (stage breakdown). "
        "Why targets are missed, with profiles: `analysis.md`.",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for engine, style in (("onnxruntime", "o-"), ("coreMatching", "s--")):
        points = sorted((r["kept_tokens"], r) for r in rows if r["engine"] == engine)
        if not points:
            continue
        axes[0].plot([k for k, _ in points], [r["prefill"] * 1e3 for _, r in points], style, label=f"{engine}")
        axes[1].plot([k for k, _ in points], [r["end_to_end"] * 1e3 for _, r in points], style, label=f"{engine}")
    for r in rows:
        if r["engine"] == "transformers":
            axes[0].axhline(r["prefill"] * 1e3, color="gray", linestyle=":", label="transformers eager dense")
            axes[1].axhline(r["end_to_end"] * 1e3, color="gray", linestyle=":", label="transformers eager dense")
    for ax, title in zip(axes, ("prefill", f"end to end ({report['new_tokens']} new tokens)"), strict=True):
        ax.set_xlabel("kept image tokens (576 = dense)")
        ax.set_ylabel("ms (median)")
        ax.set_title(title)
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['preset']}: latency against kept image tokens")
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(11, 4.5))
    names = [r["name"] for r in rows]
    vision = [r["vision"] * 1e3 for r in rows]
    prefill = [r["prefill"] * 1e3 for r in rows]
    decode = [r["decode_step"] * 1e3 * (report["new_tokens"] - 1) for r in rows]
    ax.barh(names, vision, label="vision")
    ax.barh(names, prefill, left=vision, label="prefill")
    ax.barh(
        names,
        decode,
        left=[a + b for a, b in zip(vision, prefill, strict=True)],
        label=f"{report['new_tokens'] - 1} decode steps",
    )
    ax.set_xlabel("ms (medians)")
    ax.invert_yaxis()
    ax.legend()
    ax.set_title(f"{report['preset']}: where the time goes")
    fig.tight_layout()
    fig.savefig(out / "stages.png", dpi=110)
    plt.close(fig)
