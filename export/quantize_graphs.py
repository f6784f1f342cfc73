"""Weight-only quantization of a build's graphs (docs/quantization.md).

Every constant MatMul weight of the vision graph and of the decoder stacks is quantized where it
lies (each weight is in one graph); the stacks' bound FFN inputs (the per-request neuron-sparse
layers, `export.bound`) take their stored form, dequantized inside the stack, so that the full
weights the runtime binds in prefill and the compacted copy it binds in decode both stay quantized.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from buildformat.geometry import Geometry
from buildformat.names import VISION_GRAPH, ffn_name
from coreMatching.quant_scheme import WeightQuant
from export.bound import GATHER_AXES, weight_form
from export.modules import StackPlan
from export.passes.dequantize import dequantize_input, quantize_weights
from export.passes.ops import find_tensor
from export.trace import save_model

log = logging.getLogger(__name__)


def quantize_graphs(
    build: Path, quant: WeightQuant, geometry: Geometry, plans: dict[str, StackPlan], vision: bool = True
) -> dict[str, int]:
    """Quantizes vision.onnx (with `vision`) and the stacks in `build` (`plans` by graph name). -> counts of the
    2-D MatMul weights {"quantized", "kept_float"}, the bound ones included"""
    counts = {"quantized": 0, "kept_float": 0}
    for name in (VISION_GRAPH, *plans) if vision else plans:
        path = build / f"{name}.onnx"
        graph = gs.import_onnx(onnx.load(path))
        done = quantize_weights(graph, quant, {})
        counts = {key: counts[key] + done[key] for key in counts}
        for layer in plans[name].bound if name in plans else ():
            for weight in GATHER_AXES:
                old = find_tensor(graph, ffn_name(layer, weight))
                form = weight_form(geometry, weight, quant)
                if form is None:
                    log.info("%s stays in floats", old.name)
                    counts["kept_float"] += 1
                    continue
                dequantize_input(graph, old, form, list(old.shape))
                counts["quantized"] += 1
        save_model(onnx.shape_inference.infer_shapes(gs.export_onnx(graph), strict_mode=True), path)
    return counts
