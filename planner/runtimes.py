"""What a build's weights cost at each precision, and what each runtime really does with them (torch-free).

Two halves, both used by the memory planner (`planner.plan`, docs/planning.md):

- the byte counts of the build's storage scheme (docs/quantization.md), exact: `matmul_bytes`;
- `RUNTIMES`, one `Runtime` per runtime name: for every stored precision, whether the runtime keeps
  it low-bit in memory and reads it with a low-bit kernel, or falls back (holds it at a float
  precision), what it holds per stored byte, what it holds of the scratch its graphs run in, and the
  source of each fact. A precision that falls back on a runtime is planned at the precision it really
  runs at.

Every weight of a build is in exactly one graph (docs/architecture.md, one weight file): the decoder
stacks serve prefill and decode with one session or one engine (two optimization profiles) each, so
a runtime holds one copy of every weight. The per-request neuron-sparse layers' full FFN weights are
no graph's constants: the runtime holds them once, in their stored form, as bound buffers
(`Runtime.bound` says how).

Nothing here is probed at run time; the facts were measured here (ONNX Runtime 1.32, x86-64 CPU) or
read from the public sources named in each entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from coreMatching.errors import ConfigError
from coreMatching.quant_scheme import WeightQuant

WeightPrecision = Literal["fp32", "fp16", "int8", "int4"]
WEIGHT_PRECISIONS: tuple[WeightPrecision, ...] = ("fp32", "fp16", "int8", "int4")
ActivationPrecision = Literal["fp32", "fp16"]
ACTIVATION_PRECISIONS: tuple[ActivationPrecision, ...] = ("fp32", "fp16")
FLOAT_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2}
ScratchRule = Literal["largest", "per-session", "per-context"]
ACTIVATIONS = "activations"  # a `Handling.runs_as` that means: the activations' float precision
DEFAULT_BLOCK_SIZE = 32

_ORT = "https://github.com/microsoft/onnxruntime/blob/main/onnxruntime"
_MEASURED = "measured here, ONNX Runtime 1.32 on an x86-64 CPU, weights given by add_initializer as the runtime does"


class UnknownRuntimeError(ValueError):
    """`runtime(name)` was given a name that is not in `RUNTIMES`; the message lists the known names."""


def matmul_bytes(
    k: int,
    n: int,
    weights: WeightPrecision,
    activations: ActivationPrecision,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    rows_gathered: bool = False,
    shared_scales: bool = False,
) -> int:
    """Bytes of one 2-D MatMul weight [K, N] (x @ W, K the reduction axis) as the build stores it.

    int8: K*N + N scales; int4: K*N/2 + (K/32)*N scales (blocks along K, or along N where
    `rows_gathered`: the same count); scales at the activations' precision. A side that int4's blocks
    do not divide stays in floats, as the quantization pass keeps it (`WeightQuant.layout`).
    shared_scales: the scales are another tensor's (the compacted down projection's per-output-channel
    int8 scales are the model's own) and are not counted again.
    """
    scale = FLOAT_BYTES[activations]
    if weights in FLOAT_BYTES:
        return k * n * FLOAT_BYTES[weights]
    layout = WeightQuant.from_name(weights, block_size).layout((k, n), rows_gathered=rows_gathered)  # type: ignore[union-attr]
    if layout is None:
        return k * n * scale  # kept in floats at the activations' precision
    if layout.bits == 8:
        return k * n + (0 if shared_scales else n * scale)
    return k * n // 2 + (0 if shared_scales else k * n // block_size * scale)


def check_precisions(weights: str, activations: str) -> None:
    """ConfigError unless `weights` and `activations` are a combination a build can have."""
    if weights not in WEIGHT_PRECISIONS:
        raise ConfigError(f"--weights must be one of {', '.join(WEIGHT_PRECISIONS)}, got {weights!r}")
    if activations not in ACTIVATION_PRECISIONS:
        raise ConfigError(f"--activations must be one of {', '.join(ACTIVATION_PRECISIONS)}, got {activations!r}")
    if weights in FLOAT_BYTES and weights != activations:
        # The build keeps float weights at the activations' precision (docs/quantization.md).
        raise ConfigError(
            f"--weights {weights} needs --activations {weights} (float weights follow the activations); "
            f"use --activations {weights}, or --weights int8/int4"
        )


@dataclass(frozen=True)
class Handling:
    """What one runtime does with the graph-constant weights stored at one precision.

    runs_as: the precision the runtime holds and reads them at: the stored precision when it runs
        them quantized, a float precision (or "activations": the activations' one) when it falls back.
    resident_factor: bytes held per byte of the planned precision, the one copy (measured; 1.0: as stored).
    load_factor: bytes held on top, per byte, while the session that reads them is being built.
    """

    runs_as: str
    kernel: str
    source: str
    resident_factor: float = 1.0
    load_factor: float = 0.0

    def __post_init__(self) -> None:
        if self.runs_as not in (*WEIGHT_PRECISIONS, ACTIVATIONS):
            raise ValueError(f"runs_as must be one of {', '.join(WEIGHT_PRECISIONS)} or {ACTIVATIONS!r}")
        if self.resident_factor <= 0 or self.load_factor < 0:
            raise ValueError("resident_factor must be positive and load_factor not negative")
        if not self.kernel.strip() or not self.source.strip():
            raise ValueError("a handling names its kernel and the source of the fact")

    def precision(self, stored: WeightPrecision, activations: ActivationPrecision) -> WeightPrecision:
        """The precision the weights are planned at."""
        if self.runs_as == ACTIVATIONS:
            return activations
        return stored if self.runs_as in ("int8", "int4") and stored in ("int8", "int4") else self.runs_as  # type: ignore[return-value]


@dataclass(frozen=True)
class Fact:
    """One statement about a runtime, with where it comes from (a URL, a repository path, or a measurement)."""

    text: str
    source: str


@dataclass(frozen=True)
class Runtime:
    """One runtime: how it handles the weights at each precision, and what else the planner must know of it.

    sharing: what it holds of the weights that prefill and decode both read (one copy: one session or one
        engine per graph); `--sharing separate` plans a second one.
    bound: what it holds of the per-request neuron-sparse layers' full FFN weights, which no graph holds:
        bound buffers in the stored form, held once and bound in prefill (the planner counts their stored
        bytes, at the planned precision where the build falls back, and a float copy of one of them while
        a prefill dequantizes it).
    scratch_rule: what it keeps of its graphs' working sets: "largest" (freed after each run: the largest
        graph's), "per-session" (each session's arena keeps its peak: their sum), "per-context" (each
        execution context holds device memory for its engine's largest profile: the sum over contexts, two
        per decoder stack).
    """

    name: str
    title: str
    weights: Mapping[str, Handling]
    sharing: Fact
    bound: Fact
    scratch_rule: ScratchRule
    scratch: Fact
    per_request_quantized: bool  # can run a quantized build's per-request neuron path (bound quantized weights)
    per_request_quantized_reason: str = ""
    fp16_activations_as: ActivationPrecision = "fp16"  # what fp16 activations really run at
    min_compute_capability: float | None = None  # None: not a GPU runtime
    facts: tuple[Fact, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if sorted(self.weights) != sorted(WEIGHT_PRECISIONS):
            raise ValueError(f"runtime {self.name}: weights must cover exactly {', '.join(WEIGHT_PRECISIONS)}")
        if not self.per_request_quantized and not self.per_request_quantized_reason:
            raise ValueError(f"runtime {self.name}: say why the per-request quantized path does not run")

    def handling(self, weights: str) -> Handling:
        return self.weights[weights]

    def falls_back(self, weights: WeightPrecision, activations: ActivationPrecision) -> WeightPrecision | None:
        """The precision `weights` really run at on this runtime, or None when they run as stored."""
        planned = self.handling(weights).precision(weights, activations)
        return None if planned == weights else planned

    def bound_precision(self, weights: WeightPrecision, activations: ActivationPrecision) -> WeightPrecision:
        """The precision the runtime holds bound weights at (the per-request layers' full FFN and the request's
        compacted copy): as stored, since no constant is folded or cast, unless the build itself must be made at
        the activations' precision on this runtime."""
        handling = self.handling(weights)
        return handling.precision(weights, activations) if handling.runs_as == ACTIVATIONS else weights

    def runs_on(self, compute_capability: str) -> bool:
        return self.min_compute_capability is None or float(compute_capability) >= self.min_compute_capability


