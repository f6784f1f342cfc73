"""llama.cpp itself on the exported GGUFs, against PyTorch: the peer is timed on a correct model.

llama.cpp runs through a ~90-line C program (logits_probe.c) compiled here against the `include/llama.h` of
the llama.cpp tree the binaries were built from and linked to its `libllama.so`. Why not Python bindings
(llama-cpp-python's ctypes module): they would tie the check to one bindings release and its dependencies,
and ctypes trusts hand-written struct layouts (llama_context_params changes often) where the compiler checks
the C program against the header it is built with.

The probe decodes a prompt of `prompt_ids` ids as one batch, then one more id through the KV cache; the
last token's logits of both calls are compared with the transformers model's on the same ids. A quantized
GGUF is also compared with the numpy forward of its own dequantized weights (`bench.peer.gguf_forward`):
rounding the weights moves the logits away from the float model's by itself, so only that comparison can
hold llama.cpp's quantized kernels to a tight bound.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.peer.llamacpp import LlamaCppError, crash_hint

log = logging.getLogger(__name__)

PROBE_SOURCE = Path(__file__).with_name("logits_probe.c")

# The bounds, from what the check measured (9 ids, 2 compared positions, random weights; the logit range is
# max - min of the reference's compared logits):
# - f32 against PyTorch: max |diff| / range 2.0e-4 (tiny-llama, tiny-llama-gqa) to 3.4e-4 (default-small,
#   llava-7b-shape), correlation 1.00000; llama.cpp keeps K and V in f16 (its default cache type, the one
#   llama-bench times) and sums in other orders. The same GGUF with q/k left in HF's rope layout: 4.5e-3
#   (tiny-llama), 6.1e-3 (default-small), 5.3e-2 (llava-7b-shape): random weights attend almost uniformly, so
#   a rope error moves the logits little. 2e-3 passes the first with 6x margin and fails every one of those.
# - quantized against the numpy forward of the GGUF's own dequantized weights (the model llama.cpp is given):
#   llama.cpp quantizes activations to 8 bits for its quantized dot products, so not exact: correlation
#   0.99976 (llava-7b-shape Q4_0) to 0.99996, max |diff| / range 4e-3 to 1.6e-2. Bounds 0.999 and 0.05.
# - quantized against PyTorch (loose: the rounding of the weights itself): Q8_0 correlation 0.9995 to
#   0.9998; Q4_0 0.916 on llava-7b-shape (32 layers of random N(0, 0.02) weights, whose 4-bit rounding error is
#   ~9% of each weight; the dequantized forward above lands on the same 0.916), 0.976 to 0.995 on the tiny
#   presets. Bounds 0.99 (Q8_0) and 0.85 (Q4_0): a broken kernel or file decorrelates the logits entirely.
F32_MAX_DIFF_OF_RANGE = 2e-3
DEQUANTIZED_MIN_CORRELATION = 0.999
DEQUANTIZED_MAX_DIFF_OF_RANGE = 0.05
QUANT_MIN_CORRELATION = {"Q8_0": 0.99, "Q4_0": 0.85}


class LlamaCppMismatch(RuntimeError):
    """llama.cpp's logits on an exported GGUF disagree with PyTorch's: the GGUF (or llama.cpp) is wrong, and
    timing it would time a different model."""


class ProbeBuildError(RuntimeError):
    """The C probe cannot be built: no C compiler, or no llama.h / libllama.so beside the llama.cpp tools."""


@dataclass(frozen=True)
class Agreement:
    """llama.cpp's logits against a reference's at the compared positions."""

    max_abs_diff: float  # over every compared logit
    logit_range: float  # max - min of the reference's compared logits
    min_correlation: float  # Pearson, of the worst compared position
    argmax_agree: int  # compared positions with the same top token

    def __post_init__(self) -> None:
        if not (self.max_abs_diff >= 0 and self.logit_range > 0 and -1 <= self.min_correlation <= 1):
            raise ValueError(f"Agreement: bad figures {self}")

    @property
    def diff_of_range(self) -> float:
        return self.max_abs_diff / self.logit_range

    @classmethod
    def of(cls, ours: np.ndarray, reference: np.ndarray) -> Agreement:
        """ours, reference: [positions, vocab]."""
        if ours.shape != reference.shape:
            raise LlamaCppMismatch(f"llama.cpp printed logits {ours.shape}, the reference has {reference.shape}")
        return cls(
            max_abs_diff=float(np.abs(ours - reference).max()),
            logit_range=float(reference.max() - reference.min()),
            min_correlation=min(float(np.corrcoef(a, b)[0, 1]) for a, b in zip(ours, reference, strict=True)),
            argmax_agree=int((ours.argmax(axis=1) == reference.argmax(axis=1)).sum()),
        )


@dataclass(frozen=True)
class LogitsCheck:
    """llama.cpp on one GGUF: the last-token logits after the prompt and after each step, against PyTorch's
    and (a quantized GGUF) against the forward of its own dequantized weights."""

    model: str  # "f32", "Q8_0", "Q4_0"
    token_ids: tuple[int, ...]
    prompt_ids: int  # how many of token_ids went in as one batch; each later one is a decode step
    positions: int  # compared positions (1 + the decode steps)
    vs_pytorch: Agreement
    vs_dequantized: Agreement | None  # None for f32 (PyTorch's is then the exact reference)
    requirement: str  # the bounds applied, in words
    passed: bool

    def __post_init__(self) -> None:
        if not 0 < self.prompt_ids <= len(self.token_ids):
            raise ValueError(f"LogitsCheck: prompt_ids {self.prompt_ids} of {len(self.token_ids)} ids")
        if self.positions != 1 + len(self.token_ids) - self.prompt_ids:
            raise ValueError("LogitsCheck: positions must be 1 + the decode steps")
        if (self.vs_dequantized is None) != (self.model == "f32"):
            raise ValueError(f"LogitsCheck {self.model}: a quantized GGUF (only) is compared with its dequantized form")
        if not isinstance(self.passed, bool):
            raise ValueError(f"LogitsCheck.passed must be a bool, got {self.passed!r}")


def check_token_ids(vocab_size: int, avoid: Sequence[int], bos_id: int, count: int = 9, seed: int = 0) -> list[int]:
    """`count` ids: <s>, then random ids that are no special token (`avoid`: e.g. the image placeholder,
    which the LLaVA forward would replace by image features)."""
    rng = np.random.default_rng(seed)
    allowed = np.setdiff1d(np.arange(vocab_size), [bos_id, *avoid])
    return [bos_id, *(int(i) for i in rng.choice(allowed, size=count - 1, replace=False))]


def reference_logits(model: Any, token_ids: Sequence[int], prompt_ids: int) -> np.ndarray:
    """PyTorch's logits at the positions the probe prints: [1 + len(ids) - prompt_ids, vocab]. One causal
    forward of every id gives at position i what the prompt-then-steps route gives after id i."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([list(token_ids)])).logits[0]
    return logits[prompt_ids - 1 :].float().numpy()


