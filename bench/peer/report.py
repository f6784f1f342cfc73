"""The comparison's report: the targets, llama-cpp.json (`dataclasses.asdict` of the report) and llama-cpp.md.

Pure functions of the measured rows; nothing here measures or starts a process.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from bench.peer.records import PeerReport, PeerRow
from bench.records import Target

STEP_OVER_FLOOR = 1.5  # every decode step within 1.5x of the bytes it reads / the bandwidth
END_TO_END_SPEEDUP = {16: 3.0, 128: 2.0}  # llama.cpp Q4_0 / ours CoreMatching int4 static, per answer length
END_TO_END = "llama.cpp Q4_0 end to end"  # how the (at least) end-to-end targets are named; the rest are at most


def peer_of(row: PeerRow) -> str:
    """The llama.cpp row a build of ours is set against: float weights against f32, int4 against Q4_0."""
    return "llama.cpp f32" if row.weights == "fp32" else "llama.cpp Q4_0"


def targets(
    rows: Sequence[PeerRow], new_tokens: Sequence[int], dense: str, dense_int4: str, sparse_int4: str
) -> tuple[Target, ...]:
    """The comparison's targets: decode steps against llama.cpp's, end to end against Q4_0's, steps against
    their floors. dense / dense_int4 / sparse_int4: the rows of ours they are about."""
    by = {row.name: row for row in rows}
    f32, q4 = by["llama.cpp f32"], by["llama.cpp Q4_0"]
    out = [
        Target.at_most(f"{dense} step / llama.cpp f32 step", by[dense].decode_step_ms / f32.decode_step_ms, 1.0),
        Target.at_most(
            f"{dense_int4} step / llama.cpp Q4_0 step", by[dense_int4].decode_step_ms / q4.decode_step_ms, 1.0
        ),
        Target.at_most(
            f"{sparse_int4} step / llama.cpp Q4_0 step", by[sparse_int4].decode_step_ms / q4.decode_step_ms, 0.75
        ),
    ]
    for i, n in enumerate(new_tokens):
        if n in END_TO_END_SPEEDUP:
            speedup = q4.end_to_end_ms[i] / by[sparse_int4].end_to_end_ms[i]
            out.append(Target.at_least(f"{END_TO_END} / {sparse_int4}, {n} new tokens", speedup, END_TO_END_SPEEDUP[n]))
    out += [Target.at_most(f"{row.name} step / its floor", row.step_over_floor, STEP_OVER_FLOOR) for row in rows]
    return tuple(out)


def write_report(report: PeerReport, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "llama-cpp.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    (out / "llama-cpp.md").write_text(markdown(report))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


BUILDING = """## Building llama.cpp for the comparison

The comparison times llama.cpp's own tools, built from the llama.cpp source that llama-cpp-python 0.3.36
vendors (any llama.cpp tree of the same API works; the directory passed must hold `llama-bench`,
`llama-quantize` and `libllama.so`, inside the source tree, whose `include/llama.h` the correctness
probe is compiled against):

```sh
pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36
tar xzf llama_cpp_python-0.3.36.tar.gz
cd llama_cpp_python-0.3.36/vendor/llama.cpp
cmake -B build -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF
cmake --build build -j --target llama-bench llama-quantize llama   # ~10 minutes on 2 cores
cd -
python -m bench --llama-cpp llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin --peer-only --repeats 3
```

