"""Weight-only quantization by round to nearest, and its fake-quant reference (docs/quantization.md).

One implementation of the arithmetic, used twice: the export's graph pass
(`export.passes.dequantize`) stores `quantize`'s integers and scales in the
graphs, and `fake_quantize_` puts `dequantize(quantize(W))` into a torch model,
so that the reference runs on exactly the weights the graphs dequantize and a
quantized build is validated with the float tolerance where the arithmetic is
the same.

Weights are taken in MatMul layout, `W_t` [K, N] (`y = x @ W_t`, K the reduction
axis), as the graphs hold them.

- int8: symmetric, one scale per output channel (`scale` [N]).
- int4: symmetric, one scale per block of `block_size` values along the
  reduction axis (`scale` [K / B, N]), ONNX's blocked DequantizeLinear with
  axis 0. A weight whose rows are gathered per request (the down projection of
  a neuron-sparse layer: its core neurons are its input rows) is blocked along
  the output axis instead (`scale` [K, N / B], axis 1), so that a gathered row
  keeps whole blocks and their scales.

Scales are stored in the activations' precision, and the integers are rounded
against the stored scale, so `q * scale` is exactly what DequantizeLinear gives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from coreMatching.quant_scheme import Layout, WeightQuant


@dataclass(frozen=True)
class Quantized:
    """q: the integers [K, N] (int8 dtype; int4 values in -7..7); scale: [N], [K/B, N] or [K, N/B]."""

    q: Tensor
    scale: Tensor
    layout: Layout

    def dequantize(self) -> Tensor:
        """q * scale in the scale's dtype, as DequantizeLinear computes it. -> [K, N]"""
        return self.q.to(self.scale.dtype) * _expand(self.scale, self.layout, self.q.shape)


def _expand(scale: Tensor, layout: Layout, shape: torch.Size) -> Tensor:
    if layout.block_size is None:
        return scale[None, :]  # per output channel: [1, N]
    return scale.repeat_interleave(layout.block_size, dim=layout.axis)  # [K, N]


def quantize(w_t: Tensor, layout: Layout, scale_dtype: torch.dtype) -> Quantized:
    """Round to nearest with the symmetric scale amax / qmax of each channel or block. w_t: [K, N]"""
    w = w_t.detach().float()
    qmax = 2 ** (layout.bits - 1) - 1
    if layout.block_size is None:
        amax = w.abs().amax(dim=0)  # [N]
    elif layout.axis == 0:
        k, n = w.shape
        amax = w.reshape(k // layout.block_size, layout.block_size, n).abs().amax(dim=1)  # [K/B, N]
    else:
        k, n = w.shape
        amax = w.reshape(k, n // layout.block_size, layout.block_size).abs().amax(dim=2)  # [K, N/B]
    # An all-zero group gets scale 1 (any scale dequantizes its zeros exactly).
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).to(scale_dtype)
    expanded = _expand(scale, layout, w.shape).float()
    q = torch.clamp(torch.round(w / expanded), -qmax, qmax).to(torch.int8)
    return Quantized(q=q, scale=scale, layout=layout)


def fake_quantize_(
    model: nn.Module,
    scheme: WeightQuant,
    scale_dtype: torch.dtype,
    rows_gathered: Callable[[str], bool] = lambda name: False,
) -> dict[str, Any]:
    """Replaces every `nn.Linear` weight of `model` by its quantized-then-dequantized value, in place (the
    reference of a quantized build). `rows_gathered(module name)` says which weights are blocked along the
    output axis. -> a summary: how many weights were quantized and kept in floats."""
    quantized, kept = 0, []
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            w_t = module.weight.t()  # [K, N]: the MatMul layout of the graphs
            layout = scheme.layout(tuple(w_t.shape), rows_gathered(name))
            if layout is None:
                kept.append(name)
                continue
            restored = quantize(w_t, layout, scale_dtype).dequantize()
            module.weight.copy_(restored.t().to(module.weight.dtype))
            quantized += 1
    return {"quantized": quantized, "kept_float": kept}


def down_projections(layers: set[int] | frozenset[int]) -> Callable[[str], bool]:
    """The `rows_gathered` rule of a CoreMatching model: the language model's down projections of `layers`
    (the neuron-sparse layers, whose core neurons a request gathers as rows of W_down)."""

    def rule(name: str) -> bool:
        parts = name.split(".")
        if parts[-1] != "down_proj" or "language_model" not in parts or "layers" not in parts:
            return False
        index = parts[parts.index("layers") + 1]
        return index.isdigit() and int(index) in layers

    return rule
