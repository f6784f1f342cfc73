"""Memory plan of a deployment, dense and CoreMatching, against one device (`python -m export plan`).

Everything is computed from the model's geometry (a preset, or a llava-hf directory's
config.json read as JSON): no weights are loaded and neither torch nor transformers is
imported, so a 7B or 13B model is planned on a laptop or on the Jetson itself.

What is counted, in bytes (docs/method.md, docs/architecture.md):

- weights: vision tower (the whole CLIP tower of the checkpoint) + projector + embedding
  + decoder layers + final norm + LM head, at the precision's bytes per parameter;
- KV cache sized for the longest answer (`max_sequence` tokens): CoreMatching's layers
  after the prune layer hold `max_sequence - n_img + k` tokens;
- compacted FFN weights of one request (CoreMatching: gathered once after prefill and kept
  for the whole answer);
- peak activations: the largest of the vision tower's and the prefill's live tensors
  (one layer's working set plus the prompt's KV outputs, which live until they are copied
  into the cache buffers);
- a runtime overhead per device kind (`export.devices`).

Exact: weights, KV cache, compacted weights. Estimates: activations (unfused attention
assumed, so an upper side) and the runtime overhead. Decode-step times are lower bounds:
the bytes a step must read divided by the DRAM bandwidth (decode is memory bound).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from coreMatching.config import Budgets, CoreMatchingConfig
from coreMatching.errors import ConfigError
from export.devices import PRECISIONS, Device, Precision, UnknownDeviceError, device
from export.plan_model import ModelGeometry, PlanError, load_geometry

WEIGHT_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "int8": 1}
# int8 quantizes the weights only: activations and the KV cache stay fp16 (weight-only int8,
# what a decoder on Orin or a dp4a Pascal would run). Planning-only: no int8 graphs are exported yet.
ACTIVATION_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "int8": 2}
PROMPT_TEXT_TOKENS = 40  # the default prompt: the image plus a question and the chat template


@dataclass(frozen=True)
class PlanConfig:
    """What to plan. precision None takes the device's recommended one; prompt_tokens None is n_img + 40."""

    model: str | Path
    device: str
    precision: Precision | None = None
    token_budget: int = 64
    max_sequence: int = 2048  # prompt + the longest answer: what the KV cache is sized for
    prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, (str, Path)) or not str(self.model).strip():
            raise PlanError(f"model must be a preset name or a directory, got {self.model!r}")
        try:
            device(self.device)
        except UnknownDeviceError as e:
            raise PlanError(str(e)) from None
        if self.precision is not None and self.precision not in PRECISIONS:
            raise PlanError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("token_budget", "max_sequence", "prompt_tokens"):
            value = getattr(self, name)
            if value is None and name == "prompt_tokens":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlanError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class Estimate:
    """The memory (bytes) of one way to deploy, and what one decode step reads."""

    weights: int
    kv_cache: int
    compacted_ffn: int  # per request: CoreMatching's gathered FFN weights
    activations: int  # peak of the vision tower or the prefill
    runtime_overhead: int
    total: int
    headroom: int  # usable memory of the device - total (negative: does not fit)
    fits: bool
    # The decode graph's own copy of the decoder weights, where prefill and decode are separate
    # sessions or TensorRT engines that do not share initializers (the runtime today); not in total.
    unshared_decode_weights: int
    decode_bytes_first: int  # read by the first decode step (the prompt cached)
    decode_bytes_last: int  # read by the last one (max_sequence cached)
    decode_ms_first: float  # lower bounds: bytes / bandwidth
    decode_ms_last: float

    @property
    def total_unshared(self) -> int:
        return self.total + self.unshared_decode_weights


