"""Weight-only quantization schemes: which precision, and how each weight is stored (docs/quantization.md).

Torch-free, so that configuration and tools that do not run the model can check a scheme; the
arithmetic is `coreMatching.quant`.

Weights are taken in MatMul layout, `W_t` [K, N] (`y = x @ W_t`, K the reduction axis).
- int8: symmetric, one scale per output channel (`scale` [N]).
- int4: symmetric, one scale per block of `block_size` values along the reduction axis
  (`scale` [K / B, N]); a weight whose rows a request gathers (the down projection of a
  neuron-sparse layer) is blocked along the output axis instead (`scale` [K, N / B]), so that a
  gathered row keeps whole blocks and their scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from coreMatching.errors import ConfigError

WeightPrecision = Literal["fp32", "fp16", "int8", "int4"]
WEIGHT_PRECISIONS: tuple[WeightPrecision, ...] = ("fp32", "fp16", "int8", "int4")
BLOCK_SIZES = (16, 32, 64, 128)  # powers of two from 16: what MatMulNBits takes


@dataclass(frozen=True)
class WeightQuant:
    """How the 2-D MatMul weights of a build are quantized: `bits` 8 or 4, int4's block size."""

    bits: int
    block_size: int = 32

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ConfigError(f"quantized weights have 8 or 4 bits, got {self.bits}")
        if self.block_size not in BLOCK_SIZES:
            raise ConfigError(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {self.block_size}")

    @classmethod
    def from_name(cls, weights: str, block_size: int = 32) -> WeightQuant | None:
        """ "int8"/"int4" -> the scheme; "fp32"/"fp16" -> None (float weights)."""
        if weights not in WEIGHT_PRECISIONS:
            raise ConfigError(f"--weights must be one of {', '.join(WEIGHT_PRECISIONS)}, got {weights!r}")
        return None if weights.startswith("fp") else cls(bits=int(weights[3:]), block_size=block_size)

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1  # symmetric: -qmax..qmax (int4's -8 is unused)

    def layout(self, shape: tuple[int, ...], rows_gathered: bool = False) -> Layout | None:
        """How a weight of `shape` [K, N] is stored, or None when it stays in floats (not 2-D, or a side
        that int4's blocks (and nibble pairs) do not divide)."""
        if len(shape) != 2:
            return None
        k, n = shape
        if self.bits == 8:
            return Layout(bits=8, axis=1, block_size=None)
        axis = 1 if rows_gathered else 0
        blocked = (k, n)[axis]
        if blocked % self.block_size or (k * n) % 2:
            return None
        return Layout(bits=4, axis=axis, block_size=self.block_size)


@dataclass(frozen=True)
class Layout:
    """One stored weight: int8 per output channel (axis 1), or int4 blocked along `axis`."""

    bits: int
    axis: int  # DequantizeLinear's axis: the scale's axis (int8) or the blocked one (int4)
    block_size: int | None
