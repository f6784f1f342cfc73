"""Validation of a quantized build (docs/quantization.md, validation).

Two checks and a measurement:

1. The cost of the quantization: the reference on the float weights against the reference on the
   quantized-then-dequantized weights (`coreMatching.quant.fake_quantize_`): how far the logits move
   and how many greedy tokens stay the same. Reported, not a pass/fail criterion (it is the
   scheme's property, not the export's; the evaluation measures its accuracy).
2. The export, with the same arithmetic: the build as the runtime runs it (MatMulNBits in fp32,
   accuracy level 1) against the fake-quant reference, with the float precision's criteria. The
   graphs dequantize the same integers with the same scales, so any difference is an export error.
3. Measured only: MatMulNBits' accuracy level 4 (ONNX Runtime's own default) multiplies with
   activations quantized to int8 per block, which no reference does; how far it moves the logits and
   the greedy tokens is reported (on the default model it changes the first answer token, which is
   why the runtime does not use it by default).

The reference model is fake-quantized in place.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from buildformat import ArithmeticCheck, DistanceToFloat, Manifest, QuantizationChecks, ValidationRecord
from buildformat.names import STACKS, ffn_layer, is_ffn
from coreMatching.quant import down_projections, fake_quantize_
from coreMatching.quant_scheme import WeightQuant
from export.validate import (
    CRITERIA,
    _reference,
    corematching_from_manifest,
    validate_build,
    validation_cases,
)
from models.answer import build_prompt

log = logging.getLogger(__name__)

SAME_ARITHMETIC = 1  # MatMulNBits in fp32: the runtime's default
FAST = 4  # ONNX Runtime's default: int8 activations in the fused kernels (measured, not validated)


def validate_quantized_build(
    build_dir: str | Path, manifest: Manifest, model: Any, processor: Any, quant: WeightQuant, steps: int = 32
) -> ValidationRecord:
    config = corematching_from_manifest(manifest)
    cases = []
    for name, image, question in validation_cases(manifest.model.image_size):
        inputs = processor(images=image, text=build_prompt(processor, question), return_tensors="pt")
        cases.append((name, inputs["input_ids"], inputs["pixel_values"].to(model.dtype)))
    float_refs = [_reference(model, config, ids, pixels, steps) for _, ids, pixels in cases]

    scale_dtype = torch.float16 if manifest.precision == "float16" else torch.float32
    summary = fake_quantize_(model, quant, scale_dtype, rows_gathered_rule(manifest))
    log.info(
        "reference fake-quantized: %d weights (%d kept in floats)", summary["quantized"], len(summary["kept_float"])
    )
    distance = []
    references = {}  # the fake-quant reference, run once per case for the distance and both validations
    for (name, ids, pixels), before in zip(cases, float_refs, strict=True):
        references[name] = _reference(model, config, ids, pixels, steps)
        distance.append(_distance(name, before, references[name], steps))

    report = validate_build(
        build_dir, manifest, model, processor, steps, accuracy_level=SAME_ARITHMETIC, references=references
    )
    fast = validate_build(
        build_dir,
        manifest,
        model,
        processor,
        steps,
        accuracy_level=FAST,
        criteria=CRITERIA["float16"],
        references=references,
    )
    checks = QuantizationChecks(
        weights=quant.name,
        block_size=quant.block_size if quant.bits == 4 else None,
        validated_at=f"accuracy level {SAME_ARITHMETIC} (fp32 arithmetic), {report.precision} criteria",
        distance_to_float=tuple(distance),
        fast_accuracy_level=FAST,
        fast=tuple(ArithmeticCheck(c.name, c.max_logit_diff, c.equal_tokens, c.steps) for c in fast.cases),
    )
    return dataclasses.replace(report, quantization=checks)


def rows_gathered_rule(manifest: Manifest) -> Callable[[str], bool]:
    """The down projections whose rows the build gathers per request: those of the layers whose compacted
    FFN the stacks take as bound inputs (`ffn.{layer}.down_t.*`), read from the build itself."""
    stacks = [name for name in manifest.graph_names if name in STACKS]
    layers = {ffn_layer(s.name) for name in stacks for s in manifest.graph(name).inputs if is_ffn(s.name)}
    return down_projections(frozenset(layers))


def _distance(name: str, before: tuple, after: tuple, steps: int) -> DistanceToFloat:
    tokens_a, logits_a = before[0], before[1]
    tokens_b, logits_b = after[0], after[1]
    equal = next((i for i, (a, b) in enumerate(zip(tokens_a, tokens_b, strict=True)) if a != b), steps)
    compared = min(equal + 1, steps)
    diff = float(np.abs(logits_a[:compared] - logits_b[:compared]).max())
    scale = float(np.abs(logits_a).max())
    return DistanceToFloat(
        case=name,
        equal_tokens=equal,
        steps=steps,
        max_logit_diff=diff,
        relative_logit_diff=diff / max(scale, 1e-12),
        first_token_equal=bool(tokens_a[0] == tokens_b[0]),
    )


def revalidate(build_dir: str | Path, manifest: Manifest, model: Any, processor: Any) -> ValidationRecord:
    """`python -m export validate`: the check the build made, on a freshly loaded `model` (narrowed to the
    build's static neuron set, fake-quantized like its weights)."""
    from export.static import narrow_for

    model = narrow_for(Path(build_dir), manifest, model)
    q = manifest.quantization
    if q is None:
        return validate_build(build_dir, manifest, model, processor)
    return validate_quantized_build(
        build_dir, manifest, model, processor, WeightQuant.from_name(q.weights, q.block_size or 32)
    )
