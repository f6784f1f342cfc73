"""Pass: weight-only quantization of the MatMul weights (docs/quantization.md).

Before: MatMul(x, W) with W a 2-D float initializer [K, N].
After:  MatMul(x, DequantizeLinear(Wq, scale)), the dequantized tensor keeping W's name, so that the
later passes (the FFN gather) find it:

- int8: `{W}.q` int8 [K, N], `{W}.scale` [N], axis 1 (per output channel). A bound gate or up weight
  (`export.bound`) is held transposed, [N, K], with its scale [N] along axis 0, so that a gathered row of
  integers carries its own scale;
- int4: `{W}.q` int4 [K, N] (ONNX packs two values per byte), `{W}.scale` [K/B, N], axis 0,
  block_size B (opset 21). ONNX Runtime fuses this form into MatMulNBits; TensorRT 10 reads it as
  weight-only INT4.
- int4 weights that a request gathers (`gathered`: the neuron-sparse layers' FFN): ONNX has no Gather
  of int4, so they are stored as uint8 nibble pairs along the axis that is not gathered
  (`{W}.packed`), unpacked by BitwiseAnd/BitShift into uint8 0..15 and dequantized with zero point 8.
  Pairs and blocks lie along the axis that is not gathered (the bound weights' rows are).

The integers and scales come from `coreMatching.quant.quantize`, the arithmetic the reference's
fake-quant path uses, so a build and its reference dequantize to the same weights.
`dequantize_input` builds the same dequantization over graph inputs (the decode graph's compacted
FFN weights).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from onnx_graphsurgeon.ir.tensor import LazyValues

from buildformat.names import QUANT_DATA, QUANT_PACKED, QUANT_SCALE, part_name
from coreMatching.quant import Quantized, quantize
from coreMatching.quant_scheme import Layout, WeightQuant
from export.passes.ops import Ops

log = logging.getLogger(__name__)

ZERO_POINT = 8  # the uint8 nibbles hold q + 8


@dataclass(frozen=True)
class Stored:
    """How one weight is stored: its layout, and whether as uint8 nibble pairs (`packed_axis`, a gathered
    int4 weight: 0 pairs along K, 1 along N) or in the standard form (None)."""

    layout: Layout
    packed_axis: int | None = None

    @property
    def data_suffix(self) -> str:
        return QUANT_PACKED if self.packed_axis is not None else QUANT_DATA


def stored_form(scheme: WeightQuant, shape: tuple[int, ...], gather_axis: int | None) -> Stored | None:
    """The stored form of a weight of `shape` [K, N] that a request gathers along `gather_axis` (None: never)."""
    layout = scheme.layout(shape, rows_gathered=gather_axis == 0)
    if layout is None:
        return None
    if layout.bits == 4 and gather_axis is not None:
        return Stored(layout, packed_axis=1 - gather_axis)
    return Stored(layout)


def quantize_weights(graph: gs.Graph, scheme: WeightQuant, gathered: Mapping[str, int]) -> dict[str, int]:
    """Replaces the 2-D float weights of every MatMul; `gathered`: weight name -> the axis a request gathers.
    -> counts {"quantized": n, "kept_float": m}"""
    counts = {"quantized": 0, "kept_float": 0}
    done: dict[str, gs.Variable] = {}
    for node in [n for n in graph.nodes if n.op == "MatMul"]:
        w = node.inputs[1]
        if not isinstance(w, gs.Constant) or len(w.shape) != 2 or w.dtype not in (np.float32, np.float16):
            continue
        if w.name not in done:
            form = stored_form(scheme, tuple(w.shape), gathered.get(w.name))
            if form is None:
                counts["kept_float"] += 1
                log.info("%s %s stays in floats (its sides are not multiples of the block)", w.name, w.shape)
                continue
            done[w.name] = _replace_constant(graph, w, form)
            counts["quantized"] += 1
        node.inputs[1] = done[w.name]
    graph.cleanup().toposort()
    return counts


def _replace_constant(graph: gs.Graph, w: gs.Constant, form: Stored) -> gs.Variable:
    name, dtype = w.name, w.values.dtype
    w.name = f"{name}.float"  # freed for the dequantized tensor; the constant goes with cleanup()
    qw = quantize(torch.from_numpy(np.asarray(w.values)), form.layout, _torch_dtype(dtype))
    data = _data_constant(name, qw, form)
    scale = gs.Constant(part_name(name, QUANT_SCALE), qw.scale.numpy())
    out = dequantize(graph, data, scale, form, list(w.shape), f"{name}.dq")
    out.name = name
    return out


def dequantize(
    graph: gs.Graph, data: gs.Tensor, scale: gs.Tensor, form: Stored, shape: list[int], prefix: str
) -> gs.Variable:
    """DequantizeLinear of one stored weight (unpacking nibble pairs first). -> the float weight [K, N]"""
    ops = Ops(graph, prefix)
    layout = form.layout
    attrs = {"axis": layout.axis}
    if layout.block_size is not None:
        attrs["block_size"] = layout.block_size
    inputs = [data, scale]
    if form.packed_axis is not None:
        # A blocked DequantizeLinear takes a zero point of the scale's shape: the scalar 8, expanded in the
        # graph (nothing stored).
        scale_shape = ops("Shape", [scale], "scale_shape", dtype=np.int64)
        zero_point = ops("Expand", [ops.const("zero_point", ZERO_POINT, np.uint8), scale_shape], "zp", dtype=np.uint8)
        inputs = [_unpack(ops, data, form.packed_axis, shape), scale, zero_point]
    return ops("DequantizeLinear", inputs, "weight", dtype=scale.dtype, shape=shape, attrs=attrs)


def _unpack(ops: Ops, packed: gs.Tensor, axis: int, shape: list[int]) -> gs.Variable:
    """uint8 nibble pairs along `axis` -> uint8 values 0..15 [K, N]. packed: [K/2, N] (axis 0) or [K, N/2]."""
    low = ops("BitwiseAnd", [packed, ops.const("low_mask", 0x0F, np.uint8)], "low", dtype=np.uint8)
    high = ops(
        "BitShift", [packed, ops.const("shift", 4, np.uint8)], "high", dtype=np.uint8, attrs={"direction": "RIGHT"}
    )
    # Element 2i of the pair axis is the low nibble, 2i + 1 the high one: interleave on a new axis after it.
    axes = ops.const("pair_axis", [axis + 1], np.int64)
    low = ops("Unsqueeze", [low, axes], "low3", dtype=np.uint8)
    high = ops("Unsqueeze", [high, axes], "high3", dtype=np.uint8)
    pairs = ops("Concat", [low, high], "pairs", dtype=np.uint8, attrs={"axis": axis + 1})
    # [K/2, 2, N] or [K, N/2, 2] -> [K, N]; the packed axis's length is static (a bound weight's other axis
    # is "W": every neuron in prefill, the core neurons in decode).
    target = ops.const("shape", [shape[0], -1] if axis == 0 else [-1, shape[1]], np.int64)
    return ops("Reshape", [pairs, target], "values", dtype=np.uint8, shape=shape)


def dequantize_input(graph: gs.Graph, old: gs.Variable, form: Stored, shape: list[int]) -> tuple[gs.Variable, ...]:
    """Replaces the float graph input `old` [K, N] by its stored form's inputs (`{old}.q` or `.packed`, and
    `{old}.scale`) and their dequantization. -> the new inputs (data, scale)"""
    data_shape, scale_shape = stored_shapes(form, shape)
    data_dtype = np.uint8 if form.packed_axis is not None else np.int8
    data = gs.Variable(part_name(old.name, form.data_suffix), dtype=data_dtype, shape=data_shape)
    if form.layout.bits == 4 and form.packed_axis is None:
        raise ValueError(f"{old.name}: an int4 graph input must be nibble-packed (ONNX cannot gather int4)")
    scale = gs.Variable(part_name(old.name, QUANT_SCALE), dtype=old.dtype, shape=scale_shape)
    out = dequantize(graph, data, scale, form, shape, f"{old.name}.dq")
    graph.inputs = [t for t in graph.inputs if t is not old] + [data, scale]
    for node in graph.nodes:
        node.inputs = [out if t is old else t for t in node.inputs]
    for i, t in enumerate(graph.outputs):
        if t is old:
            graph.outputs[i] = out
    out.name = old.name
    graph.cleanup().toposort()
    return data, scale


def stored_shapes(form: Stored, shape: list[int]) -> tuple[list[int], list[int]]:
    """(data shape, scale shape) of a weight [K, N] in its stored form."""
    k, n = shape
    layout = form.layout
    if form.packed_axis == 0:
        data = [k // 2, n]
    elif form.packed_axis == 1:
        data = [k, n // 2]
    else:
        data = [k, n]
    if layout.block_size is None:
        scale = [shape[layout.axis]]  # per output channel: axis 1, or axis 0 of a bound gate or up held [N, K]
    elif layout.axis == 0:
        scale = [k // layout.block_size, n]
    else:
        scale = [k, n // layout.block_size]
    return data, scale


def _data_constant(name: str, qw: Quantized, form: Stored) -> gs.Constant:
    q = qw.q.numpy()  # int8 [K, N]
    stored = part_name(name, form.data_suffix)
    if form.layout.bits == 8:
        return gs.Constant(stored, q)
    if form.packed_axis is not None:
        return gs.Constant(stored, pack_nibbles(q + ZERO_POINT, form.packed_axis))
    # ONNX int4: two values per byte in row-major order, the first in the low nibble (numpy has no int4,
    # so the tensor proto is written directly).
    flat = (q.reshape(-1) & 0x0F).astype(np.uint8)
    raw = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
    proto = onnx.helper.make_tensor(stored, onnx.TensorProto.INT4, list(q.shape), raw, raw=True)
    return gs.Constant(stored, LazyValues(proto))


def pack_nibbles(values: np.ndarray, axis: int) -> np.ndarray:
    """uint8 values 0..15 [K, N] -> pairs along `axis` in one byte (element 2i low, 2i + 1 high)."""
    v = values.astype(np.uint8)
    low, high = (v[0::2], v[1::2]) if axis == 0 else (v[:, 0::2], v[:, 1::2])
    return (low | (high << 4)).astype(np.uint8)


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.float16 if dtype == np.float16 else torch.float32
