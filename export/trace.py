"""Tracing the four graphs with torch's dynamo ONNX exporter (docs/architecture.md).

Every graph gets explicit input and output names, and every sequence length
stays dynamic: `S` (prompt), `S_kept` (prompt after pruning), `P` and
`P_kept` (cached tokens of the full and of the pruned layers in decode).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

from buildformat.geometry import Geometry
from buildformat.names import (
    CACHE_KINDS,
    EMBED,
    FFN_WEIGHTS,
    IMAGE_START,
    INPUTS_EMBEDS,
    KEPT_BIAS,
    PAST,
    PAST_KEPT_LENGTH,
    POSITION_IDS,
    VISION,
    cache_name,
    ffn_name,
    prefill_traced_names,
)
from coreMatching.config import Budgets
from export.modules import Decode, Decoder, Embed, Prefill, Vision

log = logging.getLogger(__name__)


def _export(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    path: Path,
    inputs: list[str],
    outputs: list[str],
    dynamic: tuple[Any, ...],
    opset: int,
) -> None:
    # The exporter reports its progress on stdout and warns about torchvision ops it skips:
    # keep both out of the user's terminal (they go to the debug log).
    buffer = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(buffer), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(),
            args,
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes=dynamic,
            opset_version=opset,
            dynamo=True,
            external_data=False,
            optimize=True,
            verbose=False,
        )
    log.debug("exporter output for %s:\n%s", path.name, buffer.getvalue())
    model = program.model_proto
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, path)


# protobuf cannot hold more than 2 GB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**20


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Saves one graph; models over 2 GB keep their weights in `<file>.data` (ONNX external data)."""
    if model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, path)
    else:
        onnx.save_model(
            model,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"{path.name}.data",
            size_threshold=1024,
        )


def trace_vision(llava: Any, geometry: Geometry, path: Path, opset: int, dtype: torch.dtype) -> None:
    pixels = torch.zeros(1, 3, geometry.image_size, geometry.image_size, dtype=dtype)
    _export(Vision(llava), (pixels,), path, [*VISION.inputs], [*VISION.outputs], ({},), opset)


def trace_embed(llava: Any, path: Path, opset: int) -> None:
    ids = torch.zeros(1, 9, dtype=torch.int64)
    # Its own dim: it embeds whole prompts and single generated tokens (a TensorRT profile from 1).
    dims = ({1: torch.export.Dim("T", min=1, max=1 << 20)},)
    _export(Embed(llava), (ids,), path, [*EMBED.inputs], [*EMBED.outputs], dims, opset)


def trace_prefill(
    decoder: Decoder, geometry: Geometry, budgets: Budgets | None, path: Path, opset: int, dtype: torch.dtype
) -> None:
    """The dense prefill with the seams of `export.modules.Prefill` (keep_indices or merge inputs in, activations
    out)."""
    n_img = geometry.num_image_tokens
    seq = n_img + 7  # distinct example sizes, so the exporter cannot take two dims for equal
    embeds = torch.zeros(1, seq, geometry.hidden_size, dtype=dtype)
    module = Prefill(decoder, budgets)
    s = torch.export.Dim("S", min=2, max=1 << 16)
    names = prefill_traced_names(geometry.num_layers, module.seam_inputs, module.seam_outputs)
    inputs, outputs = [*names.inputs], [*names.outputs]
    if budgets is None:
        _export(module, (embeds,), path, inputs, outputs, ({1: s},), opset)
        return
    kept = budgets.token_budget if budgets.token_budget != "auto" else min(budgets.auto_range[1], n_img - 1)
    keep = torch.cat([torch.arange(3), 3 + torch.arange(kept), torch.arange(3 + n_img, seq)])
    s_kept = torch.export.Dim("S_kept", min=1, max=1 << 16)
    if not module.merge:
        seams: tuple[torch.Tensor, ...] = (keep,)
        dims: tuple[Any, ...] = ({1: s}, ({0: s_kept},))  # the module takes (inputs_embeds, *seams)
    else:
        rows = keep.numel() + budgets.merged_tokens
        weights = torch.zeros(rows, seq)  # float32 whatever the precision: the passes compute them
        weights[torch.arange(keep.numel()), keep] = 1.0
        positions = torch.cat([keep, keep[-1:].repeat(budgets.merged_tokens)])
        seams = (weights, positions, torch.zeros(rows))
        dims = ({1: s}, ({0: s_kept, 1: s}, {0: s_kept}, {0: s_kept}))
    _export(module, (embeds, *seams), path, inputs, outputs, dims, opset)


