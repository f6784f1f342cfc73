"""The bound FFN weights of the per-request neuron-sparse layers (docs/architecture.md, "Decode reads
compacted weights").

Those layers' FFN weights are inputs of the stacks, not constants: the runtime holds the full
weights once (the weights file's `bound` section) and binds them in prefill; the `neurons` graph
gathers the request's core neurons out of them, and decode binds that compacted copy to the same
inputs. A quantized build binds them in their stored form (`export.passes.dequantize`): int8 data,
or int4 nibble pairs along the axis that is not gathered, and their scales, so that the compacted
copy stays quantized too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from buildformat.geometry import Geometry
from buildformat.names import FFN_WEIGHTS, QUANT_SCALE, ffn_name, part_name
from coreMatching.config import Budgets
from coreMatching.quant import quantize
from coreMatching.quant_scheme import WeightQuant
from export.passes.dequantize import ZERO_POINT, Stored, pack_nibbles, stored_form, stored_shapes

# The gather axis of each weight ([d, D], [d, D], [D, d]): W_gate and W_up lose columns, W_down loses rows.
GATHER_AXES = dict(zip(FFN_WEIGHTS, (1, 1, 0), strict=True))


@dataclass(frozen=True)
class BoundPart:
    """One bound tensor: a float weight, or the data or scale of a quantized one.

    name: the stack input (ffn.{layer}.{weight}[.q|.packed|.scale]); axis: the axis the request's core neurons
    gather (None: a scale that passes whole); shape: the full tensor's (its gathered axis is "W" in the stacks).
    """

    layer: int
    weight: str
    name: str
    axis: int | None
    shape: tuple[int, ...]
    dtype: type


def full_shape(geometry: Geometry, weight: str) -> tuple[int, int]:
    d, width = geometry.hidden_size, geometry.intermediate_size
    return (width, d) if weight == "down_t" else (d, width)


def weight_form(geometry: Geometry, weight: str, quant: WeightQuant | None) -> Stored | None:
    """How a bound weight is stored (None: in floats)."""
    return None if quant is None else stored_form(quant, full_shape(geometry, weight), GATHER_AXES[weight])


def bound_parts(geometry: Geometry, budgets: Budgets | None, quant: WeightQuant | None, dtype: type) -> list[BoundPart]:
    """Every bound tensor of a build, in layer order."""
    parts = []
    for layer in [] if budgets is None else budgets.neuron_sparse_layers:
        for weight, axis in GATHER_AXES.items():
            name, shape = ffn_name(layer, weight), full_shape(geometry, weight)
            form = weight_form(geometry, weight, quant)
            if form is None:
                parts.append(BoundPart(layer, weight, name, axis, shape, dtype))
                continue
            data_shape, scale_shape = stored_shapes(form, list(shape))
            data_dtype = np.uint8 if form.packed_axis is not None else np.int8
            # A per-output-channel scale [N] follows the columns; blocked scales follow the gathered axis.
            scale_axis = (0 if axis == 1 else None) if len(scale_shape) == 1 else axis
            parts.append(
                BoundPart(layer, weight, part_name(name, form.data_suffix), axis, tuple(data_shape), data_dtype)
            )
            parts.append(BoundPart(layer, weight, part_name(name, QUANT_SCALE), scale_axis, tuple(scale_shape), dtype))
    return parts


def bound_values(
    layers: dict[int, dict[str, torch.Tensor]], geometry: Geometry, quant: WeightQuant | None, dtype: type
) -> dict[str, np.ndarray]:
    """The full bound tensors, by name. layers: layer -> weight name -> the traced weight in MatMul layout."""
    torch_dtype = torch.float16 if dtype == np.float16 else torch.float32
    values: dict[str, np.ndarray] = {}
    for layer, weights in layers.items():
        for weight in GATHER_AXES:
            w = weights[weight].detach().to(torch_dtype).contiguous()
            name = ffn_name(layer, weight)
            form = weight_form(geometry, weight, quant)
            if form is None:
                values[name] = w.numpy()
                continue
            qw = quantize(w, form.layout, torch_dtype)
            q = qw.q.numpy()
            assert form.layout.bits == 8 or form.packed_axis is not None, "a gathered int4 weight is nibble-packed"
            data = q if form.layout.bits == 8 else pack_nibbles(q + ZERO_POINT, form.packed_axis)
            values[part_name(name, form.data_suffix)] = np.ascontiguousarray(data)
            values[part_name(name, QUANT_SCALE)] = np.ascontiguousarray(qw.scale.numpy())
    return values
