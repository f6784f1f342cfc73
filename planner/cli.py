"""`python -m planner`: the memory a deployment needs, dense and CoreMatching, whether it fits a device, and
which configuration to deploy on each device.

`build_parser()` makes the parser; `run_plan(args)` prints a table, or one JSON object with `--json`,
and returns 0; what the user must fix (an unknown preset, device, runtime or precision, a missing
directory, a bad budget) is one `error:` line on stderr and exit code 2.
Imports neither torch nor transformers: it runs on a Jetson.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from models.presets import PRESETS
from planner.devices import DEVICES, HOST, PRECISIONS
from planner.footprint import SHARINGS
from planner.plan import Estimate, Plan, PlanConfig, PlanError, plan
from planner.recommend import MARGIN_BYTES, RULE, Recommendation, recommend
from planner.runtimes import ACTIVATION_PRECISIONS, RUNTIMES, WEIGHT_PRECISIONS

_GIB = 2**30


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m planner",
        description=(
            "Plans the memory of a deployment from the model's geometry alone (no weights are loaded): weights as "
            "the runtime holds them, KV cache for the longest answer, CoreMatching's compacted FFN weights, peak "
            "activations and the runtime's overhead, for the dense model, CoreMatching, and CoreMatching with a "
            "static neuron set; then whether each fits the device, and a lower bound on the decode-step time. "
            "--recommend (or --device all) prints the configuration to deploy on every device."
        ),
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="PRESET|DIR",
        help=f"a model preset ({', '.join(PRESETS)}) or a llava-hf directory (only its config.json is read)",
    )
    parser.add_argument(
        "--device", default=None, metavar="NAME", help=f"one of: {', '.join(DEVICES)}, {HOST.name} (the host), all"
    )
    parser.add_argument(
        "--weights",
        default=None,
        metavar="|".join(WEIGHT_PRECISIONS),
        help="the weights' precision (int8/int4: weight-only quantization); default: the activations'",
    )
    parser.add_argument(
        "--activations",
        default=None,
        metavar="|".join(ACTIVATION_PRECISIONS),
        help="activations, KV cache and scales; default: the device's (fp32 on a Titan Xp, fp16 on Orin)",
    )
    parser.add_argument(
        "--precision",
        default=None,
        metavar="|".join(PRECISIONS),
        help="deprecated: fp32 = --weights fp32 --activations fp32, fp16 = fp16/fp16, int8 = int8 weights, fp16 "
        "activations",
    )
    parser.add_argument(
        "--runtime", default=None, metavar="NAME", help=f"one of: {', '.join(RUNTIMES)}; default: the device's"
    )
    parser.add_argument("--token-budget", default="64", metavar="K", help="image tokens kept, k (default 64)")
    parser.add_argument(
        "--max-sequence", default="2048", metavar="N", help="prompt + longest answer, in tokens (default 2048)"
    )
    parser.add_argument(
        "--prompt-tokens", default=None, metavar="S", help="prompt length, image included (default: image + 40)"
    )
    parser.add_argument("--block-size", default="32", metavar="B", help="int4 block size (default 32)")
    parser.add_argument(
        "--sharing",
        default="runtime",
        metavar="|".join(SHARINGS),
        help="the decoder stacks' weights, which prefill and decode both read: as the runtime holds them, one "
        "copy (default), a copy per prefill and decode session or engine (separate, an opt-in), or shared (the "
        "old spelling of one copy)",
    )
    parser.add_argument(
        "--recommend", action="store_true", help="the configuration to deploy on each device (or on --device)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object (every figure in bytes)")
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
    if args.device is None:
        raise PlanError("--device is required (or --recommend for every device)")
    return PlanConfig(
        model=args.model,
        device=args.device,
        precision=args.precision,
        token_budget=_integer(args.token_budget, "--token-budget"),  # type: ignore[arg-type]
        max_sequence=_integer(args.max_sequence, "--max-sequence"),  # type: ignore[arg-type]
        prompt_tokens=_integer(args.prompt_tokens, "--prompt-tokens"),
        weights=args.weights,
        activations=args.activations,
        runtime=args.runtime,
        block_size=_integer(args.block_size, "--block-size"),  # type: ignore[arg-type]
        sharing=args.sharing,
    )


def run_plan(args: argparse.Namespace) -> int:
    try:
        if args.recommend or args.device == "all":
            names = list(DEVICES) if args.device in (None, "all") else [args.device]
            budget = _integer(args.token_budget, "--token-budget")
            sequence = _integer(args.max_sequence, "--max-sequence")
            prompt = _integer(args.prompt_tokens, "--prompt-tokens")
            results = [recommend(args.model, n, budget, sequence, prompt, sharing=args.sharing) for n in names]  # type: ignore[arg-type]
        else:
            result = plan(config_from_args(args))
    except PlanError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the message holds
        return 2
    if args.precision is not None:
        print("note: --precision is deprecated; use --weights and --activations", file=sys.stderr)
    if args.recommend or args.device == "all":
        if args.json:
            print(
                json.dumps(
                    {"rule": RULE.format(margin=MARGIN_BYTES / _GIB), "devices": [r.to_dict() for r in results]},
                    indent=2,
                )
            )
        else:
            print_recommendations(args.model, results)
    elif args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print_plan(result)
    return 0


def _gib(n: int) -> str:
    return f"{n / _GIB:.2f}"


def _fit(e: Estimate, total: int, usable: int | None, runtime: str) -> str:
    if not e.runnable:
        return f"[red]not on {runtime}[/red]"
    if usable is None:
        return "no limit checked"
    room = usable - total
    return f"[green]yes, {room / _GIB:.2f} free[/green]" if room >= 0 else f"[red]no, {-room / _GIB:.2f} short[/red]"


def print_plan(p: Plan, console: Any = None) -> None:
    """The table and the notes (entry-point output only)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    dev, cfg, b, rt = p.device, p.config, p.budgets, p.runtime
    table = Table(
        title=f"{p.model.name} on {dev.title} with {rt.title}: {p.weights} weights, {p.activations} activations; "
        f"{p.prompt_tokens}-token prompt, cache for {cfg.max_sequence} tokens, k = {b.token_budget} of "
        f"{p.model.num_image_tokens} image tokens (GiB)"
    )
    table.add_column("")
    for header in ("dense", "CoreMatching", "CoreMatching, static neurons"):
        table.add_column(header, justify="right")
    estimates = list(p.estimates.values())

    def row(label: str, cell: Any) -> None:
        table.add_row(label, *(cell(e) for e in estimates))

    held = "weights, as the runtime holds them" + ("" if cfg.sharing == "runtime" else f" ({cfg.sharing})")
    row(held, lambda e: _gib(e.weights))
    row(f"weights as built ({p.weights})", lambda e: _gib(e.weights_stored))
    row(f"KV cache ({cfg.max_sequence} tokens)", lambda e: _gib(e.kv_cache))
    row("compacted FFN per request", lambda e: _gib(e.compacted_ffn))
    row("activations (working sets held)", lambda e: _gib(e.activations))
    if any(e.load_transient for e in estimates):
        row("held while a session is built", lambda e: _gib(e.load_transient))
    row("runtime overhead (estimate)", lambda e: _gib(e.runtime_overhead))
    row("[bold]total[/bold]", lambda e: f"[bold]{_gib(e.total)}[/bold]")
    usable = dev.usable_bytes
    limit = "" if usable is None else f" ({dev.usable_gb:g} of {dev.memory_gb:g} GiB usable)"
    row(f"fits{limit}", lambda e: _fit(e, e.total, usable, rt.name))
    if any(e.unshared_decode_weights for e in estimates):
        row("opt-in: separate engines add", lambda e: f"+{_gib(e.unshared_decode_weights)}")
        row("fits with separate engines", lambda e: _fit(e, e.total_unshared, usable, rt.name))
    if any(e.shared_saving for e in estimates):
        row("one copy (the default) would save", lambda e: f"-{_gib(e.shared_saving)}")
        row("fits with one copy", lambda e: _fit(e, e.total - e.shared_saving, usable, rt.name))
    row("decode step ≥ (ms, first-last)", lambda e: f"{e.decode_ms_first:.0f}-{e.decode_ms_last:.0f}")
    console.print(table)
    narrowed = b.narrowable_layers
    static_n = b.static_width(p.config.block_size if p.config.weights == "int4" else 1)
    console.print(
        f"static neuron set: the FFN of {len(narrowed)} sparse layers (layers {b.neuron_layers[0]}.."
        f"{b.neuron_layers[1] - 1} but the prune layer) narrowed from D = {p.model.intermediate_size} to "
        f"N = {static_n} saves "
        f"{_gib(p.static_saving)} GiB as built; prune layer {b.prune_layer}, k_tok = {b.tokens_per_neuron_set}; "
        f"decode-step times are bytes read / {dev.bandwidth_gbps:g} GB/s, a lower bound",
        highlight=False,
    )
    console.print(
        f"defaults on {dev.title} (SM {dev.compute_capability}): {dev.recommended_precision} activations, "
        f"{dev.recommended_runtime}; TensorRT available: {dev.tensorrt}; --recommend picks the configuration to deploy",
        highlight=False,
    )
    for note in p.notes:
        console.print(f"- {note}", highlight=False)


def print_recommendations(model: str, results: list[Recommendation], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    sharing = results[0].sharing if results else "runtime"
    how = "" if sharing == "runtime" else f", weights planned {sharing}"
    table = Table(title=f"{model}: the configuration to deploy on each device{how} (GiB)")
    for header in ("device", "configuration", "total", "headroom", ""):
        table.add_column(header, justify="right" if header in ("total", "headroom") else "left")
    for r in results:
        c = r.choice
        if c is None:
            table.add_row(r.device.name, "no candidate", "", "", r.status)
            continue
        label = c.label if r.status != "nothing fits" else f"closest: {c.label}"
        table.add_row(r.device.name, label, _gib(c.estimate.total), _gib(c.estimate.headroom or 0), r.status)
    console.print(table)
    console.print("rule: " + RULE.format(margin=MARGIN_BYTES / _GIB), highlight=False)
