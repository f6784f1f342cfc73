"""The names of the graphs' inputs and outputs, declared once (docs/architecture.md, "The graphs").

The export traces and rewrites the graphs under these names and the runtime binds tensors by them,
so in code a name is spelled here only: a build's graphs and the manifest that lists their I/O
are the contract, and renaming anything here breaks every build already made. Per-layer names are
functions of the layer index; the graph signatures (`VISION`, `EMBED`, `prefill_traced_names`,
`decode_names`) give the names in the order of the graphs' inputs and outputs.

Standard library only, like the rest of `buildformat`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# -- one tensor each -------------------------------------------------------------------------------------

PIXEL_VALUES = "pixel_values"  # vision in: [1, 3, H, W]
IMAGE_FEATURES = "image_features"  # vision out: [1, n_img, d]
INPUT_IDS = "input_ids"  # embed in: [1, S]
INPUTS_EMBEDS = "inputs_embeds"  # embed out [1, S, d]; prefill in [1, S, d]; decode in [1, 1, d]
LOGITS = "logits"  # prefill and decode out: [1, V], the last position's
IMAGE_START = "image_start"  # [1] int64: the first image token (prefill with a selection, decode with a merge)
KEPT_IMAGE_TOKENS = "kept_image_tokens"  # prefill out: [k], indices into the image's tokens
KEPT_BIAS = "kept_bias"  # prefill out, decode in (merges): [k'], the pruned layers' image-slot key bias
POSITION_IDS = "position_ids"  # decode in: [1], also the cached tokens of the full layers
PAST_KEPT_LENGTH = "past_kept_length"  # decode in: [1], the cached tokens of the pruned layers

# The decode inputs that change every step (the rest are bound once per request).
STEP_INPUTS = (POSITION_IDS, PAST_KEPT_LENGTH)

# -- the KV cache: {role}.{layer}.{kind} -----------------------------------------------------------------

PRESENT = "present"  # prefill out: [1, n_kv, L, hd], L the prompt (or the kept tokens after the prune layer)
PAST = "past"  # decode in: [1, n_kv, B, hd], a buffer of B positions, zero padded
NEW = "new"  # decode out: [1, n_kv, 1, hd], the step's own entries for the matching buffer
CACHE_KINDS = ("key", "value")


def cache_name(role: str, layer: int, kind: str) -> str:
    """present.3.key, past.3.value, ..."""
    return f"{role}.{layer}.{kind}"


def cache_names(role: str, num_layers: int) -> list[str]:
    """{role}.{i}.key/value of every layer, in layer order (key before value)."""
    return [cache_name(role, i, kind) for i in range(num_layers) for kind in CACHE_KINDS]


def past_name(present: str) -> str:
    """present.3.key -> past.3.key: the decode buffer that a prefill cache output fills."""
    return PAST + present[len(PRESENT) :]


def present_name(past: str) -> str:
    """past.3.key -> present.3.key: the prefill output that fills a decode buffer."""
    return PRESENT + past[len(PAST) :]


def new_name(past: str) -> str:
    """past.3.key -> new.3.key: the decode output that holds the step's entries for that buffer."""
    return NEW + past[len(PAST) :]


def is_present(name: str) -> bool:
    """A prefill cache output."""
    return name.startswith(f"{PRESENT}.")


def is_past(name: str) -> bool:
    """A decode cache buffer."""
    return name.startswith(f"{PAST}.")


# -- the prompt's core neurons and the compacted FFN weights of the neuron-sparse layers -------------------

CORE_NEURONS = "core_neurons"
FFN = "ffn"
FFN_WEIGHTS = ("gate_t", "up_t", "down_t")  # [d, N], [d, N], [N, d]: the MatMul layout (x @ w_t)


def core_neurons_name(layer: int) -> str:
    """Prefill out: core_neurons.{layer} [N] int64, ascending."""
    return f"{CORE_NEURONS}.{layer}"


def core_neurons_layer(name: str) -> int | None:
    """The layer of a core_neurons.{layer} name; None for any other name."""
    head, _, layer = name.partition(".")
    return int(layer) if head == CORE_NEURONS and layer.isdigit() else None


