"""The bound FFN weights of the per-request neuron-sparse layers (docs/architecture.md, "Decode reads
compacted weights").

Those layers' FFN weights are inputs of the stacks, not constants: the runtime holds the full
weights once (the weights file's `bound` section) and binds them in prefill; the `neurons` graph
gathers the request's core neurons out of them, and decode binds that compacted copy to the same
inputs. Each is neuron-major ([W, d], `GATHER_AXES`), so the gather copies whole rows. A quantized build
binds them in their stored form (`export.passes.dequantize`): int8 data, or int4 nibble pairs along the
axis that is not gathered, and their scales, so that the compacted copy stays quantized too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from buildformat.geometry import Geometry
from buildformat.names import FFN_DOWN, FFN_WEIGHTS, QUANT_SCALE, ffn_name, part_name
from coreMatching.config import Budgets
from coreMatching.quant import quantize
from coreMatching.quant_scheme import Layout, WeightQuant
from export.passes.dequantize import ZERO_POINT, Stored, pack_nibbles, stored_form, stored_shapes

# Every bound weight is neuron-major, [W, d]: a request's core neurons are whole rows, which the neurons graph
# gathers as contiguous copies (columns of a [d, W] matrix were an element-by-element strided copy, a sixth of
# a 7B-shape prefill). W_gate and W_up are held as the HF weights [D, d] (the transpose of the traced MatMul
# layout [d, D]); W_down's MatMul layout [D, d] already is.
GATHER_AXES = dict.fromkeys(FFN_WEIGHTS, 0)
TRANSPOSED = frozenset(w for w in FFN_WEIGHTS if w != FFN_DOWN)  # bound = the traced weight transposed
# The axis a request gathers of each traced weight (MatMul layout [K, N]): the columns of gate and up, the rows
# of down. Their quantization is chosen there, as the reference's fake quantization chooses it.
TRACED_GATHER_AXES = {w: 1 if w in TRANSPOSED else 0 for w in FFN_WEIGHTS}


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


def full_shape(geometry: Geometry) -> tuple[int, int]:
    """A full bound weight's shape, [D, d] (each is neuron-major)."""
    return geometry.intermediate_size, geometry.hidden_size


def weight_form(geometry: Geometry, weight: str, quant: WeightQuant | None) -> Stored | None:
    """How a bound weight is stored (None: in floats): the traced weight's form, transposed with it."""
    if quant is None:
        return None
    d, width = geometry.hidden_size, geometry.intermediate_size
    traced = (d, width) if weight in TRANSPOSED else (width, d)
    form = stored_form(quant, traced, TRACED_GATHER_AXES[weight])
    return _transposed(form) if form is not None and weight in TRANSPOSED else form


def _transposed(form: Stored) -> Stored:
    """The stored form of a weight's transpose: its scales' (and blocks', and nibble pairs') axis swapped. An
    int8 gate or up keeps one scale per output channel, now per row ([D], DequantizeLinear axis 0)."""
    layout = Layout(form.layout.bits, 1 - form.layout.axis, form.layout.block_size)
    return Stored(layout, None if form.packed_axis is None else 1 - form.packed_axis)


def bound_parts(geometry: Geometry, budgets: Budgets | None, quant: WeightQuant | None, dtype: type) -> list[BoundPart]:
    """Every bound tensor of a build, in layer order."""
    parts = []
    for layer in [] if budgets is None else budgets.neuron_sparse_layers:
        for weight, axis in GATHER_AXES.items():
            name, shape = ffn_name(layer, weight), full_shape(geometry)
            form = weight_form(geometry, weight, quant)
            if form is None:
                parts.append(BoundPart(layer, weight, name, axis, shape, dtype))
                continue
            data_shape, scale_shape = stored_shapes(form, list(shape))
            data_dtype = np.uint8 if form.packed_axis is not None else np.int8
            # A per-output-channel scale follows its channels: gathered with the rows of gate and up ([D]), whole
            # for down ([d]). Blocked scales follow the gathered axis.
            scale_axis = (0 if form.layout.axis == axis else None) if len(scale_shape) == 1 else axis
            parts.append(
                BoundPart(layer, weight, part_name(name, form.data_suffix), axis, tuple(data_shape), data_dtype)
            )
            parts.append(BoundPart(layer, weight, part_name(name, QUANT_SCALE), scale_axis, tuple(scale_shape), dtype))
    return parts


def bound_values(
    layers: dict[int, dict[str, torch.Tensor]], geometry: Geometry, quant: WeightQuant | None, dtype: type
) -> dict[str, np.ndarray]:
    """The full bound tensors, by name. layers: layer -> bound weight name -> the traced weight it holds, in
    MatMul layout (gate_t [d, D], up_t [d, D], down_t [D, d]); gate and up are written transposed."""
    torch_dtype = torch.float16 if dtype == np.float16 else torch.float32
    values: dict[str, np.ndarray] = {}
    for layer, weights in layers.items():
        for weight in GATHER_AXES:
            w = weights[weight].detach().to(torch_dtype)  # [K, N]
            name = ffn_name(layer, weight)
            form = weight_form(geometry, weight, quant)
            if form is None:
                values[name] = _neuron_major(w, weight).numpy()
                continue
            # Quantized in the traced layout, as the reference is, then transposed: the same integers and scales.
            traced = _transposed(form) if weight in TRANSPOSED else form
            qw = quantize(w, traced.layout, torch_dtype)
            q, scale = _neuron_major(qw.q, weight).numpy(), qw.scale
            scale = (scale.t() if scale.dim() == 2 and weight in TRANSPOSED else scale).contiguous().numpy()
            assert form.layout.bits == 8 or form.packed_axis is not None, "a gathered int4 weight is nibble-packed"
            data = q if form.layout.bits == 8 else pack_nibbles(q + ZERO_POINT, form.packed_axis)
            values[part_name(name, form.data_suffix)] = np.ascontiguousarray(data)
            values[part_name(name, QUANT_SCALE)] = np.ascontiguousarray(scale)
    return values


def _neuron_major(w: torch.Tensor, weight: str) -> torch.Tensor:
    """A traced weight [K, N] -> the bound layout [D, d], contiguous."""
    return (w.t() if weight in TRANSPOSED else w).contiguous()