@dataclass(frozen=True)
class Plan:
    config: PlanConfig
    model: ModelGeometry
    device: Device
    precision: Precision
    weight_bytes: int  # per parameter
    activation_bytes: int  # per activation and KV-cache value
    parameters: dict[str, int]
    budgets: Budgets
    prompt_tokens: int  # S
    kept_prompt_tokens: int  # S - n_img + k
    dense: Estimate
    corematching: Estimate
    static: Estimate  # CoreMatching with a calibrated static neuron set baked into narrower FFN weights
    static_saving: int  # (D - N) x 3 x d x sparse layers x weight bytes
    notes: tuple[str, ...]

    @property
    def estimates(self) -> dict[str, Estimate]:
        return {"dense": self.dense, "corematching": self.corematching, "corematching_static": self.static}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary; every memory figure in bytes."""
        b = self.budgets
        return {
            "model": {**asdict(self.model), "parameters": self.parameters},
            "device": {**asdict(self.device), "usable_bytes": self.device.usable_bytes},
            "precision": self.precision,
            "weight_bytes": self.weight_bytes,
            "activation_bytes": self.activation_bytes,
            "tokens": {
                "image_tokens": self.model.num_image_tokens,
                "prompt_tokens": self.prompt_tokens,
                "kept_prompt_tokens": self.kept_prompt_tokens,
                "max_sequence": self.config.max_sequence,
                "answer_tokens": self.config.max_sequence - self.prompt_tokens,
            },
            "budgets": {
                "token_budget": b.token_budget,
                "tokens_per_neuron_set": b.tokens_per_neuron_set,
                "core_neurons": b.core_neurons,
                "prune_layer": b.prune_layer,
                "neuron_layers": list(b.neuron_layers),
            },
            "memory": {name: {**asdict(e), "total_unshared": e.total_unshared} for name, e in self.estimates.items()},
            "static_neuron_saving": self.static_saving,
            "recommended": {
                "precision": self.device.recommended_precision,
                "tensorrt": self.device.recommended_tensorrt,
            },
            "notes": list(self.notes),
        }


def _prefill_layer_bytes(g: ModelGeometry, tokens: int, value_bytes: int) -> int:
    """Largest working set of one decoder layer over `tokens` (unfused attention: scores and probabilities)."""
    t, d = tokens, g.hidden_size
    attention = 2 * t * d + t * (g.num_heads + 2 * g.num_kv_heads) * g.head_dim + 2 * g.num_heads * t * t
    attention += t * g.num_heads * g.head_dim
    ffn = 2 * t * d + 3 * t * g.intermediate_size  # gate, up and their product [T, D]
    return max(attention, ffn) * value_bytes


def _vision_bytes(g: ModelGeometry, value_bytes: int) -> int:
    t, vh = g.num_patches + 1, g.vision_hidden_size  # the tower always runs the CLS token
    attention = 2 * t * vh + 3 * t * vh + 2 * g.vision_num_heads * t * t + t * vh
    mlp = 2 * t * vh + 2 * t * g.vision_intermediate_size
    pixels = g.num_channels * g.image_size**2
    return (max(attention, mlp) + pixels + g.num_image_tokens * g.hidden_size) * value_bytes


def plan(config: PlanConfig) -> Plan:
    """The memory plan of `config`; raises PlanError for what the model or the budgets cannot honour."""
    g = load_geometry(config.model)
    dev = device(config.device)
    precision: Precision = config.precision or dev.recommended_precision
    wb, ab = WEIGHT_BYTES[precision], ACTIVATION_BYTES[precision]
    n_img = g.num_image_tokens
    try:
        budgets = CoreMatchingConfig(token_budget=config.token_budget).resolve(
            num_layers=g.num_layers, intermediate_size=g.intermediate_size, num_image_tokens=n_img
        )
    except ConfigError as e:
        raise PlanError(str(e)) from None
    k = config.token_budget
    s = config.prompt_tokens if config.prompt_tokens is not None else n_img + PROMPT_TEXT_TOKENS
    m = config.max_sequence
    if s < n_img:
        raise PlanError(f"prompt-tokens {s} is shorter than the {n_img} image tokens the prompt contains")
    if m <= s:
        raise PlanError(f"max-sequence {m} leaves no room for an answer after a {s}-token prompt")
    merged = budgets.merged_tokens  # a summary token is computed and cached too
    s_kept = g.kept_length(s, k, merged)
    full_layers = budgets.prune_layer + 1  # layers 0..l_p keep every token
    sparse = budgets.neuron_sparse_layers
    d, big_d, n = g.hidden_size, g.intermediate_size, budgets.core_neurons
    kv_token = g.kv_bytes_per_token(ab)  # K and V of one token in one layer

    def kv(tokens: int, pruned: bool) -> int:
        """All layers' cache for `tokens`; `pruned`: the layers after the prune layer hold the kept ones."""
        if not pruned:
            return g.cache_bytes(tokens, ab)
        return g.cache_bytes(tokens, ab, budgets.prune_layer, kept=k, merged=merged)

    params = g.parameters()
    weights = params["total"] * wb
    compacted = 3 * d * n * len(sparse) * wb
    static_saving = 3 * d * (big_d - n) * len(sparse) * wb

    # Prefill: one layer's working set plus the KV outputs of the layers run so far (all of them at the last layer).
    selection = s * big_d + s * budgets.tokens_per_neuron_set * (ab + 8)  # membership mask, TopK values + int64 ids
    dense_prefill = _prefill_layer_bytes(g, s, ab) + kv(s, False)
    cm_prefill = max(
        _prefill_layer_bytes(g, s, ab) + selection + full_layers * kv_token * s,
        _prefill_layer_bytes(g, s_kept, ab) + kv(s, True),
    )
    vision = _vision_bytes(g, ab)

    # Decode reads the decoder weights (sparse layers at N for CoreMatching), the head, one embedding row, the cache.
    # The *_graph figures are what the decode graph holds: a CoreMatching build takes the sparse layers' FFN as
    # inputs (the compacted weights), a static build has them narrowed to N.
    head = (d + g.vocab_size * d) * wb  # final norm + LM head

    def decoder_bytes(sparse_width: int) -> int:
        widths = (sparse_width if budgets.is_neuron_sparse(i) else big_d for i in range(g.num_layers))
        return sum(g.layer_parameters(w) for w in widths) * wb + head

    dense_graph, cm_graph, static_graph = decoder_bytes(big_d), decoder_bytes(0), decoder_bytes(n)
    row = d * wb  # the embedding of the new token
    overhead = dev.runtime_overhead_bytes
    bandwidth = dev.bandwidth_gbps * 1e9

    def estimate(
        weights: int, kv_cache: int, compacted: int, activations: int, unshared: int, step: int, kv_first: int
    ) -> Estimate:
        total = weights + kv_cache + compacted + activations + overhead
        first, last = step + kv_first, step + kv_cache
        return Estimate(
            weights=weights,
            kv_cache=kv_cache,
            compacted_ffn=compacted,
            activations=activations,
            runtime_overhead=overhead,
            total=total,
            headroom=dev.usable_bytes - total,
            fits=total <= dev.usable_bytes,
            unshared_decode_weights=unshared,
            decode_bytes_first=first,
            decode_bytes_last=last,
            decode_ms_first=first / bandwidth * 1e3,
            decode_ms_last=last / bandwidth * 1e3,
        )

    cm_activations = max(vision, cm_prefill)
    dense = estimate(weights, kv(m, False), 0, max(vision, dense_prefill), dense_graph, dense_graph + row, kv(s, False))
    corematching = estimate(weights, kv(m, True), compacted, cm_activations, cm_graph, static_graph + row, kv(s, True))
    static = estimate(
        weights - static_saving, kv(m, True), 0, cm_activations, static_graph, static_graph + row, kv(s, True)
    )
    return Plan(
        config=config,
        model=g,
        device=dev,
        precision=precision,
        weight_bytes=wb,
        activation_bytes=ab,
        parameters=params,
        budgets=budgets,
        prompt_tokens=s,
        kept_prompt_tokens=s_kept,
        dense=dense,
        corematching=corematching,
        static=static,
        static_saving=static_saving,
        notes=_notes(g, dev, budgets, precision, m),
    )


