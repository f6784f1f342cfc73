"""Memory plan of a deployment, dense and CoreMatching, against one device and runtime (`python -m planner`).

Everything is computed from the model's geometry (a preset, or a llava-hf directory's
config.json read as JSON): no weights are loaded and neither torch nor transformers is
imported, so a 7B or 13B model is planned on a laptop or on the Jetson itself.

What is counted, in bytes (docs/planning.md):

- weights: every weight of the build (`ModelGeometry.weight_groups`: each in exactly one graph, or
  bound by the runtime) at the build's storage scheme (`planner.runtimes.matmul_bytes`: fp32, fp16,
  int8 per output channel, int4 in blocks of 32), then as the runtime holds them
  (`planner.runtimes.RUNTIMES`): one copy, a precision that falls back planned at the precision it
  runs at (`--sharing separate` opts into a second copy of the decoder stacks' weights);
- KV cache sized for the longest answer (`max_sequence` tokens): CoreMatching's layers after the
  prune layer hold `max_sequence - n_img + k` tokens;
- compacted FFN weights of one request (per-request neurons: gathered once after prefill, in the
  stored form, and kept for the whole answer);
- activations: each graph's prefill working set, as the runtime keeps them (the largest, or the sum
  over sessions or execution contexts), with the float copy of a bound weight a prefill dequantizes;
  where the runtime holds more while it builds a session (ONNX Runtime's CPU packing), that instead;
- a runtime overhead per device kind (`planner.devices`).

Exact: the stored weights, the KV cache, the compacted weights. Measured factors: what ONNX Runtime's
CPU provider holds per stored byte. Estimates: activations (unfused attention assumed, so an upper
side) and the runtime overhead. Decode-step times are lower bounds: the bytes a step must read
divided by the DRAM bandwidth (decode is memory bound).

Which configuration to deploy on a device, of those planned here, is `planner.recommend`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from buildformat.names import DECODER, LOWER, NEURONS, PROFILES, SELECT, STACKS, UPPER, VISION_GRAPH
from coreMatching.config import Budgets, CoreMatchingConfig
from coreMatching.errors import ConfigError
from coreMatching.quant_scheme import WeightQuant
from planner.devices import PRECISIONS, Device, Precision, UnknownDeviceError, device
from planner.footprint import (
    SHARINGS,
    ModelGeometry,
    Neurons,
    PlanError,
    Sharing,
    held_weights,
    load_geometry,
    plan_notes,
)
from planner.runtimes import (
    DEFAULT_BLOCK_SIZE,
    FLOAT_BYTES,
    INT4_PER_REQUEST_REASON,
    ActivationPrecision,
    Runtime,
    UnknownRuntimeError,
    WeightPrecision,
    check_precisions,
    matmul_bytes,
    runtime,
)

# The deprecated `--precision`: one name for the weights and the activations. int8 meant weight-only
# int8 with fp16 activations and cache, what it planned before the builds could quantize.
PRECISION_ALIASES: dict[str, tuple[WeightPrecision, ActivationPrecision]] = {
    "fp32": ("fp32", "fp32"),
    "fp16": ("fp16", "fp16"),
    "int8": ("int8", "fp16"),
}
PROMPT_TEXT_TOKENS = 40  # the default prompt: the image plus a question and the chat template


@dataclass(frozen=True)
class PlanConfig:
    """What to plan. None takes the device's choice: its recommended activations (fp32 on a Titan Xp, fp16 on
    Orin), float weights at that precision, its recommended runtime; prompt_tokens None is n_img + 40.

    precision: deprecated, `PRECISION_ALIASES` (give weights/activations instead).
    sharing: "runtime" (what the runtime holds: one copy of every weight, `planner.runtimes`), "separate" (opt
        into prefill and decode sessions or engines that each hold the decoder stacks' weights) or "shared" (one
        copy of every weight: the old spelling, now the same as "runtime").
    """

    model: str | Path
    device: str
    precision: Precision | None = None
    token_budget: int = 64
    max_sequence: int = 2048  # prompt + the longest answer: what the KV cache is sized for
    prompt_tokens: int | None = None
    weights: WeightPrecision | None = None
    activations: ActivationPrecision | None = None
    runtime: str | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    sharing: Sharing = "runtime"
    static_neurons: int | None = None  # a built static set's width per layer (None: the default recipe's)

    def __post_init__(self) -> None:
        if not isinstance(self.model, (str, Path)) or not str(self.model).strip():
            raise PlanError(f"model must be a preset name or a directory, got {self.model!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise PlanError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precision is not None and (self.weights or self.activations):
            raise PlanError("give --weights/--activations or the deprecated --precision, not both")
        if self.static_neurons is not None and (
            not isinstance(self.static_neurons, int) or isinstance(self.static_neurons, bool) or self.static_neurons < 1
        ):
            raise PlanError(f"static-neurons must be a positive integer, got {self.static_neurons!r}")
        if self.sharing not in SHARINGS:
            raise PlanError(f"--sharing must be one of {', '.join(SHARINGS)}, got {self.sharing!r}")
        for name in ("token_budget", "max_sequence", "prompt_tokens", "block_size"):
            value = getattr(self, name)
            if value is None and name == "prompt_tokens":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlanError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        self.resolved()  # names the device, the runtime or the precisions that are wrong

    def resolved(self) -> tuple[Device, WeightPrecision, ActivationPrecision, Runtime]:
        """The device, the weights' and activations' precisions and the runtime this config plans."""
        try:
            dev = device(self.device)
        except UnknownDeviceError as e:
            raise PlanError(str(e)) from None
        if self.precision is not None:
            weights, activations = PRECISION_ALIASES[self.precision]
        else:
            float_weights = self.weights if self.weights in FLOAT_BYTES else None
            activations = self.activations or float_weights or dev.recommended_precision  # type: ignore[assignment]
            weights = self.weights or activations  # type: ignore[assignment]
        try:
            check_precisions(weights, activations)
            WeightQuant(bits=4, block_size=self.block_size)  # names the block sizes the build takes
            rt = runtime(self.runtime or dev.recommended_runtime)
        except (ConfigError, UnknownRuntimeError) as e:
            raise PlanError(str(e)) from None
        if rt.name not in dev.runtimes:
            raise PlanError(f"runtime {rt.name} is not planned on {dev.name}; its runtimes: {', '.join(dev.runtimes)}")
        return dev, weights, activations, rt


@dataclass(frozen=True)
class Estimate:
    """The memory (bytes) of one way to deploy, and what one decode step reads."""

    weights: int  # what the runtime holds (fallbacks, packing, the bound FFN weights), with `sharing`
    weights_stored: int  # the build's weights at its storage scheme (about its weights.bin)
    weights_by_part: Mapping[str, int]  # `weights` by part of the model
    kv_cache: int
    compacted_ffn: int  # per request: CoreMatching's gathered FFN weights
    activations: int  # the graphs' prefill working sets as the runtime keeps them (`Runtime.scratch_rule`)
    load_transient: int  # held on top of the weights while the largest session is built
    runtime_overhead: int
    total: int  # weights + KV cache + compacted + the larger of activations and load transient + overhead
    headroom: int | None  # usable memory of the device - total (negative: does not fit); None: no limit
    fits: bool | None
    # What opting into separate prefill and decode sessions or engines adds (a second copy of the stacks'
    # weights), and what one copy saves against `sharing` (0 unless it is "separate").
    unshared_decode_weights: int
    shared_saving: int
    decode_bytes_first: int  # read by the first decode step (the prompt cached)
    decode_bytes_last: int  # read by the last one (max_sequence cached)
    decode_ms_first: float  # lower bounds: bytes / bandwidth
    decode_ms_last: float
    runnable: bool = True  # False: the runtime cannot run this build (`reason`)
    reason: str = ""
    sharing: Sharing = "runtime"

    @property
    def total_unshared(self) -> int:
        """The total with separate sessions or engines."""
        return self.total + self.unshared_decode_weights


@dataclass(frozen=True)
class Plan:
    config: PlanConfig
    model: ModelGeometry
    device: Device
    runtime: Runtime
    weights: WeightPrecision  # as built
    activations: ActivationPrecision  # as built (the KV cache and the scales too)
    planned_weights: WeightPrecision  # what the runtime runs them at (a fallback differs)
    activation_bytes: int  # per activation and KV-cache value, as built
    compute_bytes: int  # per activation as the runtime computes them
    parameters: dict[str, int]
    budgets: Budgets
    prompt_tokens: int  # S
    kept_prompt_tokens: int  # S - n_img + k
    dense: Estimate
    corematching: Estimate  # per-request core neurons: the method
    static: Estimate  # a calibrated static neuron set baked into narrower FFN weights
    static_saving: int  # stored bytes the narrowed FFN saves
    notes: tuple[str, ...]

    @property
    def estimates(self) -> dict[str, Estimate]:
        return {"dense": self.dense, "corematching": self.corematching, "corematching_static": self.static}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary; every memory figure in bytes."""
        b, rt = self.budgets, self.runtime
        return {
            "model": {**asdict(self.model), "parameters": self.parameters},
            "device": {**asdict(self.device), "usable_bytes": self.device.usable_bytes},
            "runtime": asdict(rt),  # every fact with its source
            "weights": self.weights,
            "activations": self.activations,
            "planned_weights": self.planned_weights,
            "precision": self.config.precision,
            "activation_bytes": self.activation_bytes,
            "compute_bytes": self.compute_bytes,
            "block_size": self.config.block_size,
            "sharing": self.config.sharing,
            "tokens": {
                "image_tokens": self.model.num_image_tokens,
                "prompt_tokens": self.prompt_tokens,
                "kept_prompt_tokens": self.kept_prompt_tokens,
                "max_sequence": self.config.max_sequence,
                "answer_tokens": self.config.max_sequence - self.prompt_tokens,
            },
            "budgets": {
                **{key: getattr(b, key) for key in ("token_budget", "tokens_per_neuron_set", "core_neurons")},
                "prune_layer": b.prune_layer,
                "neuron_layers": list(b.neuron_layers),
            },
            "memory": {
                name: {**asdict(e), "weights_by_part": dict(e.weights_by_part), "total_unshared": e.total_unshared}
                for name, e in self.estimates.items()
            },
            "static_neuron_saving": self.static_saving,
            "recommended": {
                "activations": self.device.recommended_precision,
                "precision": self.device.recommended_precision,
                "runtime": self.device.recommended_runtime,
                "tensorrt": self.device.recommended_tensorrt,
            },
            "notes": list(self.notes),
        }


