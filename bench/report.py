"""The benchmark's report: measurements of `bench.measure` in, bench.json, bench.md and two plots out.

Pure functions of data; nothing here measures or starts a process. `build_report` turns the
measurements into a `bench.records.BenchReport`: speedups against the dense ONNX build and against
`transformers`, the analytic FLOPs ratios, the efficiency (measured speedup / analytic ratio; for
a decode step the analytic ratio is that of the bytes it reads, since a step is memory bound), and
the targets of issue 6. `write_report` writes it to `<out>/bench.json`, `<out>/bench.md`
(`markdown`) and `<out>/latency.png`, `<out>/stages.png` (`plot`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.config import BenchConfig
from bench.records import BenchReport, GpuFigures, GpuSkipped, Machine, Measurement, ReportRow, Target


def build_report(
    config: BenchConfig,
    num_image_tokens: int,
    prompt_tokens: int,
    measurements: Sequence[Measurement],
    machine: Machine,
    gpu: GpuFigures | GpuSkipped,
) -> BenchReport:
    """The report of one run.

    `measurements` must hold "onnxruntime dense" (the speedups' reference), every one with its FLOPs and
    bytes filled in; `gpu` is the GPU section (`bench.measure.torch_device_figures`, or why it was skipped).
    """
    by_name = {m.name: m for m in measurements}
    dense = by_name["onnxruntime dense"]
    hf = by_name.get("transformers eager dense")
    rows = tuple(_row(m, dense, hf) for m in measurements)
    target = next((r for r in rows if r.name == f"onnxruntime k{config.target_budget}"), None)
    budgets = ",".join(map(str, config.budgets))
    return BenchReport(
        command=f"python -m bench --preset {config.preset_name} --budgets {budgets} --repeats {config.repeats} "
        f"--new-tokens {config.new_tokens}",
        machine=machine,
        preset=config.preset_name,
        prompt_tokens=prompt_tokens,
        num_image_tokens=num_image_tokens,
        new_tokens=config.new_tokens,
        repeats=config.repeats,
        target_budget=config.target_budget,
        rows=rows,
        targets=() if target is None else _targets(target),
        gpu=gpu,
    )


def _row(m: Measurement, dense: Measurement, hf: Measurement | None) -> ReportRow:
    return ReportRow(
        measurement=m,
        prefill_speedup=dense.prefill / m.prefill,
        decode_speedup=dense.decode_step / m.decode_step,
        end_to_end_speedup=dense.end_to_end / m.end_to_end,
        end_to_end_vs_transformers=None if hf is None else hf.end_to_end / m.end_to_end,
        prefill_flops_ratio=dense.prefill_flops / m.prefill_flops,
        decode_flops_ratio=dense.decode_flops / m.decode_flops,
        decode_bytes_ratio=dense.decode_bytes / m.decode_bytes,
        prefill_efficiency=(dense.prefill / m.prefill) / (dense.prefill_flops / m.prefill_flops),
        decode_efficiency=(dense.decode_step / m.decode_step) / (dense.decode_bytes / m.decode_bytes),
    )


def _targets(row: ReportRow) -> tuple[Target, ...]:
    """Issue 6's targets for the target budget's ONNX row (the one with the memory and overhead figures)."""
    m = row.measurement
    if m.python_overhead is None or m.weight_bytes is None or m.peak_memory_bytes is None:
        raise ValueError(f"{m.name} lacks the overhead or memory figures its targets need")
    targets = [
        Target.at_least(
            "prefill speedup >= 0.9 x analytic FLOPs ratio", row.prefill_speedup, 0.9 * row.prefill_flops_ratio
        ),
        Target.at_least(
            "decode-step speedup >= 0.85 x ratio of bytes read per step",
            row.decode_speedup,
            0.85 * row.decode_bytes_ratio,
        ),
        Target.at_least("end to end >= 3x the dense ONNX build", row.end_to_end_speedup, 3.0),
        Target.at_most("Python overhead < 5% of a decode step", m.python_overhead, 0.05),
        Target.at_most("peak memory <= 1.3 x the build's weight bytes", m.peak_memory_bytes, 1.3 * m.weight_bytes),
    ]
    if row.end_to_end_vs_transformers is not None:
        targets.insert(
            3, Target.at_least("end to end >= 5x transformers eager dense", row.end_to_end_vs_transformers, 5.0)
        )
    return tuple(targets)


def write_report(report: BenchReport, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    (out / "bench.md").write_text(markdown(report))
    plot(report, out)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _opt(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(report: BenchReport) -> str:
    m, v = report.machine, report.machine.versions
    lines = [
        "# Benchmarks: CoreMatching builds against dense",
        "",
        f"Produced by `{report.command}` on {m.cpu} ({m.cores} cores, "
        f"{m.memory_bytes / 2**30:.0f} GiB), {m.system}, onnxruntime {v.onnxruntime}, torch {v.torch}.",
        f"Model: preset `{report.preset}`, random weights; prompt {report.prompt_tokens} tokens "
        f"({report.num_image_tokens} image); "
        f"{report.new_tokens} new tokens; medians of {report.repeats} repeats after a warm-up. "
        "Speedups are against the dense ONNX build measured in the same run.",
        "",
        "| configuration | kept image tokens | vision ms | prefill ms | decode step ms | end to end ms "
        "| prefill speedup (FLOPs ratio, efficiency) | decode speedup (bytes ratio, efficiency) "
        "| end-to-end speedup | vs transformers | Python overhead | peak memory MB | KV cache MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report.rows:
        x = r.measurement
        # `and`: a missing figure (None) prints "-"; an overhead of exactly 0 prints without its "%".
        lines.append(
            f"| {x.name} | {x.kept_tokens} | {_ms(x.vision)} | {_ms(x.prefill)} | {_ms(x.decode_step)} "
            f"| {_ms(x.end_to_end)} | {r.prefill_speedup:.2f}x ({r.prefill_flops_ratio:.2f}x, "
            f"{r.prefill_efficiency:.2f}) | {r.decode_speedup:.2f}x ({r.decode_bytes_ratio:.2f}x, "
            f"{r.decode_efficiency:.2f}) | {r.end_to_end_speedup:.2f}x "
            f"| {_opt(r.end_to_end_vs_transformers, '.2f')} "
            f"| {_opt(x.python_overhead and 100 * x.python_overhead, '.1f')}{'%' if x.python_overhead else ''} "
            f"| {_opt(x.peak_memory_bytes and x.peak_memory_bytes / 2**20, '.0f')} "
            f"| {_opt(x.kv_cache_bytes and x.kv_cache_bytes / 2**20, '.1f')} |"
        )
    if report.targets:
        lines += [
            "",
            f"## Targets (ONNX Runtime CPU, k = {report.target_budget}, prune layer 2)",
            "",
            "| target | measured | required | met |",
            "|---|---:|---:|---|",
        ]
        for t in report.targets:
            fmt = (
                (lambda v: f"{v / 2**20:.0f} MB")
                if "memory" in t.target
                else ((lambda v: f"{100 * v:.1f}%") if "overhead" in t.target else (lambda v: f"{v:.2f}x"))
            )
            lines.append(f"| {t.target} | {fmt(t.measured)} | {fmt(t.required)} | {'yes' if t.met else '**no**'} |")
    gpu = report.gpu
    if isinstance(gpu, GpuFigures):
        lines += [
            "",
            f"## PyTorch on {gpu.device} ({gpu.preset} geometry, random {gpu.dtype} weights, "
            f"{gpu.prompt_tokens}-token prompt)",
            "",
            "| configuration | prefill ms | decode step ms |",
            "|---|---:|---:|",
        ]
        lines += [f"| {r.name} | {_ms(r.prefill)} | {_ms(r.decode_step)} |" for r in gpu.rows]
    else:
        lines += ["", f"PyTorch on a GPU at llava-1.5-7b geometry: not measured ({gpu.reason})."]
    lines += [
        "",
        "Plots: `latency.png` (latency against kept image tokens), `stages.png` (stage breakdown). "
        "Why targets are missed, with profiles: `analysis.md`.",
        "",
    ]
    return "\n".join(lines)


def plot(report: BenchReport, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r.measurement for r in report.rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for engine, style in (("onnxruntime", "o-"), ("coreMatching", "s--")):
        points = sorted(((r.kept_tokens, r) for r in rows if r.engine == engine), key=lambda p: p[0])
        if not points:
            continue
        axes[0].plot([k for k, _ in points], [r.prefill * 1e3 for _, r in points], style, label=f"{engine}")
        axes[1].plot([k for k, _ in points], [r.end_to_end * 1e3 for _, r in points], style, label=f"{engine}")
    for r in rows:
        if r.engine == "transformers":
            axes[0].axhline(r.prefill * 1e3, color="gray", linestyle=":", label="transformers eager dense")
            axes[1].axhline(r.end_to_end * 1e3, color="gray", linestyle=":", label="transformers eager dense")
    for ax, title in zip(axes, ("prefill", f"end to end ({report.new_tokens} new tokens)"), strict=True):
        ax.set_xlabel("kept image tokens (576 = dense)")
        ax.set_ylabel("ms (median)")
        ax.set_title(title)
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report.preset}: latency against kept image tokens")
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(11, 4.5))
    names = [r.name for r in rows]
    vision = [r.vision * 1e3 for r in rows]
    prefill = [r.prefill * 1e3 for r in rows]
    decode = [r.decode_step * 1e3 * (report.new_tokens - 1) for r in rows]
    ax.barh(names, vision, label="vision")
    ax.barh(names, prefill, left=vision, label="prefill")
    ax.barh(
        names,
        decode,
        left=[a + b for a, b in zip(vision, prefill, strict=True)],
        label=f"{report.new_tokens - 1} decode steps",
    )
    ax.set_xlabel("ms (medians)")
    ax.invert_yaxis()
    ax.legend()
    ax.set_title(f"{report.preset}: where the time goes")
    fig.tight_layout()
    fig.savefig(out / "stages.png", dpi=110)
    plt.close(fig)