def _notes(g: ModelGeometry, dev: Device, budgets: Budgets, precision: Precision, max_sequence: int) -> tuple[str, ...]:
    notes: list[str] = []
    if precision == "int8":
        notes.append(
            "int8 is planning-only: the export does not produce int8 graphs yet (weights at 1 byte, "
            "activations and KV cache at fp16)"
        )
    if precision == "fp16" and dev.fp16_speed < 1:
        notes.append(
            f"fp16 on {dev.title} halves the bytes, but its fp16 rate is 1/{round(1 / dev.fp16_speed)} of "
            f"fp32, so compute, not bandwidth, bounds its steps; {dev.recommended_precision} is "
            "recommended"
        )
    if precision == "int8" and not dev.int8:
        notes.append(f"{dev.title} has no int8 kernels")
    if max_sequence > g.max_position_embeddings:
        notes.append(f"max-sequence {max_sequence} is beyond the model's {g.max_position_embeddings} trained positions")
    if budgets.core_neurons > 3839:
        notes.append("TensorRT: N is beyond TopK's K < 3840, so a TensorRT build selects core neurons per chunk")
    notes.append(
        "a static neuron set is calibrated offline and also narrows the prefill of the sparse layers "
        "(check its accuracy); the per-request set is the method"
    )
    notes.extend(dev.notes)
    return tuple(notes)