def plan(config: PlanConfig) -> Plan:
    """The memory plan of `config`; raises PlanError for what the model or the budgets cannot honour."""
    g = load_geometry(config.model)
    dev, weights, act, rt = config.resolved()
    ab = FLOAT_BYTES[act]
    cb = FLOAT_BYTES[rt.fp16_activations_as if act == "fp16" else "fp32"]  # what the runtime computes in
    n_img = g.num_image_tokens
    try:
        budgets = CoreMatchingConfig(token_budget=config.token_budget).resolve(
            num_layers=g.num_layers, intermediate_size=g.intermediate_size, num_image_tokens=n_img
        )
    except ConfigError as e:
        raise PlanError(str(e)) from None
    k, m = config.token_budget, config.max_sequence
    s = config.prompt_tokens if config.prompt_tokens is not None else n_img + PROMPT_TEXT_TOKENS
    if s < n_img:
        raise PlanError(f"prompt-tokens {s} is shorter than the {n_img} image tokens the prompt contains")
    if m <= s:
        raise PlanError(f"max-sequence {m} leaves no room for an answer after a {s}-token prompt")
    merged = budgets.merged_tokens  # a summary token is computed and cached too
    s_kept = g.kept_length(s, k, merged)
    sparse = len(budgets.neuron_sparse_layers)
    d, n = g.hidden_size, budgets.core_neurons
    planned = rt.handling(weights).precision(weights, act)
    block = config.block_size
    static_n = config.static_neurons or budgets.static_width(block if weights == "int4" else 1)

    def kv(tokens: int, pruned: bool) -> int:
        """All layers' cache for `tokens`; `pruned`: the layers after the prune layer hold the kept ones."""
        if not pruned:
            return g.cache_bytes(tokens, ab)
        return g.cache_bytes(tokens, ab, budgets.prune_layer, kept=k, merged=merged)

    # Per request: gate and up [d, N] columns, down [N, d] rows, gathered from the bound weights in their form
    # (int8: down's per-output-channel scales are the model's own, so not counted again).
    bound = rt.bound_precision(weights, act)
    compacted = sparse * (
        2 * matmul_bytes(d, n, bound, act, block_size=block)
        + matmul_bytes(n, d, bound, act, block_size=block, rows_gathered=True, shared_scales=bound == "int8")
    )
    vision, row = g.vision_bytes(cb), d * ab  # `row`: the embedding of the new token
    overhead, usable = dev.runtime_overhead_bytes, dev.usable_bytes
    bandwidth = dev.bandwidth_gbps * 1e9

    # The layers each build narrows or binds: a static set narrows the sparse layers but the prune layer, to N
    # rounded up to int4's block; per-request neurons bind every sparse layer's full FFN.
    narrowed = {
        "dense": ((), 0),
        "per-request": (budgets.neuron_sparse_layers, n),
        "static": (budgets.narrowable_layers, static_n),
    }

    def working_sets(neurons: Neurons, dequantized: Mapping[str, int]) -> dict[str, int]:
        """Each graph's largest working set in a prefill (the decode profile's is smaller): one layer's (unfused
        attention) plus the outputs the graph hands on (new cache entries, hidden states, FFN activations)."""
        kv_token, big_d = g.kv_bytes_per_token(ab), g.intermediate_size
        if neurons == "dense":
            return {VISION_GRAPH: vision, DECODER: g.prefill_layer_bytes(s, cb) + kv(s, False)}
        bound = budgets.neuron_sparse_layers if neurons == "per-request" else []
        full = budgets.prune_layer + 1  # layers 0..l_p: the lower stack, every token
        acts_lower = sum(1 for i in bound if i < full) * s * big_d * cb  # read by the neurons graph
        acts_upper = sum(1 for i in bound if i >= full) * s_kept * big_d * cb
        # The prune layer's FFN activation and the hidden states go to the select graph.
        handed = s * big_d * cb + s * d * cb
        sets = {
            VISION_GRAPH: vision,
            LOWER: g.prefill_layer_bytes(s, cb) + full * kv_token * s + handed + acts_lower,
            SELECT: handed + s * big_d + s * budgets.tokens_per_neuron_set * (cb + 8),  # mask, TopK values + ids
            UPPER: g.prefill_layer_bytes(s_kept, cb) + (g.num_layers - full) * kv_token * s_kept + acts_upper,
        }
        if neurons == "per-request":  # its inputs and one layer's TopK (the compacted outputs are counted apart)
            tokens = s if acts_lower else s_kept
            sets[NEURONS] = acts_lower + acts_upper + tokens * big_d + tokens * budgets.tokens_per_neuron_set * (cb + 8)
        for stack, extra in dequantized.items():
            sets[stack] += extra
        return sets

    def scratch(sets: Mapping[str, int]) -> int:
        """What the runtime holds of the graphs' working sets (`Runtime.scratch_rule`)."""
        if rt.scratch_rule == "largest":
            return max(sets.values())
        if rt.scratch_rule == "per-session":
            return sum(sets.values())
        # One context per profile of a stack's engine, each sized for the prefill; a separate decode engine's
        # context holds only the decode profile's (small, not counted).
        contexts = 1 if config.sharing == "separate" else len(PROFILES)
        return sum(size * (contexts if graph in STACKS else 1) for graph, size in sets.items())

    def estimate(neurons: Neurons, kv_cache: int, kv_first: int) -> Estimate:
        sparse_layers, width = narrowed[neurons]
        groups = g.weight_groups(neurons, sparse_layers, width, budgets.prune_layer)
        held = held_weights(groups, rt, weights, act, block, cb, config.sharing)
        per_request = compacted if neurons == "per-request" else 0
        weights_held = held.resident
        activations = scratch(working_sets(neurons, held.dequantized))
        total = weights_held + kv_cache + per_request + max(activations, held.load) + overhead
        step = held.decode_read + per_request + row
        first, last = step + kv_first, step + kv_cache
        int4_per_request = neurons == "per-request" and planned == "int4"  # refused by every build
        runnable = neurons != "per-request" or planned not in ("int8", "int4") or rt.per_request_quantized
        runnable = runnable and not int4_per_request
        why = INT4_PER_REQUEST_REASON if int4_per_request else f"{rt.name}: {rt.per_request_quantized_reason}"
        return Estimate(
            weights=weights_held,
            weights_stored=held.stored,
            weights_by_part=held.by_part,
            kv_cache=kv_cache,
            compacted_ffn=per_request,
            activations=activations,
            load_transient=held.load,
            runtime_overhead=overhead,
            total=total,
            headroom=None if usable is None else usable - total,
            fits=None if usable is None else total <= usable,
            unshared_decode_weights=held.separate - held.resident,
            shared_saving=held.resident - held.shared,
            decode_bytes_first=first,
            decode_bytes_last=last,
            decode_ms_first=first / bandwidth * 1e3,
            decode_ms_last=last / bandwidth * 1e3,
            runnable=runnable,
            reason="" if runnable else why,
            sharing=config.sharing,
        )

    dense = estimate("dense", kv(m, False), kv(s, False))
    corematching = estimate("per-request", kv(m, True), kv(s, True))
    static = estimate("static", kv(m, True), kv(s, True))
    return Plan(
        config=config,
        model=g,
        device=dev,
        runtime=rt,
        weights=weights,
        activations=act,
        planned_weights=planned,
        activation_bytes=ab,
        compute_bytes=cb,
        parameters=g.parameters(),
        budgets=budgets,
        prompt_tokens=s,
        kept_prompt_tokens=s_kept,
        dense=dense,
        corematching=corematching,
        static=static,
        static_saving=dense.weights_stored - static.weights_stored,
        notes=plan_notes(g, dev, rt, budgets, weights, act, planned, m, corematching.runnable),
    )