On a CPU with AMX (Xeon Sapphire Rapids and later), a native build (`GGML_NATIVE=ON`, the default) puts
Q4_0 and Q8_0 weights in llama.cpp's AMX buffers, whose matrix multiply crashes on some machines
(llama.cpp issue 20824: a segmentation fault in `ggml_backend_amx_mul_mat`; the benchmark then stops with
llama-bench's exit code -11). Configure without AMX and with the machine's other instruction sets named,
e.g. for an AVX-512 machine:

```sh
cmake -B build -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF \\
  -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON \\
  -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
```

`python -m bench --llama-cpp DIR` runs the default benchmark (bench.md) and then this comparison; with
`--peer-only` it runs the comparison alone (the builds it shares with the default benchmark, dense and
CoreMatching fp32 under `--work`, are reused when present).
"""

METHOD = """## How it is measured

- The model: the checkpoint's decoder (the Llama language model and its lm_head) exported to a `llama`
  GGUF in f32 (`bench/peer/gguf_export.py`; q/k rows permuted for llama.cpp's pairwise rope), then
  `llama-quantize` to Q8_0 and Q4_0 (llama.cpp's defaults per type: e.g. Q4_0 keeps the output matrix in
  Q6_K). The vocabulary is a placeholder llama.cpp accepts (ids only; no text is tokenized).
- Before timing, llama.cpp itself runs each GGUF on a prompt of ids and one more id through its KV cache
  (a C probe against `llama.h`), and its last-token logits are compared with the transformers model's; a
  disagreement stops the run. llama.cpp keeps its KV cache in f16 (its default, timed so).
- llama.cpp (`llama-bench`, `-t` threads, `-r` repeats after its warm-up): prefill `-p P -n 0`; decode step
  `-p 0 -n 16 -d P` / 16 (16 steps after P cached tokens); an answer of n tokens `-pg P,n-1` (the prompt
  pass gives the first token). P is the project's prompt length. llama.cpp runs no vision tower and no
  image preprocessing: its end-to-end figures leave those out, which favours it.
- Ours (`runtime.Pipeline` on the ONNX Runtime CPU provider, its default thread count): per repeat, one
  answer per new-token count with `stop_at_eos=False`, after a warm-up answer; end to end is the wall time
  of `Pipeline.answer` (preprocessing, vision, prefill, steps); the decode step is the median step of the
  shortest answer.
- The floor: bytes one step reads at depth P (weights, one row of the embedding table, the KV cache; for
  ours `bench.precisions.decode_weight_bytes`, for llama.cpp the GGUF's tensor bytes) / the memory
  bandwidth (best of 5 one-thread numpy copies of 1 GiB, read + write bytes).
"""


def markdown(report: PeerReport) -> str:
    m, v = report.machine, report.machine.versions
    by = report.by_name
    ends = " | ".join(f"end to end {n} ms" for n in report.new_tokens)
    speedups = " | ".join(f"e2e vs peer {n}" for n in report.new_tokens)
    lines = [
        "# llama.cpp side by side with our builds (CPU)",
        "",
        f"Produced by `{report.command}` on {m.cpu} ({m.cores} cores, {m.memory_bytes / 2**30:.0f} GiB), "
        f"{m.system}, onnxruntime {v.onnxruntime}, llama.cpp {report.llama_cpp_build}.",
        f"Model: preset `{report.preset}` (random weights); prompt {report.prompt_tokens} tokens; "
        f"{report.threads} threads; medians of {report.repeats} repeats after a warm-up. Memory bandwidth "
        f"{report.bandwidth_bytes_per_s / 1e9:.1f} GB/s; llama.cpp's KV cache {report.kv_cache_llama_cpp}. "
        "llama.cpp runs no vision tower (its end to end leaves it out). The peer of a build of ours: "
        "llama.cpp f32 for fp32 weights, Q4_0 for int4.",
        "",
        f"| build | weights | correct | vision ms | prefill ms | decode step ms | step floor ms | step / floor "
        f"| {ends} | step vs peer | {speedups} |",
        "|---|---|---|---:|---:|---:|---:|---:|"
        + "---:|" * len(report.new_tokens)
        + "---:|"
        + "---:|" * len(report.new_tokens),
    ]
    for r in report.rows:
        peer = by.get(peer_of(r)) if r.engine == "onnxruntime" else None
        versus = "-" if peer is None else f"{r.decode_step_ms / peer.decode_step_ms:.2f}x"
        e2e = " | ".join(
            "-" if peer is None else f"{peer.end_to_end_ms[i] / r.end_to_end_ms[i]:.2f}x"
            for i in range(len(report.new_tokens))
        )
        lines.append(
            f"| {r.name} | {r.weights} | {'yes' if r.correct else '**no**'} | {_ms(r.vision_ms)} "
            f"| {_ms(r.prefill_ms)} | {r.decode_step_ms:.2f} | {r.floor_ms:.2f} | {r.step_over_floor:.2f} "
            f"| {' | '.join(_ms(t) for t in r.end_to_end_ms)} | {versus} | {e2e} |"
        )
    lines += [
        "",
        "step vs peer: this step / the peer's (< 1: faster); e2e vs peer: the peer's end to end / this one "
        "(> 1: faster). correct: llama.cpp passed the logits check; ours passed its build validation.",
        "",
        "## Targets",
        "",
        "| target | measured | required | met |",
        "|---|---:|---:|---|",
    ]
    for t in report.targets:
        bound = ">=" if t.target.startswith(END_TO_END) else "<="
        lines.append(f"| {t.target} | {t.measured:.2f}x | {bound} {t.required:.2f}x | {'yes' if t.met else '**no**'} |")
    lines += [
        "",
        "## llama.cpp against PyTorch (the logits check)",
        "",
        "| GGUF | ids (prompt + steps) | vs PyTorch: max abs diff (of range) | correlation | same top token "
        "| vs its dequantized weights: max abs diff (of range) | correlation | required | passed |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for c in report.checks:
        p, d = c.vs_pytorch, c.vs_dequantized
        dequantized = (
            "- | -" if d is None else f"{d.max_abs_diff:.3g} ({d.diff_of_range:.1e}) | {d.min_correlation:.5f}"
        )
        lines.append(
            f"| {c.model} | {c.prompt_ids} + {len(c.token_ids) - c.prompt_ids} "
            f"| {p.max_abs_diff:.3g} ({p.diff_of_range:.1e}) | {p.min_correlation:.5f} "
            f"| {p.argmax_agree}/{c.positions} | {dequantized} | {c.requirement} | {'yes' if c.passed else '**no**'} |"
        )
    lines += ["", METHOD, BUILDING]
    return "\n".join(lines)
