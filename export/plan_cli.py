"""`python -m export plan`: the memory a deployment needs, dense and CoreMatching, and whether it fits a device.

`add_plan_parser(subparsers)` registers the subcommand (and sets `func=run_plan` as its default);
`run_plan(args)` prints a table, or one JSON object with `--json`, and returns 0; what the user must
fix (an unknown preset or device, a missing directory, a bad precision or budget) is one `error:`
line on stderr and exit code 2. Imports neither torch nor transformers: it runs on a Jetson.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from export.devices import DEVICES, PRECISIONS
from export.plan import Plan, PlanConfig, PlanError, plan
from models.presets import PRESETS

_GIB = 2**30


def add_plan_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plan",
        help="the memory a model needs on a device, dense and CoreMatching, and whether it fits",
        description=(
            "Plans the memory of a deployment from the model's geometry alone (no weights are loaded): weights, "
            "KV cache for the longest answer, CoreMatching's compacted FFN weights, peak prefill activations and "
            "the runtime's overhead, for the dense model, CoreMatching, and CoreMatching with a static neuron set; "
            "then whether each fits the device, and a lower bound on the decode-step time (bytes / bandwidth)."
        ),
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="PRESET|DIR",
        help=f"a model preset ({', '.join(PRESETS)}) or a llava-hf directory (only its config.json is read)",
    )
    parser.add_argument("--device", required=True, metavar="NAME", help=f"one of: {', '.join(DEVICES)}")
    parser.add_argument(
        "--precision",
        default=None,
        metavar="|".join(PRECISIONS),
        help="bytes per weight (int8 is planning-only: no int8 graphs are exported yet); "
        "default: the device's recommended precision (fp32 on a Titan Xp, fp16 on Orin)",
    )
    parser.add_argument("--token-budget", default="64", metavar="K", help="image tokens kept, k (default 64)")
    parser.add_argument(
        "--max-sequence", default="2048", metavar="N", help="prompt + longest answer, in tokens (default 2048)"
    )
    parser.add_argument(
        "--prompt-tokens", default=None, metavar="S", help="prompt length, image included (default: image + 40)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object (every figure in bytes)")
    parser.set_defaults(func=run_plan)
    return parser


def _integer(text: str | None, flag: str) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise PlanError(f"{flag} must be a positive integer, got {text!r}") from None


def config_from_args(args: argparse.Namespace) -> PlanConfig:
    """The PlanConfig of parsed flags; PlanError for a value that is not an integer or out of range."""
    return PlanConfig(
        model=args.model,
        device=args.device,
        precision=args.precision,
        token_budget=_integer(args.token_budget, "--token-budget"),  # type: ignore[arg-type]
        max_sequence=_integer(args.max_sequence, "--max-sequence"),  # type: ignore[arg-type]
        prompt_tokens=_integer(args.prompt_tokens, "--prompt-tokens"),
    )


def run_plan(args: argparse.Namespace) -> int:
    try:
        result = plan(config_from_args(args))
    except PlanError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the message holds
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print_plan(result)
    return 0


def _gib(n: int) -> str:
    return f"{n / _GIB:.2f}"


def _fit(total: int, usable: int) -> str:
    room = usable - total
    return f"[green]yes, {room / _GIB:.2f} free[/green]" if room >= 0 else f"[red]no, {-room / _GIB:.2f} short[/red]"


def print_plan(p: Plan, console: Any = None) -> None:
    """The table and the notes (entry-point output only)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    dev, cfg, b = p.device, p.config, p.budgets
    table = Table(
        title=f"{p.model.name} on {dev.title}, {p.precision}: {p.prompt_tokens}-token prompt, cache for "
        f"{cfg.max_sequence} tokens, k = {b.token_budget} of {p.model.num_image_tokens} image tokens (GiB)"
    )
    table.add_column("")
    for header in ("dense", "CoreMatching", "CoreMatching, static neurons"):
        table.add_column(header, justify="right")
    estimates = list(p.estimates.values())

    def row(label: str, cell: Any) -> None:
        table.add_row(label, *(cell(e) for e in estimates))

    row("weights", lambda e: _gib(e.weights))
    row(f"KV cache ({cfg.max_sequence} tokens)", lambda e: _gib(e.kv_cache))
    row("compacted FFN per request", lambda e: _gib(e.compacted_ffn))
    row("peak activations (prefill)", lambda e: _gib(e.activations))
    row("runtime overhead (estimate)", lambda e: _gib(e.runtime_overhead))
    row("[bold]total[/bold]", lambda e: f"[bold]{_gib(e.total)}[/bold]")
    row(f"fits ({dev.usable_gb:g} of {dev.memory_gb:g} GiB usable)", lambda e: _fit(e.total, dev.usable_bytes))
    row("+ decode graph's own weights", lambda e: f"+{_gib(e.unshared_decode_weights)}")
    row("fits, weights not shared", lambda e: _fit(e.total_unshared, dev.usable_bytes))
    row("decode step ≥ (ms, first-last)", lambda e: f"{e.decode_ms_first:.0f}-{e.decode_ms_last:.0f}")
    console.print(table)
    sparse = len(b.neuron_sparse_layers)
    console.print(
        f"static neuron set: the FFN of the {sparse} sparse layers (layers {b.neuron_layers[0]}.."
        f"{b.neuron_layers[1] - 1}) narrowed from D = {p.model.intermediate_size} to N = {b.core_neurons} saves "
        f"{_gib(p.static_saving)} GiB; prune layer {b.prune_layer}, k_tok = {b.tokens_per_neuron_set}",
        highlight=False,
    )
    console.print(
        "weights not shared: prefill and decode as separate sessions or TensorRT engines each hold the decoder "
        "weights (the runtime today); decode-step times are bytes read / "
        f"{dev.bandwidth_gbps:g} GB/s, a lower bound",
        highlight=False,
    )
    console.print(
        f"recommended on {dev.title} (SM {dev.compute_capability}): {dev.recommended_precision}, TensorRT "
        f"{dev.recommended_tensorrt}; TensorRT available: {dev.tensorrt}",
        highlight=False,
    )
    for note in p.notes:
        console.print(f"- {note}", highlight=False)