def ffn_name(layer: int, weight: str) -> str:
    """Prefill out, decode in: ffn.{layer}.{weight}, a compacted FFN weight (a request-long decode input)."""
    return f"{FFN}.{layer}.{weight}"


def ffn_names(layers: Iterable[int]) -> list[str]:
    """Every compacted weight of `layers`, in layer order."""
    return [ffn_name(i, w) for i in layers for w in FFN_WEIGHTS]


def is_ffn(name: str) -> bool:
    """A compacted FFN weight, or a part of its stored form (ffn.{i}.{w}.q, ...)."""
    return name.startswith(f"{FFN}.")


def ffn_layer(name: str) -> int:
    """The layer of an ffn.{layer}.* name."""
    return int(name.split(".")[1])


def is_request_input(name: str) -> bool:
    """A prefill output that the decode graph reads unchanged for the whole answer: the compacted FFN weights
    and a merge's kept_bias."""
    return is_ffn(name) or name == KEPT_BIAS


# A quantized weight (and a quantized compacted-FFN input) is stored as {name}.{part}: its integers
# (`q`, or `packed` nibble pairs for int4 weights that a request gathers) and their `scale`.
QUANT_DATA, QUANT_PACKED, QUANT_SCALE = "q", "packed", "scale"


def part_name(name: str, part: str) -> str:
    """ffn.3.gate_t, q -> ffn.3.gate_t.q: one stored part of a quantized tensor."""
    return f"{name}.{part}"


# -- the traced prefill's seams, which the passes fill (docs/architecture.md) -------------------------------

KEEP_INDICES = "keep_indices"  # in: [S_kept], the positions later layers see (no merge)
MERGE_WEIGHTS = "merge_weights"  # in: [S_kept, S], later layers start from merge_weights @ h (merges)
KEEP_POSITIONS = "keep_positions"  # in: [S_kept], their position ids (merges)
KEY_BIAS = "key_bias"  # in: [S_kept], added to every attention logit of later layers (merges)
MERGE_SEAMS = (MERGE_WEIGHTS, KEEP_POSITIONS, KEY_BIAS)


def activation_name(layer: int) -> str:
    """Out: act.{layer} [T, D], the FFN activation of the prune layer and of each neuron-sparse layer."""
    return f"act.{layer}"


def attention_name(layer: int) -> str:
    """Out: attn_last.{layer} [H, T], the last query's attention at the prune layer (selectors that read it)."""
    return f"attn_last.{layer}"


# -- the graphs' signatures ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphNames:
    """A graph's input and output names, in its order."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


VISION = GraphNames((PIXEL_VALUES,), (IMAGE_FEATURES,))
EMBED = GraphNames((INPUT_IDS,), (INPUTS_EMBEDS,))


def prefill_traced_names(num_layers: int, seam_inputs: Iterable[str], seam_outputs: Iterable[str]) -> GraphNames:
    """The prefill as traced, before the passes: inputs_embeds and the seams in; logits, the cache, the seams
    out. The passes replace the seams by image_start, core_neurons.*, kept_image_tokens, kept_bias and ffn.*."""
    return GraphNames((INPUTS_EMBEDS, *seam_inputs), (LOGITS, *cache_names(PRESENT, num_layers), *seam_outputs))


def decode_names(num_layers: int, pruned: bool, merge: bool, sparse_layers: Iterable[int]) -> GraphNames:
    """The decode graph. In: the embedding and position, the pruned layers' length (CoreMatching builds), a
    merge's image start and key bias, the cache buffers, the compacted FFN. Out: logits, the step's entries."""
    inputs = [INPUTS_EMBEDS, POSITION_IDS]
    if pruned:
        inputs.append(PAST_KEPT_LENGTH)
    if merge:
        inputs += [IMAGE_START, KEPT_BIAS]
    inputs += cache_names(PAST, num_layers) + ffn_names(sparse_layers)
    return GraphNames(tuple(inputs), (LOGITS, *cache_names(NEW, num_layers)))