def dequantized_logits(gguf: Path, token_ids: Sequence[int], prompt_ids: int) -> np.ndarray:
    """The numpy forward of the GGUF's dequantized weights at the probe's positions (as `reference_logits`)."""
    from bench.peer.gguf_forward import GgufModel, forward

    return forward(GgufModel.read(gguf), np.asarray(token_ids))[prompt_ids - 1 :]


def _find(bin_dir: Path, relative: str, levels: int = 3) -> Path | None:
    """`relative` under bin_dir or one of its `levels` parents (build/bin -> build -> the source tree)."""
    for base in [bin_dir, *list(bin_dir.resolve().parents)[:levels]]:
        if (base / relative).is_file():
            return base
    return None


def build_probe(bin_dir: Path, out: Path) -> Path:
    """logits_probe.c compiled against the llama.cpp tree of `bin_dir` into `out` (an executable)."""
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise ProbeBuildError("no C compiler (cc) to build the llama.cpp correctness probe")
    root = _find(bin_dir, "include/llama.h")
    if root is None:
        raise ProbeBuildError(f"no include/llama.h in or above {bin_dir}: pass the bin directory of a llama.cpp build")
    lib = next((d for d in (bin_dir, bin_dir.parent / "lib") if any(d.glob("libllama.*"))), None)
    if lib is None:
        raise ProbeBuildError(f"no libllama shared library in {bin_dir}: build llama.cpp with -DBUILD_SHARED_LIBS=ON")
    includes = [root / "include", *([root / "ggml/include"] if (root / "ggml/include").is_dir() else [])]
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [compiler, "-O2", "-std=c11", str(PROBE_SOURCE), *(f"-I{d}" for d in includes), f"-L{lib}", "-lllama"]
    command += [f"-Wl,-rpath,{lib.resolve()}", "-o", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ProbeBuildError(f"the llama.cpp probe does not compile: {done.stderr.strip()[-600:]}")
    return out


def llama_cpp_logits(probe: Path, gguf: Path, token_ids: Sequence[int], prompt_ids: int, threads: int) -> np.ndarray:
    """The probe's logits: [1 + len(ids) - prompt_ids, vocab]."""
    command = [str(probe), str(gguf), str(threads), str(prompt_ids), *map(str, token_ids)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        said = done.stderr.strip()[-400:].replace("\n", " / ")
        raise LlamaCppError(
            f"llama.cpp could not run {gguf.name} (exit {done.returncode}{crash_hint(done.returncode)})"
            + (f": {said}" if said else "")
        )
    return np.array([line.split() for line in done.stdout.strip().splitlines()], dtype=np.float64)


def compare(
    model: str,
    ours: np.ndarray,
    reference: np.ndarray,
    token_ids: Sequence[int],
    prompt_ids: int,
    dequantized: np.ndarray | None = None,
) -> LogitsCheck:
    """`ours` (llama.cpp's logits) against PyTorch's on the same ids and, for a quantized GGUF, against the
    forward of its dequantized weights, with the bounds for `model`'s precision."""
    vs_pytorch = Agreement.of(ours, reference)
    vs_dequantized = None if dequantized is None else Agreement.of(ours, dequantized)
    if model == "f32":
        requirement = f"max abs diff <= {F32_MAX_DIFF_OF_RANGE:g} x the logits' range, same top token"
        passed = vs_pytorch.diff_of_range <= F32_MAX_DIFF_OF_RANGE and vs_pytorch.argmax_agree == len(reference)
    else:
        if vs_dequantized is None:
            raise ValueError(f"{model}: a quantized GGUF is compared with its dequantized forward too")
        loose = QUANT_MIN_CORRELATION[model]
        requirement = (
            f"vs its dequantized weights: correlation >= {DEQUANTIZED_MIN_CORRELATION:g}, max abs diff <= "
            f"{DEQUANTIZED_MAX_DIFF_OF_RANGE:g} x range; vs PyTorch: correlation >= {loose:g}"
        )
        passed = (
            vs_dequantized.min_correlation >= DEQUANTIZED_MIN_CORRELATION
            and vs_dequantized.diff_of_range <= DEQUANTIZED_MAX_DIFF_OF_RANGE
            and vs_pytorch.min_correlation >= loose
        )
    return LogitsCheck(
        model=model,
        token_ids=tuple(token_ids),
        prompt_ids=prompt_ids,
        positions=len(reference),
        vs_pytorch=vs_pytorch,
        vs_dequantized=vs_dequantized,
        requirement=requirement,
        passed=passed,
    )


def _said(agreement: Agreement | None) -> str:
    if agreement is None:
        return "-"
    a = agreement
    return (
        f"max abs diff {a.max_abs_diff:.3g} of range {a.logit_range:.3g}, correlation {a.min_correlation:.5f}, "
        f"top token {a.argmax_agree}"
    )


def check_gguf(
    probe: Path, gguf: Path, model: str, reference: np.ndarray, token_ids: Sequence[int], prompt_ids: int, threads: int
) -> LogitsCheck:
    """llama.cpp on `gguf` against `reference` (`reference_logits`) and, quantized, against the GGUF's
    dequantized forward; raises LlamaCppMismatch if it fails."""
    ours = llama_cpp_logits(probe, gguf, token_ids, prompt_ids, threads)
    dequantized = None if model == "f32" else dequantized_logits(gguf, token_ids, prompt_ids)
    result = compare(model, ours, reference, token_ids, prompt_ids, dequantized)
    log.info(
        "llama.cpp %s vs PyTorch: %s; vs its dequantized weights: %s",
        model,
        _said(result.vs_pytorch),
        _said(result.vs_dequantized),
    )
    if not result.passed:
        raise LlamaCppMismatch(
            f"llama.cpp {model} disagrees on {gguf.name}: vs PyTorch {_said(result.vs_pytorch)}; vs its "
            f"dequantized weights {_said(result.vs_dequantized)}; required: {result.requirement}"
        )
    return result
