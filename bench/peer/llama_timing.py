"""llama.cpp's side of the comparison: llama-bench on a GGUF at the project's prompt length and threads.

Three figures, each a median of the repeats after llama-bench's own warm-up run:

- prefill: `-p P -n 0`, the prompt of P tokens in batches (llama-bench's default batch 2048, ubatch 512);
- decode step: `-p 0 -n 16 -d P`, 16 single-token steps after P tokens already in the KV cache (filled
  before the clock starts), / 16: the step at the prompt's depth, as the project's step is measured;
- end to end of an n-token answer: `-pg P,n-1`, the prompt then n - 1 single-token steps. The prompt pass
  gives the first token, so an n-token answer takes n - 1 steps after it, as in `runtime.Pipeline`.

llama-bench draws random token ids and samples nothing; it runs no vision tower (the project's figures
include the image's preprocessing and vision tower, which favours llama.cpp).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from bench.peer.llamacpp import BenchResult, LlamaCppError, LlamaCppTools

DEPTH_STEPS = 16  # the decode steps timed at the prompt's depth


@dataclass(frozen=True)
class LlamaTimes:
    """llama-bench's figures for one GGUF, in seconds (medians over the repeats)."""

    prefill: float
    decode_step: float
    end_to_end: tuple[float, ...]  # one per new-token count
    decode_step_samples: tuple[float, ...]  # each repeat's mean step
    type_k: str  # the KV cache's element types the timings ran with
    type_v: str
    build: str  # llama.cpp's build number and commit, as llama-bench prints them

    def __post_init__(self) -> None:
        if min(self.prefill, self.decode_step, *self.end_to_end) <= 0:
            raise ValueError(f"LlamaTimes must be positive: {self}")


def _find(results: tuple[BenchResult, ...], n_prompt: int, n_gen: int, n_depth: int) -> BenchResult:
    for result in results:
        if (result.n_prompt, result.n_gen, result.n_depth) == (n_prompt, n_gen, n_depth):
            return result
    raise LlamaCppError(f"llama-bench printed no test of pp{n_prompt} tg{n_gen} at depth {n_depth}")


def time_gguf(
    tools: LlamaCppTools, gguf: Path, prompt_tokens: int, new_tokens: tuple[int, ...], repeats: int, threads: int
) -> LlamaTimes:
    p = prompt_tokens
    pairs = [arg for n in new_tokens for arg in ("-pg", f"{p},{n - 1}")]
    # One run for the tests from an empty cache (llama-bench skips the -p/-n tests given as 0), one at depth:
    # -d applies to every test of a run.
    at_zero = tools.run_bench(gguf, ["-p", str(p), "-n", "0", *pairs], repeats, threads)
    at_depth = tools.run_bench(gguf, ["-p", "0", "-n", str(DEPTH_STEPS), "-d", str(p)], repeats, threads)
    prefill = _find(at_zero, p, 0, 0)
    steps = _find(at_depth, 0, DEPTH_STEPS, p)
    answers = [_find(at_zero, p, n - 1, 0) for n in new_tokens]
    step_samples = tuple(s / DEPTH_STEPS for s in steps.seconds)
    return LlamaTimes(
        prefill=statistics.median(prefill.seconds),
        decode_step=statistics.median(step_samples),
        end_to_end=tuple(statistics.median(a.seconds) for a in answers),
        decode_step_samples=step_samples,
        type_k=steps.type_k,
        type_v=steps.type_v,
        build=f"b{steps.build_number} ({steps.build_commit})",
    )