def _float(kernel: str, source: str) -> dict[str, Handling]:
    return {p: Handling(runs_as=p, kernel=kernel, source=source) for p in ("fp32", "fp16")}


_ARCHITECTURE = "docs/architecture.md (one weight file)"
_TRT_SHARING = Fact(
    "one copy: each decoder stack is one engine with a prefill and a decode optimization profile, and the two "
    "execution contexts the runtime makes of it share the engine's weights",
    f"{_ARCHITECTURE}; runtime/trt_io.py (one context per profile of the same engine); not measured here (no GPU)",
)
_TRT_BOUND = Fact(
    "device buffers held once by the runtime, in the stored form; the engine dequantizes them per run",
    f"{_ARCHITECTURE}; not measured here (no GPU)",
)
_TRT_SCRATCH = Fact(
    "each execution context holds device memory for its engine's largest profile for its lifetime "
    "(createExecutionContext; TensorRT 10's default allocation strategy is static), so a decoder stack's decode "
    "context holds as much as its prefill context; the engines' scratch adds up",
    "runtime/trt_io.py (engine.create_execution_context per profile); https://docs.nvidia.com/deeplearning/"
    "tensorrt/latest/_static/python-api/infer/Core/RuntimeConfig.html (ExecutionContextAllocationStrategy.STATIC: "
    "the maximum size across all profiles); the sizes are the planner's working-set estimates, not TensorRT's",
)
# Every runtime: the build refuses this combination (export.config.INT4_PER_REQUEST).
INT4_PER_REQUEST_REASON = (
    "int4 weights with per-request core neurons are refused by the build: no fused int4 kernel takes weights "
    "gathered per request, so every decode step would dequantize them (3-9x slower than a static set, "
    "docs/benchmarks/precisions.md); plan int4 with static neurons"
)
_NO_BOUND_DEQUANTIZE = (
    "the per-request path binds the sparse layers' quantized FFN weights as inputs: TensorRT's weight-only "
    "quantization takes constant weights, and int4's nibble pairs are unpacked with BitShift, which the ONNX "
    "parser does not support (https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md; "
    "docs/architecture.md); the build marks it TensorRT-incompatible"
)