@dataclass(frozen=True)
class GraphInput:
    """One input of a traced graph: an example tensor, and its symbolic axes (axis -> the manifest's dim)."""

    example: torch.Tensor
    axes: dict[int, str] = field(default_factory=dict)


def decode_examples(
    module: Decode, geometry: Geometry, budgets: Budgets | None, dtype: torch.dtype
) -> dict[str, GraphInput]:
    """An example of every input of the decode graph, by name (`Decode.names` gives the order)."""
    n_img, d, kv_heads, hd = geometry.num_image_tokens, geometry.hidden_size, geometry.num_kv_heads, geometry.head_dim
    kept = (
        n_img
        if budgets is None
        else (budgets.auto_range[0] if budgets.token_budget == "auto" else budgets.token_budget)
    )
    position = n_img + 9
    buffer, buffer_kept = position + 5, position - n_img + kept + 3  # distinct example sizes
    n = geometry.intermediate_size if budgets is None else budgets.core_neurons
    records = {
        INPUTS_EMBEDS: GraphInput(torch.zeros(1, 1, d, dtype=dtype)),
        POSITION_IDS: GraphInput(torch.tensor([position], dtype=torch.int64)),
        PAST_KEPT_LENGTH: GraphInput(torch.tensor([position - n_img + kept], dtype=torch.int64)),
        # A merge's key bias of the pruned layers' image slots, which start at image_start.
        IMAGE_START: GraphInput(torch.tensor([3], dtype=torch.int64)),
        KEPT_BIAS: GraphInput(torch.zeros(budgets.image_slots if module.merge and budgets is not None else 1)),
    }
    for layer in range(geometry.num_layers):
        pruned = budgets is not None and layer > budgets.prune_layer
        length, dim = (buffer_kept, "B_kept") if pruned else (buffer, "B")
        for kind in CACHE_KINDS:
            example = torch.zeros(1, kv_heads, length, hd, dtype=dtype)
            records[cache_name(PAST, layer, kind)] = GraphInput(example, {2: dim})
    shapes = dict(zip(FFN_WEIGHTS, [(d, n), (d, n), (n, d)], strict=True))  # gate_t, up_t, down_t
    for layer in [] if budgets is None else budgets.neuron_sparse_layers:
        for weight, shape in shapes.items():
            records[ffn_name(layer, weight)] = GraphInput(torch.zeros(*shape, dtype=dtype))
    return records


def trace_decode(
    decoder: Decoder, geometry: Geometry, budgets: Budgets | None, path: Path, opset: int, dtype: torch.dtype
) -> None:
    """The decode step against preallocated buffers (`export.modules.Decode`)."""
    module = Decode(decoder, budgets)
    names = module.names
    examples = decode_examples(module, geometry, budgets, dtype)
    records = [examples[name] for name in names.inputs]
    dims = {name: torch.export.Dim(name, min=1, max=1 << 16) for name in ("B", "B_kept")}
    axes = [{axis: dims[dim] for axis, dim in r.axes.items()} for r in records]
    args = tuple(r.example for r in records)
    # The module takes (inputs_embeds, position_ids, *rest): the rest's shapes go as one nested tuple.
    _export(module, args, path, [*names.inputs], [*names.outputs], (axes[0], axes[1], tuple(axes[2:])), opset)
