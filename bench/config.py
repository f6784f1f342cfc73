"""What `python -m bench` measures (`BenchConfig`): shared by the measuring (`bench.measure`), the report
(`bench.report`, which names the command) and the precision comparison (`bench.precisions`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class BenchConfig:
    preset: Any = "llava-7b-shape"  # a preset name or a ModelPreset
    budgets: tuple[int, ...] = (192, 128, 64, 32)
    repeats: int = 5
    new_tokens: int = 16
    work: Path = Path("builds/bench")
    out: Path = Path("docs/benchmarks")
    torch_baselines: bool = True
    target_budget: int = 64
    # On a CUDA GPU: the PyTorch dense model and the reference at this geometry (random bf16 weights).
    gpu_preset: str = "llava-1.5-7b"

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.new_tokens < 2:
            raise ValueError("repeats must be >= 1 and new_tokens >= 2")
        if not self.budgets or min(self.budgets) < 1:
            raise ValueError(f"budgets must be positive token counts, got {self.budgets}")

    @property
    def preset_name(self) -> str:
        return self.preset if isinstance(self.preset, str) else self.preset.name
