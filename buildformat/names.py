"""The names of the graphs' inputs and outputs, declared once (docs/architecture.md, "The graphs").

The export traces and rewrites the graphs under these names and the runtime binds tensors by them,
so in code a name is spelled here only: a build's graphs and the manifest that lists their I/O
are the contract, and renaming anything here breaks every build already made. Per-layer names are
functions of the layer index; the graph signatures (`VISION`, `stack_names`) give the names in the
order of the graphs' inputs and outputs, and `graph_set` which graphs a build has.

Standard library only, like the rest of `buildformat`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# -- one tensor each -------------------------------------------------------------------------------------

PIXEL_VALUES = "pixel_values"  # vision in: [1, 3, H, W]
IMAGE_FEATURES = "image_features"  # vision out: [1, n_img, d]; lower (decoder) in, spliced at image_start
INPUT_IDS = "input_ids"  # lower (decoder) in: [1, S], the new tokens (the prompt in prefill, one in decode)
IMAGE_START = "image_start"  # [1] int64: the first image token (lower, select; upper with a merge)
POSITION_IDS = "position_ids"  # stacks in: [S], the new tokens' positions (the kept ones' in upper's prefill)
PAST_LENGTH = "past_length"  # stacks in: [1], how many entries of the stack's past buffers hold tokens
HIDDEN = "hidden"  # lower out, upper in: [1, S, d], the hidden states after the prune layer
KEPT_HIDDEN = "kept_hidden"  # select out: [1, S_kept, d], the kept (and merged) tokens' hidden states
KEPT_POSITIONS = "kept_positions"  # select out: [S_kept], their position ids (upper's position_ids)
LOGITS = "logits"  # decoder and upper out: [1, V], the last new token's
KEPT_IMAGE_TOKENS = "kept_image_tokens"  # select out: [k], indices into the image's tokens
KEPT_BIAS = "kept_bias"  # select out, upper in (merges): [k'], the pruned layers' image-slot key bias
EMBED_TABLE = "embed_tokens"  # the token embedding table's initializer [V, d], in the stack that embeds

# The stacks' inputs that change every decode step (the rest are bound once per request).
STEP_INPUTS = (INPUT_IDS, POSITION_IDS, PAST_LENGTH)

# -- the KV cache: {role}.{layer}.{kind} -----------------------------------------------------------------

PAST = "past"  # stacks in: [1, n_kv, B, hd], a buffer of B positions of which past_length hold tokens
NEW = "new"  # stacks out: [1, n_kv, S, hd], the new tokens' entries, which the caller writes at past_length
# Fused stacks out: [1, n_kv, B, hd], the past buffer with the new entries written at past_length; the runtime
# binds it to the past buffer's own memory, so nothing is copied.
PRESENT = "present"
CACHE_KINDS = ("key", "value")


def cache_name(role: str, layer: int, kind: str) -> str:
    """past.3.key, new.3.value, ..."""
    return f"{role}.{layer}.{kind}"


def cache_names(role: str, layers: Iterable[int]) -> list[str]:
    """{role}.{i}.key/value of `layers`, in layer order (key before value)."""
    return [cache_name(role, i, kind) for i in layers for kind in CACHE_KINDS]


def new_name(past: str) -> str:
    """past.3.key -> new.3.key: the output that holds the new tokens' entries for that buffer."""
    return NEW + past[len(PAST) :]


def past_name(new: str) -> str:
    """new.3.key (or present.3.key) -> past.3.key: the buffer that an output's entries are written into."""
    role = PRESENT if new.startswith(f"{PRESENT}.") else NEW
    return PAST + new[len(role) :]


def present_name(past: str) -> str:
    """past.3.key -> present.3.key: a fused stack's output that is that buffer."""
    return PRESENT + past[len(PAST) :]


def is_present(name: str) -> bool:
    """A fused stack's buffer output."""
    return name.startswith(f"{PRESENT}.")


def is_past(name: str) -> bool:
    """A cache buffer input."""
    return name.startswith(f"{PAST}.")


def is_new(name: str) -> bool:
    """A new-entries output."""
    return name.startswith(f"{NEW}.")


# -- the prompt's core neurons and the compacted FFN weights of the neuron-sparse layers -------------------

CORE_NEURONS = "core_neurons"
FFN = "ffn"
# The bound FFN weights, neuron-major: every one is [W, d] (W the layer's neurons: all D in prefill, the request's
# N core neurons in decode), so that gathering core neurons copies whole contiguous rows. `gate` and `up` are the
# HF projections' own `weight` (the stacks multiply x @ w^T); `down_t` is down_proj.weight transposed (x @ w).
FFN_GATE, FFN_UP, FFN_DOWN = "gate", "up", "down_t"
FFN_WEIGHTS = (FFN_GATE, FFN_UP, FFN_DOWN)


def core_neurons_name(layer: int) -> str:
    """Prefill out: core_neurons.{layer} [N] int64, ascending."""
    return f"{CORE_NEURONS}.{layer}"


def core_neurons_layer(name: str) -> int | None:
    """The layer of a core_neurons.{layer} name; None for any other name."""
    head, _, layer = name.partition(".")
    return int(layer) if head == CORE_NEURONS and layer.isdigit() else None


def ffn_name(layer: int, weight: str) -> str:
    """Stack in: ffn.{layer}.{weight}, a neuron-sparse layer's FFN weight bound by the runtime: the full weight
    (held once, from the weights file's `bound` section) in prefill, the request's compacted one in decode."""
    return f"{FFN}.{layer}.{weight}"


def ffn_names(layers: Iterable[int]) -> list[str]:
    """Every bound FFN weight of `layers`, in layer order."""
    return [ffn_name(i, w) for i in layers for w in FFN_WEIGHTS]


