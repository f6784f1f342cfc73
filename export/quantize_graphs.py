"""Weight-only quantization of a build's graphs (docs/quantization.md).

The prefill is quantized inside the build's pass pipeline (before the FFN gather, which then gathers
stored integers and scales); this module quantizes the vision and decode graphs, and turns the
decode graph's compacted-FFN inputs into their stored form, so that the per-request copy stays
quantized too.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from buildformat.names import ffn_name
from coreMatching.config import Budgets
from coreMatching.quant_scheme import WeightQuant
from export.modules import ffn_prefix
from export.passes.dequantize import dequantize_input, quantize_weights, stored_form
from export.passes.ffn_gather import GATHER_AXES
from export.passes.ops import find_tensor
from export.trace import save_model

log = logging.getLogger(__name__)


def gathered_weights(budgets: Budgets | None) -> dict[str, int]:
    """The FFN weights a request gathers (name -> gather axis): those of the neuron-sparse layers."""
    if budgets is None:
        return {}
    return {
        f"{ffn_prefix(layer)}.{w}": axis for layer in budgets.neuron_sparse_layers for w, axis in GATHER_AXES.items()
    }


def quantize_graphs(build: Path, quant: WeightQuant, budgets: Budgets | None) -> dict[str, int]:
    """Quantizes vision.onnx and decode.onnx in `build` (the prefill is done by the pass pipeline).
    -> counts of the vision graph's weights {"quantized", "kept_float"} (the decode graph's are the prefill's)"""
    counts = {"quantized": 0, "kept_float": 0}
    for name in ("vision", "decode"):
        path = build / f"{name}.onnx"
        graph = gs.import_onnx(onnx.load(path))
        done = quantize_weights(graph, quant, {})
        if name == "decode":
            _quantize_ffn_inputs(graph, quant, budgets)
        else:
            counts = {key: counts[key] + done[key] for key in counts}
        save_model(onnx.shape_inference.infer_shapes(gs.export_onnx(graph), strict_mode=True), path)
    return counts


def _quantize_ffn_inputs(graph: gs.Graph, quant: WeightQuant, budgets: Budgets | None) -> None:
    """The decode graph's `ffn.{layer}.{w}` inputs take the stored form the prefill gathers (same form as the
    full weight: `stored_form` of its shape [d, D] or [D, d])."""
    if budgets is None:
        return
    for layer in budgets.neuron_sparse_layers:
        for w, axis in GATHER_AXES.items():
            old = find_tensor(graph, ffn_name(layer, w))
            compact = list(old.shape)
            full = list(compact)
            full[axis] = budgets.intermediate_size
            form = stored_form(quant, tuple(full), axis)
            if form is None:
                log.info("%s stays in floats", old.name)
                continue
            dequantize_input(graph, old, form, compact)
