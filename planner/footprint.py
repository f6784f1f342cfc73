"""The model side of the memory plan: the geometry of a preset or of a llava-hf config.json, the weights
each graph of a build holds and what a runtime holds of them, the working sets of its largest steps, and
the notes a plan prints (torch-free).

The plan reads only the checkpoint's config.json, never its weights, so a 7B or 13B model is planned on
a laptop or on the Jetson itself.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from buildformat.geometry import SELECT_STRATEGIES, Geometry, image_token_count
from buildformat.names import DECODER, LOWER, PROFILES, UPPER, VISION_GRAPH
from coreMatching.backbones import UnsupportedBackboneError, backbone_for, supported_model_types
from coreMatching.config import Budgets
from models.presets import PRESETS, ModelPreset
from planner.devices import Device
from planner.runtimes import FLOAT_BYTES, ActivationPrecision, Runtime, WeightPrecision, matmul_bytes, runtime

# Defaults of transformers 5 for the fields a llava-hf config.json may leave out (they equal the
# class defaults, so save_pretrained omits them). No vision_config at all means LlavaConfig's own
# default tower (CLIP ViT-L/14 at 336 px); a vision_config dict falls back to CLIPVisionConfig's.
_LLAVA_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "num_channels": 3,
}
_CLIP_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 32,
    "num_channels": 3,
}
_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 2048,
    },
    "mistral": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096 * 32,
    },
}


class PlanError(ValueError):
    """A plan cannot be made from what the user gave; the message says what to fix, on one line."""


Neurons = Literal["dense", "per-request", "static"]
NEURONS: tuple[Neurons, ...] = ("dense", "per-request", "static")
PREFILL, DECODE = PROFILES  # the phases a decoder stack serves (one session, or one engine with two profiles)
_PREFILL_ONLY, _BOTH = frozenset({PREFILL}), frozenset(PROFILES)


@dataclass(frozen=True)
class WeightGroup:
    """`count` weights of one kind: 2-D MatMul weights [k, n] (x @ W), or float tensors of k values (n = 1).

    graph: the one graph that holds them (`buildformat.names`: vision, decoder, lower, upper), or, where
        `bound`, the decoder stack they are bound to.
    phases: the phases that read them: a stack's weights serve prefill and decode (one copy; `--sharing
        separate` plans one per phase), the vision graph's and the bound ones prefill only.
    bound: the per-request neuron-sparse layers' full FFN weights: no graph's constants, but buffers the
        runtime holds once in their stored form and binds in prefill (decode binds the request's compacted
        copy instead).
    rows_gathered: int4 blocks run along the output axis (a down projection whose rows are gathered).
    """

    part: str  # the part of `ModelGeometry.parameters()` it belongs to
    name: str
    k: int
    n: int
    count: int
    graph: str
    phases: frozenset[str] = _BOTH
    matmul: bool = True
    bound: bool = False
    rows_gathered: bool = False

    @property
    def parameters(self) -> int:
        return self.k * self.n * self.count


@dataclass(frozen=True)
class ModelGeometry(Geometry):
    """What the memory plan needs of a LLaVA model: the model's `Geometry` (decoder and image sizes), and
    the sizes of the CLIP vision tower and the projector, whose weights the plan counts."""

    name: str = ""
    source: str = "preset"  # "preset" or the checkpoint directory
    num_channels: int = 3
    vision_hidden_size: int = 0
    vision_intermediate_size: int = 0
    vision_num_layers: int = 0
    vision_num_heads: int = 0
    projector_input_size: int = 0  # vision_hidden_size x the number of feature layers concatenated
    projector_bias: bool = True
    text_model_type: str = "llama"
    max_position_embeddings: int = 4096
    attention_bias: bool = False

    @classmethod
    def from_preset(cls, preset: ModelPreset) -> ModelGeometry:
        return cls(
            **asdict(Geometry.from_preset(preset)),
            name=preset.name,
            source="preset",
            vision_hidden_size=preset.vision_hidden_size,
            vision_intermediate_size=preset.vision_intermediate_size,
            vision_num_layers=preset.vision_num_layers,
            vision_num_heads=preset.vision_num_heads,
            projector_input_size=preset.vision_hidden_size,
            text_model_type=preset.text_model_type,
            max_position_embeddings=preset.max_position_embeddings,
        )

    def attention_parameters(self) -> int:
        """q, k, v, o projections of one decoder layer."""
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        weights = 2 * self.hidden_size * q_width + 2 * self.hidden_size * kv_width
        biases = q_width + 2 * kv_width + self.hidden_size if self.attention_bias else 0
        return weights + biases

    def layer_parameters(self, ffn_width: int) -> int:
        """One decoder layer with an FFN of `ffn_width` neurons (D dense, N for a compacted FFN)."""
        return self.attention_parameters() + 3 * self.hidden_size * ffn_width + 2 * self.hidden_size

    def parameters(self) -> dict[str, int]:
        """Parameter counts by part, as the checkpoint holds them (the whole CLIP tower included)."""
        vh, vi, d = self.vision_hidden_size, self.vision_intermediate_size, self.hidden_size
        # CLIP: class embedding, patch conv (no bias), positions (CLS + patches), pre/post layer norms.
        embeddings = vh + self.num_channels * self.patch_size**2 * vh + (self.num_patches + 1) * vh
        vision_layer = 4 * (vh * vh + vh) + 2 * 2 * vh + (vh * vi + vi) + (vi * vh + vh)
        bias = 2 * d if self.projector_bias else 0
        parts = {
            "vision_tower": embeddings + 2 * 2 * vh + self.vision_num_layers * vision_layer,
            "projector": self.projector_input_size * d + d * d + bias,
            "embedding": self.vocab_size * d,
            "decoder_layers": self.num_layers * self.layer_parameters(self.intermediate_size),
            "final_norm": d,
            # llava-hf checkpoints keep an untied head; a tied one would still be its own
            # initializer in the exported prefill and decode graphs.
            "lm_head": self.vocab_size * d,
        }
        parts["total"] = sum(parts.values())
        return parts

    def stacks(self, neurons: Neurons, prune_layer: int = 0) -> dict[str, range]:
        """The decoder stacks of a build and their layers: a dense build's one decoder, CoreMatching's lower
        (layers 0..l_p, with the embedding) and upper (the rest, with the head)."""
        if neurons == "dense":
            return {DECODER: range(self.num_layers)}
        return {LOWER: range(prune_layer + 1), UPPER: range(prune_layer + 1, self.num_layers)}

    def weight_groups(
        self, neurons: Neurons, sparse_layers: Collection[int] = (), core_neurons: int = 0, prune_layer: int = 0
    ) -> tuple[WeightGroup, ...]:
        """Every weight of a build, by kind and by the one graph that holds it (docs/architecture.md).

        dense: every layer's full FFN. per-request: the FFN of `sparse_layers` (layer indices) is bound, not
        held by a graph. static: the FFN of `sparse_layers` is narrowed to `core_neurons` in the file.
        """
        vh, vi, vl = self.vision_hidden_size, self.vision_intermediate_size, self.vision_num_layers
        d, big_d = self.hidden_size, self.intermediate_size
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # CLIP: class embedding, patch conv, positions, pre/post norms; per layer biases and two norms.
        vision_floats = vh + self.num_channels * self.patch_size**2 * vh + (self.num_patches + 1) * vh + 4 * vh
        vision_floats += vl * (4 * vh + vi + vh + 4 * vh)
        attention_floats = q_width + 2 * kv_width + d if self.attention_bias else 0
        v, once = VISION_GRAPH, _PREFILL_ONLY
        groups = [
            WeightGroup("vision_tower", "vision.attention", vh, vh, 4 * vl, v, once),
            WeightGroup("vision_tower", "vision.fc1", vh, vi, vl, v, once),
            WeightGroup("vision_tower", "vision.fc2", vi, vh, vl, v, once),
            WeightGroup("vision_tower", "vision.floats", vision_floats, 1, 1, v, once, matmul=False),
            WeightGroup("projector", "projector.linear_1", self.projector_input_size, d, 1, v, once),
            WeightGroup("projector", "projector.linear_2", d, d, 1, v, once),
            WeightGroup("projector", "projector.bias", 2 * d if self.projector_bias else 0, 1, 1, v, once, False),
        ]
        stacks = self.stacks(neurons, prune_layer)
        first, last = next(iter(stacks)), list(stacks)[-1]
        groups.append(WeightGroup("embedding", "embedding", self.vocab_size * d, 1, 1, first, matmul=False))
        part = "decoder_layers"
        for stack, layers in stacks.items():
            count = len(layers)
            sparse = 0 if neurons == "dense" else sum(1 for i in layers if i in sparse_layers)
            dense = count - sparse
            groups += [
                WeightGroup(part, f"{stack}.attention.q", d, q_width, count, stack),
                WeightGroup(part, f"{stack}.attention.kv", d, kv_width, 2 * count, stack),
                WeightGroup(part, f"{stack}.attention.o", q_width, d, count, stack),
                WeightGroup(part, f"{stack}.layer.floats", 2 * d + attention_floats, 1, count, stack, matmul=False),
                WeightGroup(part, f"{stack}.ffn.gate_up", d, big_d, 2 * dense, stack),
                WeightGroup(part, f"{stack}.ffn.down", big_d, d, dense, stack),
            ]
            if neurons == "per-request":
                groups += [
                    WeightGroup(part, f"{stack}.bound.gate_up", d, big_d, 2 * sparse, stack, once, bound=True),
                    WeightGroup(part, f"{stack}.bound.down", big_d, d, sparse, stack, once, True, True, True),
                ]
            elif neurons == "static":
                # Nothing is gathered: the narrowed down projection is blocked along its reduction axis like any
                # other weight (the build rounds N up to int4's block).
                groups += [
                    WeightGroup(part, f"{stack}.static.gate_up", d, core_neurons, 2 * sparse, stack),
                    WeightGroup(part, f"{stack}.static.down", core_neurons, d, sparse, stack),
                ]
        groups += [
            WeightGroup("final_norm", "final_norm", d, 1, 1, last, matmul=False),
            WeightGroup("lm_head", "lm_head", d, self.vocab_size, 1, last),
        ]
        return tuple(g for g in groups if g.count and g.k and g.n)

    def prefill_layer_bytes(self, tokens: int, value_bytes: int) -> int:
        """Largest working set of one decoder layer over `tokens` (unfused attention: scores and probabilities)."""
        t, d = tokens, self.hidden_size
        attention = 2 * t * d + t * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        attention += 2 * self.num_heads * t * t + t * self.num_heads * self.head_dim
        ffn = 2 * t * d + 3 * t * self.intermediate_size  # gate, up and their product [T, D]
        return max(attention, ffn) * value_bytes

    def vision_bytes(self, value_bytes: int) -> int:
        """Largest working set of the vision graph: one tower layer, the pixels and the projected image tokens."""
        t, vh = self.num_patches + 1, self.vision_hidden_size  # the tower always runs the CLS token
        attention = 2 * t * vh + 3 * t * vh + 2 * self.vision_num_heads * t * t + t * vh
        mlp = 2 * t * vh + 2 * t * self.vision_intermediate_size
        pixels = self.num_channels * self.image_size**2
        return (max(attention, mlp) + pixels + self.num_image_tokens * self.hidden_size) * value_bytes


@dataclass(frozen=True)
class HeldWeights:
    """What the runtime holds of one build's weights, and what a decode step reads of them."""

    resident: int  # with the chosen sharing
    separate: int  # with a session or engine per phase (prefill and decode each hold the stacks' weights)
    shared: int  # with one copy of every weight
    stored: int
    by_part: dict[str, int]  # `resident` by part
    decode_read: int  # weights one decode step reads (the embedding row aside)
    load: int  # the largest session's extra bytes while it is built
    dequantized: dict[str, int]  # per stack: the float copy of a bound weight that a prefill dequantizes


# "runtime": what the runtime holds, one copy of every weight (one session, or one engine with a prefill and a
# decode profile, per graph); "separate": an opt-in, a session or engine per phase, so the stacks' weights twice;
# "shared": one copy of every weight, the old spelling of what every runtime now holds.
Sharing = Literal["runtime", "separate", "shared"]
SHARINGS: tuple[Sharing, ...] = ("runtime", "separate", "shared")


def _dequantized_bytes(grp: WeightGroup, planned: str, compute_bytes: int) -> int:
    """The transient float copy of one bound weight while a prefill runs it: none where it is stored at the
    compute precision; int4 adds its unpacked uint8 values (the nibble unpacking's output)."""
    if FLOAT_BYTES.get(planned) == compute_bytes:
        return 0
    return grp.k * grp.n * (compute_bytes + (1 if planned == "int4" else 0))


def held_weights(
    groups: tuple[WeightGroup, ...],
    rt: Runtime,
    weights: WeightPrecision,
    act: ActivationPrecision,
    block: int,
    compute_bytes: int,
    sharing: Sharing = "runtime",
) -> HeldWeights:
    """What `rt` holds of `groups` stored at `weights` (scales and float tensors at `act`), per the runtime's
    handling of each precision (`planner.runtimes`): one copy of every weight ("runtime", "shared"), or the
    stacks' weights once per phase ("separate"); the bound weights are held once, in their stored form."""
    resident = separate = shared = stored = decode_read = 0
    by_part: dict[str, int] = defaultdict(int)
    load: dict[str, float] = defaultdict(float)
    dequantized: dict[str, int] = defaultdict(int)
    handling = rt.handling(weights)
    planned = handling.precision(weights, act)
    bound_precision = rt.bound_precision(weights, act)
    for grp in groups:
        per_copy = size = grp.parameters * FLOAT_BYTES[act]  # norms, biases, embeddings: activation precision
        if grp.matmul:
            size = grp.count * matmul_bytes(
                grp.k, grp.n, weights, act, block_size=block, rows_gathered=grp.rows_gathered
            )
            stored += size
            if grp.bound:  # held as stored, neither folded nor pre-packed (not a constant), unless the build
                # itself must be made at the activations' precision on this runtime
                held = bound_precision
                if held != weights:
                    size = grp.count * matmul_bytes(grp.k, grp.n, held, act, block_size=block)
                per_copy = size
                dequantized[grp.graph] = max(dequantized[grp.graph], _dequantized_bytes(grp, held, compute_bytes))
            else:
                if planned != weights:  # a fallback: the runtime holds the weights at a float precision
                    size = grp.count * matmul_bytes(grp.k, grp.n, planned, act, block_size=block)
                per_copy = int(size * handling.resident_factor)
                load[grp.graph] += size * handling.load_factor
        else:
            stored += size
        phases = len(grp.phases)
        copies = phases if sharing == "separate" else 1
        resident += per_copy * copies
        separate += per_copy * phases
        shared += per_copy
        by_part[grp.part] += per_copy * copies
        if DECODE in grp.phases and grp.part != "embedding":  # one embedding row per step, added later
            decode_read += size
    load_max = int(max(load.values(), default=0))
    return HeldWeights(resident, separate, shared, stored, dict(by_part), decode_read, load_max, dict(dequantized))


def plan_notes(
    g: ModelGeometry,
    dev: Device,
    rt: Runtime,
    budgets: Budgets,
    weights: WeightPrecision,
    act: ActivationPrecision,
    planned: WeightPrecision,
    max_sequence: int,
    per_request_runs: bool,
) -> tuple[str, ...]:
    """The notes a plan prints under its table."""
    notes: list[str] = []
    if planned != weights:
        quantized = [r for r in dev.runtimes if not runtime(r).falls_back(weights, act)]
        where = f"; {', '.join(quantized)} runs them as {weights}" if quantized else ""
        kernel = rt.handling(weights).kernel
        notes.append(f"{weights} weights fall back on {rt.name}: planned at {planned} ({kernel}){where}")
    if act != rt.fp16_activations_as and act == "fp16":
        notes.append(
            f"fp16 activations run as {rt.fp16_activations_as} on {rt.name}; planned so (the cache stays fp16)"
        )
    if not per_request_runs:
        notes.append(
            f"CoreMatching with per-request neurons and quantized weights does not run on {rt.name}: "
            f"{rt.per_request_quantized_reason}"
        )
    if act == "fp16" and dev.fp16_speed < 1:
        notes.append(
            f"fp16 on {dev.title} halves the bytes, but its fp16 rate is 1/{round(1 / dev.fp16_speed)} of "
            f"fp32, so compute, not bandwidth, bounds its steps; {dev.recommended_precision} activations are "
            "recommended"
        )
    if weights in ("int8", "int4") and not dev.int8:
        notes.append(f"{dev.title} has no int8 kernels")
    if max_sequence > g.max_position_embeddings:
        notes.append(f"max-sequence {max_sequence} is beyond the model's {g.max_position_embeddings} trained positions")
    if budgets.core_neurons > 3839:
        notes.append("TensorRT: N is beyond TopK's K < 3840, so a TensorRT build selects core neurons per chunk")
    notes.append(f"weights: {rt.sharing.text}")
    notes.append(f"per-request neurons: the sparse layers' full FFN weights are {rt.bound.text}")
    notes.append(f"activations: {rt.scratch.text}")
    notes.append(
        "a static neuron set is calibrated offline and also narrows the prefill of the sparse layers "
        "(check its accuracy); the per-request set is the method"
    )
    notes.extend(dev.notes)
    return tuple(notes)


def _int(section: dict[str, Any], key: str, where: str) -> int:
    value = section.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise PlanError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def geometry_from_config(config: dict[str, Any], name: str, source: str) -> ModelGeometry:
    """The geometry of a llava-hf config.json (already parsed), with transformers' defaults for omitted fields."""
    where = f"{source}/config.json"
    if config.get("model_type") != "llava":
        raise PlanError(f"{where} has model_type {config.get('model_type')!r}; only 'llava' checkpoints are planned")
    vision_raw, text_raw = config.get("vision_config"), config.get("text_config")
    if not isinstance(vision_raw, (dict, type(None))) or not isinstance(text_raw, (dict, type(None))):
        raise PlanError(f"{where}: vision_config and text_config must be JSON objects")
    vision = dict(_LLAVA_VISION_DEFAULTS) if vision_raw is None else {**_CLIP_VISION_DEFAULTS, **vision_raw}
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise PlanError(f"{where}: vision tower {vision['model_type']!r} is not planned; only CLIP towers are")
    text_raw = text_raw or {}
    text_type = text_raw.get("model_type", "llama")  # LlavaConfig's default text model is Llama
    try:
        backbone_for(str(text_type))
    except UnsupportedBackboneError:
        raise PlanError(
            f"{where}: text backbone {text_type!r} is not supported; supported: {', '.join(supported_model_types())}"
        ) from None
    if text_type not in _TEXT_DEFAULTS:
        raise PlanError(f"{where}: no planning defaults for text backbone {text_type!r}")
    text = {**_TEXT_DEFAULTS[text_type], **{k: v for k, v in text_raw.items() if v is not None}}
    if "vocab_size" not in text_raw and isinstance(config.get("vocab_size"), int):
        text["vocab_size"] = config["vocab_size"]  # configs from transformers 4.3x kept it at the top level
    if text.get("mlp_bias"):
        raise PlanError(f"{where}: FFN biases (mlp_bias) are refused by the export, so they are not planned")

    image_size = vision["image_size"]
    if isinstance(image_size, list) and len(image_size) == 2 and image_size[0] == image_size[1]:
        vision["image_size"] = image_size[0]  # [n, n] is a square image
    layer = config.get("vision_feature_layer", -2)
    feature_layers = len(layer) if isinstance(layer, list) else 1  # several layers are concatenated
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy not in SELECT_STRATEGIES:
        raise PlanError(f"{where}: vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")

    def v(key: str) -> int:
        return _int(vision, key, f"{where} vision_config")

    def t(key: str) -> int:
        return _int(text, key, f"{where} text_config")

    text.setdefault("num_key_value_heads", t("num_attention_heads"))
    text.setdefault("head_dim", t("hidden_size") // t("num_attention_heads"))
    if v("image_size") % v("patch_size"):
        raise PlanError(f"{where}: image_size {v('image_size')} is not a multiple of patch_size {v('patch_size')}")
    return ModelGeometry(
        name=name,
        source=source,
        image_size=v("image_size"),
        patch_size=v("patch_size"),
        num_channels=v("num_channels"),
        vision_hidden_size=v("hidden_size"),
        vision_intermediate_size=v("intermediate_size"),
        vision_num_layers=v("num_hidden_layers"),
        vision_num_heads=v("num_attention_heads"),
        num_image_tokens=image_token_count(v("image_size"), v("patch_size"), strategy),
        projector_input_size=v("hidden_size") * feature_layers,
        projector_bias=bool(config.get("multimodal_projector_bias", True)),
        text_model_type=str(text_type),
        hidden_size=t("hidden_size"),
        intermediate_size=t("intermediate_size"),
        num_layers=t("num_hidden_layers"),
        num_heads=t("num_attention_heads"),
        num_kv_heads=t("num_key_value_heads"),
        head_dim=t("head_dim"),
        vocab_size=t("vocab_size"),
        max_position_embeddings=t("max_position_embeddings"),
        attention_bias=bool(text.get("attention_bias", False)),
    )


def load_geometry(model: str | Path) -> ModelGeometry:
    """A preset name, or a llava-hf directory whose config.json is read (never its weights).

    A preset name wins over a directory of the same name; write ./NAME for the directory.
    """
    if isinstance(model, str) and model in PRESETS:
        return ModelGeometry.from_preset(PRESETS[model])
    path = Path(model).expanduser()
    if not path.exists():
        raise PlanError(f"{model!s} is neither a model preset nor an existing directory; presets: {', '.join(PRESETS)}")
    if not path.is_dir():
        raise PlanError(f"{path} is not a directory; pass a llava-hf checkpoint directory or a preset name")
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanError(f"{path} has no config.json; pass a llava-hf checkpoint directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanError(f"cannot read {config_path}: {' '.join(str(e).split())}") from None
    if not isinstance(config, dict):
        raise PlanError(f"{config_path} is not a JSON object")
    return geometry_from_config(config, path.resolve().name, str(path))
