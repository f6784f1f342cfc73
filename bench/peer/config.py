"""What the llama.cpp comparison measures (`PeerConfig`), checked when made."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from bench.config import BenchConfig
from bench.peer.llamacpp import QUANTS, LlamaCppTools


def physical_cores() -> int:
    """Physical cores (ONNX Runtime's default intra-op thread count, which llama.cpp's -t is set to match);
    the logical CPU count where /proc/cpuinfo does not say."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.cpu_count() or 1
    cores, physical = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            physical = value.strip()
        elif key.strip() == "core id":
            cores.add((physical, value.strip()))
    return len(cores) or os.cpu_count() or 1


@dataclass(frozen=True)
class PeerConfig:
    """llama.cpp (its tools in `llama_cpp`) and the project's builds on the same model, side by side.

    The project's side: dense and CoreMatching at `token_budget`, each at fp32 and int4 (blocks of
    `block_size`; the CoreMatching int4 build with a static neuron set). llama.cpp's: the f32 GGUF and the
    `quants`. Every figure is a median of `repeats` after a warm-up; answers of each of `new_tokens`.
    """

    llama_cpp: Path  # a llama.cpp build's bin directory: llama-bench, llama-quantize, libllama
    preset: str = "llava-7b-shape"
    token_budget: int = 64
    block_size: int = 32
    quants: tuple[str, ...] = QUANTS
    new_tokens: tuple[int, ...] = (16, 128)
    repeats: int = 3
    # llama.cpp's -t; ONNX Runtime runs its default (one thread per physical core), so this matches it.
    threads: int = field(default_factory=physical_cores)
    work: Path = Path("builds/bench")  # shared with `python -m bench`: its checkpoint and dense/k builds are reused
    out: Path = Path("docs/benchmarks")
    check_prompt_ids: int = 8  # the correctness check's prompt; one more id follows as a decode step
    bandwidth_bytes: int = 1 << 30  # the array the memory bandwidth is measured with

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if not self.new_tokens or min(self.new_tokens) < 2 or list(self.new_tokens) != sorted(set(self.new_tokens)):
            raise ValueError(f"new_tokens must be increasing counts >= 2, got {self.new_tokens}")
        unknown = [q for q in self.quants if q not in QUANTS]
        if unknown or len(set(self.quants)) != len(self.quants):
            raise ValueError(f"quants must be distinct, among {', '.join(QUANTS)}; got {', '.join(self.quants)}")
        if "Q4_0" not in self.quants:  # the int4 rows and the targets are set against it
            raise ValueError("quants must include Q4_0 (the int4 builds are compared with it)")
        for name in ("token_budget", "block_size", "threads", "check_prompt_ids", "bandwidth_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        LlamaCppTools(self.llama_cpp)  # a missing directory or tool: LlamaCppNotFound, before anything runs

    @property
    def tools(self) -> LlamaCppTools:
        return LlamaCppTools(self.llama_cpp)

    @property
    def bench(self) -> BenchConfig:
        """The shared benchmark's settings, for its checkpoint (`bench.measure.random_checkpoint`)."""
        return BenchConfig(preset=self.preset, repeats=self.repeats, work=self.work, out=self.out)