def plan_build(
    model: str | Path,
    *,
    weights: WeightPrecision,
    activations: ActivationPrecision,
    neurons: Neurons,
    token_budget: int = 64,
    max_sequence: int = 2048,
    prompt_tokens: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device_name: str = "cpu",
    runtime_name: str | None = None,
    static_neurons: int | None = None,
) -> Estimate:
    """The planner's figure for one built configuration: `model` a preset or a llava-hf directory, `neurons`
    "dense", "per-request" (CoreMatching) or "static". On the default "cpu" device (ONNX Runtime on the CPU,
    no memory limit, 0.1 GiB process overhead) its `total` predicts the process's peak resident memory."""
    config = PlanConfig(
        model,
        device_name,
        token_budget=token_budget,
        max_sequence=max_sequence,
        prompt_tokens=prompt_tokens,
        weights=weights,
        activations=activations,
        runtime=runtime_name,
        block_size=block_size,
        static_neurons=static_neurons,
    )
    p = plan(config)
    return {"dense": p.dense, "per-request": p.corematching, "static": p.static}[neurons]


def plan_manifest(
    manifest: Any,
    model: str | Path | None = None,
    max_sequence: int = 2048,
    prompt_tokens: int | None = None,
    device_name: str = "cpu",
    runtime_name: str | None = None,
) -> Estimate:
    """`plan_build` for a build's `buildformat.Manifest`: its precision, quantization, dense or CoreMatching
    and token budget; the geometry from `model` (a preset or a llava-hf directory) or the manifest's
    model source; a build with a baked static neuron set is planned as "static"."""
    source = model if model is not None else manifest.model.source
    activations: ActivationPrecision = "fp16" if manifest.precision == "float16" else "fp32"
    quant = manifest.quantization
    cm = manifest.corematching
    if cm is not None and not isinstance(cm.token_budget, int):
        raise PlanError("a build with --token-budget auto keeps a data-dependent count; plan it with a fixed k")
    return plan_build(
        source,
        weights=quant.weights if quant is not None else activations,
        activations=activations,
        neurons="dense" if cm is None else "static" if manifest.static_neurons is not None else "per-request",
        token_budget=cm.token_budget if cm is not None else 64,
        max_sequence=max_sequence,
        prompt_tokens=prompt_tokens,
        block_size=(quant.block_size or DEFAULT_BLOCK_SIZE) if quant is not None else DEFAULT_BLOCK_SIZE,
        device_name=device_name,
        runtime_name=runtime_name,
        # a baked set is planned at the width it was built with, whatever today's default recipe is
        static_neurons=manifest.static_neurons.neurons if manifest.static_neurons is not None else None,
    )
