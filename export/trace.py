"""Tracing the vision graph and the decoder stacks with torch's dynamo ONNX exporter (docs/architecture.md).

Every graph gets explicit input and output names, and every sequence length
stays dynamic: `S` (the lower stack's or the decoder's new tokens: the prompt,
or one), `S_kept` (the upper stack's), `B` and `B_kept` (the cache buffers of the
full and of the pruned layers), `W` (the width of a bound FFN weight: all
neurons in prefill, the request's core neurons in decode).
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
    FFN_WEIGHTS,
    HIDDEN,
    IMAGE_FEATURES,
    IMAGE_START,
    INPUT_IDS,
    KEPT_BIAS,
    PAST,
    PAST_LENGTH,
    POSITION_IDS,
    VISION,
    cache_name,
    ffn_name,
)
from coreMatching.config import Budgets
from export import fused_ops
from export.modules import Decoder, Stack, StackPlan, Vision

log = logging.getLogger(__name__)


def _export(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    path: Path,
    inputs: list[str],
    outputs: list[str],
    dynamic: tuple[Any, ...],
    opset: int,
    translations: dict[Any, Any] | None = None,
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
            custom_translation_table=translations,
        )
    log.debug("exporter output for %s:\n%s", path.name, buffer.getvalue())
    model = fused_ops.contrib_names(program.model_proto)
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


@dataclass(frozen=True)
class GraphInput:
    """One input of a traced graph: an example tensor, and its symbolic axes (axis -> the manifest's dim)."""

    example: torch.Tensor
    axes: dict[int, str] = field(default_factory=dict)


def stack_examples(
    plan: StackPlan, geometry: Geometry, budgets: Budgets | None, dtype: torch.dtype
) -> dict[str, GraphInput]:
    """An example of every input of a stack, by name (`StackPlan.names` gives the order). Example sizes are
    distinct, so that the exporter cannot take two dims for equal."""
    n_img, d, kv_heads, hd = geometry.num_image_tokens, geometry.hidden_size, geometry.num_kv_heads, geometry.head_dim
    seq, length = ("S", "B") if plan.embeds else ("S_kept", "B_kept")
    new = n_img + 7 if plan.embeds else 11
    records = {
        INPUT_IDS: GraphInput(torch.zeros(1, new, dtype=torch.int64), {1: seq}),
        IMAGE_FEATURES: GraphInput(torch.zeros(1, n_img, d, dtype=dtype)),
        IMAGE_START: GraphInput(torch.tensor([3], dtype=torch.int64)),
        HIDDEN: GraphInput(torch.zeros(1, new, d, dtype=dtype), {1: seq}),
        POSITION_IDS: GraphInput(torch.arange(new, dtype=torch.int64), {0: seq}),
        PAST_LENGTH: GraphInput(torch.tensor([2], dtype=torch.int64)),
        KEPT_BIAS: GraphInput(torch.zeros(budgets.image_slots if plan.merge and budgets is not None else 1)),
    }
    for layer in plan.layers:
        for kind in CACHE_KINDS:
            records[cache_name(PAST, layer, kind)] = GraphInput(
                torch.zeros(1, kv_heads, 5, hd, dtype=dtype), {2: length}
            )
    # The bound FFN weights: every one neuron-major [W, d] (export.bound), W all neurons or the core ones.
    width = geometry.intermediate_size
    for layer in plan.bound:
        for weight in FFN_WEIGHTS:
            records[ffn_name(layer, weight)] = GraphInput(torch.zeros(width, d, dtype=dtype), {0: "W"})
    return records


def trace_stack(
    decoder: Decoder,
    plan: StackPlan,
    embed: torch.Tensor | None,
    geometry: Geometry,
    budgets: Budgets | None,
    path: Path,
    opset: int,
    dtype: torch.dtype,
    positions: int = 0,
) -> None:
    """One decoder stack (`export.modules.Stack`), serving prefill and decode; the fused form (`plan.fused`)
    with rotary tables of `positions` positions."""
    module = Stack(decoder, plan, None if embed is None else embed.to(dtype), positions)
    names = plan.names
    examples = stack_examples(plan, geometry, budgets, dtype)
    records = [examples[name] for name in names.inputs]
    dims = {name: torch.export.Dim(name, min=1, max=1 << 16) for name in ("S", "S_kept", "B", "B_kept", "W")}
    axes = tuple({axis: dims[dim] for axis, dim in r.axes.items()} for r in records)
    args = tuple(r.example for r in records)
    # The module takes (*inputs): their shapes go as one nested tuple.
    translations = fused_ops.translations() if plan.fused else None
    _export(module, args, path, [*names.inputs], [*names.outputs], (axes,), opset, translations)