def is_ffn(name: str) -> bool:
    """A bound FFN weight, or a part of its stored form (ffn.{i}.{w}.q, ...)."""
    return name.startswith(f"{FFN}.")


def ffn_layer(name: str) -> int:
    """The layer of an ffn.{layer}.* or compact.{layer}.* name."""
    return int(name.split(".")[1])


COMPACT = "compact"


def compact_name(ffn: str) -> str:
    """ffn.3.gate(.q) -> compact.3.gate(.q): the neurons graph's output that decode binds to that input."""
    return COMPACT + ffn[len(FFN) :]


def bound_name(compact: str) -> str:
    """compact.3.gate(.q) -> ffn.3.gate(.q): the stack input a compacted weight is bound to."""
    return FFN + compact[len(COMPACT) :]


def is_compact(name: str) -> bool:
    """A compacted FFN weight (or a part of its stored form), an output of the neurons graph."""
    return name.startswith(f"{COMPACT}.")


# A quantized weight (and a quantized compacted-FFN input) is stored as {name}.{part}: its integers
# (`q`, or `packed` nibble pairs for int4 weights that a request gathers) and their `scale`.
QUANT_DATA, QUANT_PACKED, QUANT_SCALE = "q", "packed", "scale"


def part_name(name: str, part: str) -> str:
    """ffn.3.gate, q -> ffn.3.gate.q: one stored part of a quantized tensor."""
    return f"{name}.{part}"


# -- the selection graph's seams, which the passes fill (docs/architecture.md) ---------------------------------

KEEP_INDICES = "keep_indices"  # in: [S_kept], the positions later layers see (no merge)
MERGE_WEIGHTS = "merge_weights"  # in: [S_kept, S], later layers start from merge_weights @ h (merges)
KEEP_POSITIONS = "keep_positions"  # in: [S_kept], their position ids (merges)
KEY_BIAS = "key_bias"  # in: [S_kept], the kept tokens' key bias (merges; the upper stack derives it from kept_bias)
MERGE_SEAMS = (MERGE_WEIGHTS, KEEP_POSITIONS, KEY_BIAS)


def activation_name(layer: int) -> str:
    """Stack out: act.{layer} [S, W], the FFN activation of the prune layer (select reads it) and of each
    per-request neuron-sparse layer (the neurons graph reads it)."""
    return f"act.{layer}"


def attention_name(layer: int) -> str:
    """Lower out: attn_last.{layer} [H, S], the last query's attention over the new tokens at the prune layer
    (selectors that read it)."""
    return f"attn_last.{layer}"


# -- the graphs ------------------------------------------------------------------------------------------------

VISION_GRAPH = "vision"
DECODER = "decoder"  # a dense build's one stack: embedding, every layer, the head
LOWER = "lower"  # CoreMatching: embedding and layers 0..l_p
SELECT = "select"  # CoreMatching, prefill only, weightless: the kept tokens between the stacks
UPPER = "upper"  # CoreMatching: layers l_p+1..L-1 and the head
NEURONS = "neurons"  # per-request neuron-sparse layers, prefill only, weightless: core neurons, compacted FFN
# The stacks serve prefill (S = the prompt, past buffers of one masked slot) and decode (S = 1): their
# TensorRT engines have a profile for each phase.
STACKS = (DECODER, LOWER, UPPER)
PROFILES = ("prefill", "decode")
# A stack's ONNX Runtime form (fused contrib operators, `present.*` outputs) is `{stack}{FUSED_SUFFIX}`; the
# portable form, which TensorRT reads, is the stack's own name.
FUSED_SUFFIX = ".fused"


def fused_graph(stack: str) -> str:
    """lower -> lower.fused: the graph name of a stack's ONNX Runtime form."""
    return f"{stack}{FUSED_SUFFIX}"


def graph_set(dense: bool, per_request_neurons: bool) -> tuple[str, ...]:
    """The graphs of a build, in the order a prefill runs them."""
    if dense:
        return (VISION_GRAPH, DECODER)
    return (VISION_GRAPH, LOWER, SELECT, UPPER) + ((NEURONS,) if per_request_neurons else ())


@dataclass(frozen=True)
class GraphNames:
    """A graph's input and output names, in its order."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


VISION = GraphNames((PIXEL_VALUES,), (IMAGE_FEATURES,))


def stack_names(
    layers: Iterable[int],
    *,
    embeds: bool,
    head: bool,
    merge: bool,
    bound_layers: Iterable[int],
    act_layers: Iterable[int],
    attention_layer: int | None,
    fused: bool = False,
) -> GraphNames:
    """A decoder stack over `layers`. In: the new tokens (ids, the image features and their start, with the
    embedding; hidden states without), their positions, the valid length of the past buffers, a merge's
    image start and kept bias (the upper stack), the past buffers, the bound FFN weights. Out: the logits
    (with the head) or the hidden states, the new tokens' cache entries, the activations and attention the
    prefill-only graphs read. The fused form outputs the buffers themselves (present.*) for the new entries."""
    layers = list(layers)
    inputs = [INPUT_IDS, IMAGE_FEATURES, IMAGE_START] if embeds else [HIDDEN]
    inputs += [POSITION_IDS, PAST_LENGTH]
    if merge:
        inputs += [IMAGE_START, KEPT_BIAS]
    inputs += cache_names(PAST, layers) + ffn_names(bound_layers)
    outputs = [LOGITS if head else HIDDEN, *cache_names(PRESENT if fused else NEW, layers)]
    outputs += [activation_name(i) for i in act_layers]
    if attention_layer is not None:
        outputs.append(attention_name(attention_layer))
    return GraphNames(tuple(inputs), tuple(outputs))
