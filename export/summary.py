"""The tables `python -m export build` and `validate` end with (entry-point output only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from buildformat import ValidationRecord


def _size(path: Path) -> str:
    n = path.stat().st_size
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def print_validation(report: ValidationRecord, console: Console | None = None) -> None:
    """One column per case, one row per check (fits a narrow terminal)."""
    console = console or Console()
    table = Table(title=f"validation against {report.reference} ({report.precision})")
    table.add_column("check")
    for case in report.cases:
        table.add_column(case.name)

    def row(label: str, cell: Any) -> None:
        table.add_row(label, *(cell(case) for case in report.cases))

    row("prompt tokens", lambda c: str(c.prompt_tokens))
    row("max |Δ logits|", lambda c: f"{c.max_logit_diff:.2e}")
    row("tolerance", lambda c: f"{c.tolerance:.2e}")
    row("max |Δ image features|", lambda c: f"{c.max_vision_diff:.2e}")
    row("equal greedy tokens", lambda c: f"{c.equal_tokens}/{c.steps}")
    row("kept image tokens", lambda c: "all" if c.kept_image_tokens is None else str(c.kept_image_tokens))
    row("same kept tokens", lambda c: "-" if c.kept_overlap is None else f"{c.kept_overlap:.0%}")
    row("same core neurons", lambda c: "-" if c.core_overlap is None else f"{c.core_overlap:.0%} (worst layer)")
    row("result", lambda c: "[green]passed[/green]" if c.passed else f"[red]{'; '.join(c.problems)}[/red]")
    console.print(table)


def print_summary(result: Any, console: Console | None = None) -> None:
    console = console or Console()
    manifest = result.manifest
    q = manifest.quantization
    weights = "" if q is None else f", {q.weights} weights" + (f" (blocks of {q.block_size})" if q.block_size else "")
    graphs = Table(title=f"build {result.out} ({manifest.precision}{weights}, opset {manifest.opset})")
    for column in ("graph", "file", "size", "inputs", "outputs"):
        graphs.add_column(column)
    for name, graph in manifest.graphs.items():
        graphs.add_row(
            name, graph.file, _size(result.out / graph.file), str(len(graph.inputs)), str(len(graph.outputs))
        )
    console.print(graphs)

    cm, model = manifest.corematching, manifest.model
    budgets = Table(title="budgets", show_header=False)
    if cm is None:
        budgets.add_row("mode", "dense (every image token, every neuron)")
    else:
        budgets.add_row("kept image tokens k", f"{cm.token_budget} of {model.num_image_tokens}")
        budgets.add_row("token selector / merge", f"{cm.token_selector} / {cm.token_merge}")
        budgets.add_row("prune layer", str(cm.prune_layer))
        budgets.add_row(
            "k_tok / N core neurons",
            f"{cm.tokens_per_neuron_set} / {cm.core_neurons} of {model.intermediate_size} (chunks: {cm.neuron_chunks})",
        )
        static = manifest.static_neurons
        if static is not None:
            budgets.add_row(
                "static neuron set",
                f"layers {', '.join(map(str, static.layers))}: {static.neurons} of {static.intermediate_size} "
                f"neurons ({static.calibration})",
            )
        else:
            budgets.add_row("neuron-sparse layers", f"{cm.neuron_layers[0]}..{cm.neuron_layers[1] - 1}")
    trt = "compatible" if manifest.tensorrt_compatible else f"not compatible: {manifest.tensorrt_reason}"
    budgets.add_row("TensorRT", trt)
    flops = manifest.flops
    if flops is not None and flops.prefill_corematching and flops.decode_corematching:
        budgets.add_row(
            f"FLOPs ({flops.prompt_tokens}-token prompt)",
            f"prefill {flops.prefill_dense / flops.prefill_corematching:.2f}x fewer, "
            f"decode step {flops.decode_dense / flops.decode_corematching:.2f}x fewer than dense",
        )
    console.print(budgets)
    if result.validation is not None:
        print_validation(result.validation, console)
    else:
        console.print("[yellow]validation skipped (--no-validate)[/yellow]")
    console.print(f"built in {result.seconds:.1f} s: {result.out}")