_RUNTIME_LIST: tuple[Runtime, ...] = (
    Runtime(
        name="onnxruntime-cpu",
        title="ONNX Runtime (CPU)",
        weights={
            "fp32": Handling("fp32", "MatMul (MLAS) on views of the memory-mapped weights.bin", _MEASURED),
            "fp16": Handling(
                "fp32",
                "MatMul in fp32: the CPU provider has no fp16 MatMul on x86-64, so it inserts Casts and "
                "folds each fp16 weight into an fp32 copy",
                f"{_MEASURED}: 2.0x the fp16 bytes; {_ORT}/core/optimizer/insert_cast_transformer.cc",
            ),
            "int8": Handling(
                "int8",
                "MatMulNBits, 8 bits (DequantizeLinear + MatMul fused at EXTENDED and above), pre-packed",
                f"{_MEASURED}: 1.23x the stored bytes for the session's pre-packed copy and the mapped pages the "
                "packing read (per-channel scales become blocks of 32), 1.8x more while the session is built; "
                f"{_ORT}/core/optimizer/qdq_transformer/selectors_actions/qdq_selectors.cc (ValidateDQForMatMulNBits)",
                resident_factor=1.23,
                load_factor=1.8,
            ),
            "int4": Handling(
                "int4",
                "MatMulNBits, 4 bits (blocked DequantizeLinear, axis 0, fused at EXTENDED and above), pre-packed",
                f"{_MEASURED}: 1.17x the stored bytes for the pre-packed copy and the mapped pages read, 1.9x more "
                "while the session is built",
                resident_factor=1.17,
                load_factor=1.9,
            ),
        },
        sharing=Fact(
            "one copy: one session per graph reads each weight; float weights are views of the memory-mapped "
            "weights.bin (pre-packing off), fp16 ones an fp32 copy, quantized ones one pre-packed MatMulNBits copy",
            f"{_MEASURED}; runtime/ort_backend.py (SharedWeights); {_ARCHITECTURE}",
        ),
        bound=Fact(
            "views of the memory-mapped weights.bin in the stored form (int4: nibble pairs), bound in prefill; "
            "a prefill unpacks and dequantizes (fp16: casts) one at a time, a transient float copy",
            f"{_ARCHITECTURE}; docs/quantization.md; not graph constants, so neither folded nor pre-packed",
        ),
        scratch_rule="largest",
        scratch=Fact(
            "no CPU arena: a graph's working set is freed after its run", "runtime/ort_backend.py (SharedWeights)"
        ),
        per_request_quantized=True,
        fp16_activations_as="fp32",
        facts=(
            Fact(
                "the default accuracy level of the fused kernel (session.qdq_matmulnbits_accuracy_level = 4) "
                "quantizes the activations to int8 per block (relative error ~0.6% on a test matmul); level 1 "
                "or 0 keeps fp32 arithmetic (the runtime uses 1)",
                _MEASURED,
            ),
            Fact(
                "fp16 activations run as fp32 around every MatMul (inserted Casts), so they are planned at fp32",
                _MEASURED,
            ),
        ),
    ),
    Runtime(
        name="onnxruntime-cuda",
        title="ONNX Runtime (CUDA)",
        weights={
            **_float("cuBLAS GEMM", "runtime/ort_backend.py (SharedWeights: one device copy)"),
            "int8": Handling(
                "int8",
                "MatMulNBits, 8 bits (CUDA kernels; DequantizeLinear + MatMul fused for the CUDA provider too)",
                f"{_ORT}/core/optimizer/qdq_transformer/selectors_actions/qdq_selector_action_transformer.cc "
                f"(DQMatMulToMatMulNBitsRules lists the CUDA provider); {_ORT}/contrib_ops/cuda/quantization/"
                "matmul_8bits.cu; uploaded once like a float weight (runtime/ort_backend.py); not measured on a GPU",
            ),
            "int4": Handling(
                "int4",
                "MatMulNBits, 4 bits (CUDA kernels)",
                f"{_ORT}/contrib_ops/cuda/quantization/matmul_4bits.cu; runtime/ort_backend.py: the Python API makes "
                "int4 values on the host only, so the one session that reads them copies them to the device",
            ),
        },
        sharing=Fact(
            "one device copy: float and int8 weights are uploaded once, int4 ones copied to the device by the one "
            "session that reads them (the Python API makes int4 values on the host only)",
            f"runtime/ort_backend.py (SharedWeights); {_ARCHITECTURE}; not measured here (no GPU)",
        ),
        bound=Fact(
            "device buffers held once by the runtime in the stored form, bound in prefill; dequantized per run",
            f"{_ARCHITECTURE}; not measured here (no GPU)",
        ),
        scratch_rule="per-session",
        scratch=Fact(
            "each session's CUDA provider has its own arena, which keeps the session's peak (the runtime does not "
            "share one; the arena grows by powers of two, not counted)",
            f"runtime/ort_backend.py; {_ORT}/core/providers/cuda/cuda_execution_provider.cc (arena per provider "
            "instance); not measured here (no GPU)",
        ),
        per_request_quantized=True,
        min_compute_capability=5.2,
        facts=(
            Fact(
                "on the CPU provider the DequantizeLinear + MatMul fusion makes new MatMulNBits initializers; "
                "whether it does so on the CUDA provider too (a second int8 copy beside the uploaded one) is not "
                "measured",
                f"{_MEASURED}; {_ORT}/core/optimizer/qdq_transformer/selectors_actions/qdq_actions.cc",
            ),
            Fact(
                "MatMulNBits' CUTLASS (fpA_intB) path needs compute capability 7.5 or later; what runs on SM 6.1 "
                "(Titan Xp) and whether the nibble-unpacking ops of the per-request int4 path run on the CUDA "
                "provider (or fall back to the CPU) is not established",
                f"{_ORT}/contrib_ops/cuda/quantization/matmul_nbits.h",
            ),
            Fact(
                "the lowest compute capability ONNX Runtime's CUDA 12 packages are built for is not established "
                "here (5.2 is the planner's assumption)",
                "assumption",
            ),
        ),
    ),
    Runtime(
        name="tensorrt-8.6",
        title="TensorRT 8.6",
        weights={
            **_float("TensorRT GEMM", "https://docs.nvidia.com/deeplearning/tensorrt/archives/tensorrt-861/"),
            "int8": Handling(
                ACTIVATIONS,
                "falls back: a weight-only DequantizeLinear is constant-folded into float weights (INT8 GEMMs need "
                "Q/DQ on both inputs before TensorRT 10's weight-only quantization)",
                "https://github.com/NVIDIA/TensorRT/releases/tag/v10.0.0 (weight-only quantization arrives in 10.0); "
                "the folding itself is not measured here",
            ),
            "int4": Handling(
                ACTIVATIONS,
                "falls back: TensorRT 8.6 has no INT4 type (the ONNX parser refuses INT4 weights), so the weights "
                "must be built at the activations' precision",
                "https://docs.nvidia.com/deeplearning/tensorrt/archives/tensorrt-1001/developer-guide/index.html "
                "(revision history: INT4 type added in 10.0)",
            ),
        },
        sharing=_TRT_SHARING,
        bound=_TRT_BOUND,
        scratch_rule="per-context",
        scratch=_TRT_SCRATCH,
        per_request_quantized=False,
        per_request_quantized_reason=_NO_BOUND_DEQUANTIZE,
        min_compute_capability=5.0,
    ),
    Runtime(
        name="tensorrt-10",
        title="TensorRT 10",
        weights={
            **_float("TensorRT GEMM", "https://docs.nvidia.com/deeplearning/tensorrt/latest/"),
            "int8": Handling(
                "int8",
                "quantized weights stored in the engine (explicit quantization); whether a weight-only INT8 GEMM "
                "reads them on SM 8.7 is not established",
                "https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/"
                "quantized-types-explicit-quantization.html",
            ),
            "int4": Handling(
                "int4",
                "weight-only INT4 with block quantization: the GEMM reads 4-bit weights and dequantizes them in the "
                "kernel, activations stay in floats",
                "https://github.com/NVIDIA/TensorRT/releases/tag/v10.0.0; https://docs.nvidia.com/deeplearning/"
                "tensorrt/latest/inference-library/work-with-quantized-types.html",
            ),
        },
        sharing=_TRT_SHARING,
        bound=_TRT_BOUND,
        scratch_rule="per-context",
        scratch=_TRT_SCRATCH,
        per_request_quantized=False,
        per_request_quantized_reason=_NO_BOUND_DEQUANTIZE,
        min_compute_capability=7.0,
        facts=(
            Fact(
                "TensorRT 10 is built for compute capability 7.0 and later (so not for the Titan Xp's 6.1)",
                "https://docs.nvidia.com/deeplearning/tensorrt/archives/tensorrt-1010/support-matrix/index.html",
            ),
            Fact(
                "JetPack 6.1 and 6.2 ship TensorRT 10.3; JetPack 6.0 ships TensorRT 8.6",
                "https://pytorch.org/TensorRT/getting_started/jetpack.html; "
                "https://docs.nvidia.com/jetson/jetpack/release-notes/index.html",
            ),
            Fact(
                "whether a per-request int8 build's dequantization of its bound FFN inputs (a DequantizeLinear of a "
                "network input, not a constant) builds is not established",
                "https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/"
                "work-with-quantized-types.html; not built here (no GPU)",
            ),
        ),
    ),
)

RUNTIMES: dict[str, Runtime] = {r.name: r for r in _RUNTIME_LIST}


def runtime(name: str) -> Runtime:
    """The runtime called `name`; an `UnknownRuntimeError` listing the known names otherwise."""
    try:
        return RUNTIMES[name]
    except (KeyError, TypeError):
        raise UnknownRuntimeError(f"unknown runtime {name!r}; known runtimes: {', '.join(RUNTIMES)}") from None
