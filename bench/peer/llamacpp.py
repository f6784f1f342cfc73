"""llama.cpp's command-line tools: where they are, quantizing a GGUF, and llama-bench runs and their JSON.

A llama.cpp build directory (`build/bin` of a CMake build) holds `llama-bench`, `llama-quantize` and, for a
shared build, `libllama.so`. Everything here starts those programs as subprocesses and reads what they print;
nothing links llama.cpp into this process.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TOOLS = ("llama-bench", "llama-quantize")
QUANTS = ("Q8_0", "Q4_0")  # the llama-quantize types measured: 8-bit, and the 4-bit blocks of 32 ours match


class LlamaCppError(RuntimeError):
    """A llama.cpp tool failed, or printed something this module cannot read."""


class LlamaCppNotFound(ValueError):
    """The llama.cpp directory, or a tool in it, is missing (a usage error: the CLI's exit code 2)."""


@dataclass(frozen=True)
class LlamaCppTools:
    """A directory holding llama.cpp's built tools (checked to exist when made)."""

    bin_dir: Path

    def __post_init__(self) -> None:
        if not self.bin_dir.is_dir():
            raise LlamaCppNotFound(f"--llama-cpp {self.bin_dir}: no such directory")
        missing = [tool for tool in TOOLS if not (self.bin_dir / tool).is_file()]
        if missing:
            raise LlamaCppNotFound(
                f"--llama-cpp {self.bin_dir}: no {' or '.join(missing)} in it (build the targets "
                f"{' '.join(TOOLS)}; see docs/benchmarks/llama-cpp.md)"
            )

    @property
    def bench(self) -> Path:
        return self.bin_dir / "llama-bench"

    @property
    def quantize_tool(self) -> Path:
        return self.bin_dir / "llama-quantize"

    def quantize(self, source: Path, out: Path, kind: str, threads: int) -> Path:
        """`llama-quantize source out kind threads` (skipped when `out` is newer than `source`)."""
        if kind not in QUANTS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTS)}, got {kind!r}")
        if out.is_file() and out.stat().st_mtime >= source.stat().st_mtime:
            return out
        partial = out.with_name(out.name + ".partial")
        _run([str(self.quantize_tool), str(source), str(partial), kind, str(threads)], f"llama-quantize {kind}")
        partial.replace(out)
        log.info("quantized %s to %s", source.name, out)
        return out

    def run_bench(self, model: Path, args: Sequence[str], repeats: int, threads: int) -> tuple[BenchResult, ...]:
        """llama-bench on `model` with the test flags `args` (e.g. ["-p", "623", "-n", "0"]): one result per
        test it ran. Its warm-up run (on by default) precedes the `repeats` timed ones."""
        command = [str(self.bench), "-m", str(model), *args, "-t", str(threads), "-r", str(repeats), "-o", "json"]
        return parse_bench_json(_run(command, f"llama-bench {' '.join(args)}"))


def _run(command: list[str], what: str) -> str:
    log.info("running %s", " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = " / ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise LlamaCppError(f"{what} exited with {done.returncode}{crash_hint(done.returncode)}: {tail}")
    return done.stdout


def crash_hint(returncode: int) -> str:
    """What a crash of llama.cpp most likely means (docs/benchmarks/llama-cpp.md, building llama.cpp)."""
    if returncode != -signal.SIGSEGV:
        return ""
    return (
        " (a segmentation fault: on a CPU with AMX, a native llama.cpp build crashes in its AMX matrix multiply "
        "on some machines; rebuild with -DGGML_NATIVE=OFF and the instruction sets named, "
        "see docs/benchmarks/llama-cpp.md)"
    )


@dataclass(frozen=True)
class BenchResult:
    """One llama-bench test (`-o json` prints a list of these): what it ran and how long each repeat took.

    A test processes `n_prompt` tokens in batches and then `n_gen` tokens one at a time, after `n_depth`
    tokens already in the KV cache (not timed); samples_ns holds one wall time per repeat.
    """

    n_prompt: int
    n_gen: int
    n_depth: int
    n_threads: int
    samples_ns: tuple[int, ...]
    model_type: str  # e.g. "llama ?B Q4_0"
    type_k: str  # the KV cache's element types (llama.cpp's default: f16)
    type_v: str
    model_size: int  # the model's tensor bytes, as llama.cpp counts them
    build_commit: str
    build_number: int

    def __post_init__(self) -> None:
        for name in ("n_prompt", "n_gen", "n_depth"):
            if getattr(self, name) < 0:
                raise LlamaCppError(f"llama-bench result: negative {name}")
        if self.n_prompt + self.n_gen == 0:
            raise LlamaCppError("llama-bench result: a test of no tokens")
        if not self.samples_ns or min(self.samples_ns) <= 0:
            raise LlamaCppError(f"llama-bench result: no positive samples ({self.samples_ns})")

    @property
    def seconds(self) -> tuple[float, ...]:
        return tuple(ns / 1e9 for ns in self.samples_ns)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BenchResult:
        try:
            return cls(
                n_prompt=int(data["n_prompt"]),
                n_gen=int(data["n_gen"]),
                n_depth=int(data.get("n_depth", 0)),  # printed since llama-bench gained -d
                n_threads=int(data["n_threads"]),
                samples_ns=tuple(int(ns) for ns in data["samples_ns"]),
                model_type=str(data.get("model_type", "")),
                type_k=str(data.get("type_k", "f16")),
                type_v=str(data.get("type_v", "f16")),
                model_size=int(data.get("model_size", 0)),
                build_commit=str(data.get("build_commit", "")),
                build_number=int(data.get("build_number", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise LlamaCppError(f"llama-bench JSON: a test lacks or garbles {e}") from None


def parse_bench_json(text: str) -> tuple[BenchResult, ...]:
    """The tests of `llama-bench -o json`'s output (a JSON list; anything printed before it is skipped)."""
    start = text.find("[")
    try:
        data = json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError as e:
        raise LlamaCppError(f"llama-bench printed no readable JSON: {e}") from None
    if not isinstance(data, list) or not data:
        raise LlamaCppError("llama-bench printed no tests")
    return tuple(BenchResult.from_json(item) for item in data)
