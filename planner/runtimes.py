"""What a build's weights cost at each precision, and what each runtime really does with them (torch-free).

Two halves, both used by the memory planner (`planner.plan`, docs/planning.md):

- the byte counts of the build's storage scheme (docs/quantization.md), exact: `matmul_bytes`;
- `RUNTIMES`, one `Runtime` per runtime name: for every stored weight form, whether the runtime keeps
  it low-bit in memory and reads it with a low-bit kernel, or falls back (holds it at a float
  precision), whether it holds one copy per session, and the source of each fact. A precision that
  falls back on a runtime is planned at the precision it really runs at.

Weight forms: the four precisions, and the two int4 forms that the per-request neuron path stores
for the neuron-sparse layers' FFN in the prefill graph (uint8 nibble pairs unpacked in the graph):
"int4-gathered-columns" (gate, up) and "int4-gathered-rows" (down). A runtime that lists no entry
for a gathered form handles it as plain int4.

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
GATHERED_FORMS = ("int4-gathered-columns", "int4-gathered-rows")
FORMS = (*WEIGHT_PRECISIONS, *GATHERED_FORMS)
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
    """What one runtime does with weights stored in one form.

    runs_as: the precision the runtime holds and reads them at: the stored precision when it runs
        them quantized, a float precision (or "activations": the activations' one) when it falls back.
    per_session: it holds one copy per session or engine that reads them (prefill and decode both),
        not one shared copy.
    resident_factor: bytes held per byte of the form, per copy (measured; 1.0: as stored).
    load_factor: bytes held on top, per byte, while a session that reads them is being built.
    dequantized_at_run: a DequantizeLinear runs before the MatMul, so a float copy of the weight lives
        while the MatMul runs (counted in the peak activations).
    """

    runs_as: str
    kernel: str
    source: str
    per_session: bool = False
    resident_factor: float = 1.0
    load_factor: float = 0.0
    dequantized_at_run: bool = False

    def __post_init__(self) -> None:
        if self.runs_as not in (*WEIGHT_PRECISIONS, ACTIVATIONS):
            raise ValueError(f"runs_as must be one of {', '.join(WEIGHT_PRECISIONS)} or {ACTIVATIONS!r}")
        if self.resident_factor <= 0 or self.load_factor < 0:
            raise ValueError("resident_factor must be positive and load_factor not negative")
        if not self.kernel.strip() or not self.source.strip():
            raise ValueError("a handling names its kernel and the source of the fact")

    def precision(self, stored: WeightPrecision, activations: ActivationPrecision) -> WeightPrecision:
        """The precision the weights are planned at (an int4 form that the runtime unpacks stays int4: its
        resident factor counts the unpacking)."""
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
    """One runtime: how it handles each weight form, and what else the planner must know of it."""

    name: str
    title: str
    weights: Mapping[str, Handling]
    # What prefill and decode hold of the weights they share, as the runtime is used today; the per-form
    # `Handling.per_session` flags are its detail.
    sharing: Fact
    per_request_int4: bool  # can run an int4 build's per-request neuron path (the nibble-unpacking ops)
    per_request_int4_reason: str = ""
    fp16_activations_as: ActivationPrecision = "fp16"  # what fp16 activations really run at
    min_compute_capability: float | None = None  # None: not a GPU runtime
    floats_per_session: bool = False  # norms, biases, the embedding table: one copy per session or engine
    facts: tuple[Fact, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        missing = [p for p in WEIGHT_PRECISIONS if p not in self.weights]
        unknown = [f for f in self.weights if f not in FORMS]
        if missing or unknown:
            raise ValueError(f"runtime {self.name}: weights must cover {', '.join(WEIGHT_PRECISIONS)} (forms: {FORMS})")
        if not self.per_request_int4 and not self.per_request_int4_reason:
            raise ValueError(f"runtime {self.name}: say why the per-request int4 path does not run")

    def handling(self, form: str) -> Handling:
        """The handling of a weight form (a gathered int4 form without its own entry is plain int4)."""
        return self.weights.get(form) or self.weights["int4" if form in GATHERED_FORMS else form]

    def falls_back(self, weights: WeightPrecision, activations: ActivationPrecision) -> WeightPrecision | None:
        """The precision `weights` really run at on this runtime, or None when they run as stored."""
        planned = self.handling(weights).precision(weights, activations)
        return None if planned == weights else planned

    def runs_on(self, compute_capability: str) -> bool:
        return self.min_compute_capability is None or float(compute_capability) >= self.min_compute_capability


def _float(kernel: str, source: str, **kw: object) -> dict[str, Handling]:
    return {p: Handling(runs_as=p, kernel=kernel, source=source, **kw) for p in ("fp32", "fp16")}  # type: ignore[arg-type]


_TRT_SHARING = Fact(
    "one copy per engine: prefill and decode are two engines and an engine owns its weights (weight-stripped "
    "engines are refitted at load; optimization profiles share weights only within one network); one network "
    "with two profiles would keep a single copy and is not built",
    "docs/architecture.md (one weight file); not measured here (no GPU)",
)
_TRT_ENGINE = {"per_session": True}  # every weight is held once per engine that reads it
_NO_BITSHIFT = (
    "the per-request int4 path unpacks nibble pairs with BitShift, which the ONNX parser does not support "
    "(https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md; docs/quantization.md)"
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
                f"{_MEASURED}: 2.0x the fp16 bytes per session; {_ORT}/core/optimizer/insert_cast_transformer.cc",
                per_session=True,
            ),
            "int8": Handling(
                "int8",
                "MatMulNBits, 8 bits (DequantizeLinear + MatMul fused at EXTENDED and above), pre-packed",
                f"{_MEASURED}: 1.23x the stored bytes per session (per-channel scales become blocks of 32), "
                f"1.8x more while a session is built; {_ORT}/core/optimizer/qdq_transformer/selectors_actions/"
                "qdq_selectors.cc (ValidateDQForMatMulNBits)",
                per_session=True,
                resident_factor=1.23,
                load_factor=1.8,
            ),
            "int4": Handling(
                "int4",
                "MatMulNBits, 4 bits (blocked DequantizeLinear, axis 0, fused at EXTENDED and above), pre-packed",
                f"{_MEASURED}: 1.17x the stored bytes per session, 1.9x more while a session is built",
                per_session=True,
                resident_factor=1.17,
                load_factor=1.9,
            ),
            "int4-gathered-columns": Handling(
                "int8",
                "constant folding unpacks the nibble pairs into uint8 values, which the fusion takes as an "
                "8-bit MatMulNBits",
                f"{_MEASURED}: 2.9x the stored bytes per session after the first run",
                per_session=True,
                resident_factor=2.9,
                load_factor=1.9,
            ),
            "int4-gathered-rows": Handling(
                "int8",
                "unpacked uint8 values; DequantizeLinear + MatMul at run time (blocks along axis 1 are not fused)",
                f"{_MEASURED}: 4.7x the stored bytes per session after the first run",
                per_session=True,
                resident_factor=4.7,
                load_factor=1.9,
                dequantized_at_run=True,
            ),
        },
        sharing=Fact(
            "fp32 weights are shared: both sessions get views of one memory-mapped weights.bin (pre-packing "
            "off); fp16 and quantized MatMul weights are held once per session that reads them (fp32 copies; "
            "pre-packed MatMulNBits, which the Python API cannot share across sessions)",
            f"{_MEASURED}; runtime/ort_backend.py (SharedWeights); docs/quantization.md",
        ),
        per_request_int4=True,
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
            **_float("cuBLAS GEMM", "runtime/ort_backend.py (SharedWeights: one device copy, added to both sessions)"),
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
                "int4 values on the host only, so each session copies them to the device",
                per_session=True,
            ),
            # Constant folding, which unpacks the nibble pairs into uint8 values on the CPU provider, does not
            # depend on the provider; the factor is the unpacked bytes per stored byte (fp16 scales), estimated.
            "int4-gathered-columns": Handling(
                "int8",
                "constant folding unpacks the nibble pairs into uint8 values (8-bit MatMulNBits)",
                "estimated from the CPU provider's measured behaviour (1.9x the stored bytes); not measured on a GPU",
                resident_factor=1.9,
            ),
            "int4-gathered-rows": Handling(
                "int8",
                "unpacked uint8 values; DequantizeLinear + MatMul at run time (blocks along axis 1 are not fused)",
                "estimated from the CPU provider's measured behaviour (1.9x the stored bytes); not measured on a GPU",
                resident_factor=1.9,
                dequantized_at_run=True,
            ),
        },
        sharing=Fact(
            "float and int8 weights are uploaded once and added to both sessions; int4 weights are copied to the "
            "device by each session (the Python API makes int4 values on the host only)",
            "runtime/ort_backend.py (SharedWeights); docs/architecture.md; not measured here (no GPU)",
        ),
        per_request_int4=True,
        min_compute_capability=5.2,
        facts=(
            Fact(
                "on the CPU provider the DequantizeLinear + MatMul fusion makes new MatMulNBits initializers in each "
                "session; whether it does so on the CUDA provider too (a second int8 copy) is not measured",
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
            **_float(
                "TensorRT GEMM", "https://docs.nvidia.com/deeplearning/tensorrt/archives/tensorrt-861/", **_TRT_ENGINE
            ),
            "int8": Handling(
                ACTIVATIONS,
                "falls back: a weight-only DequantizeLinear is constant-folded into float weights (INT8 GEMMs need "
                "Q/DQ on both inputs before TensorRT 10's weight-only quantization)",
                "https://github.com/NVIDIA/TensorRT/releases/tag/v10.0.0 (weight-only quantization arrives in 10.0); "
                "the folding itself is not measured here",
                **_TRT_ENGINE,
            ),
            "int4": Handling(
                ACTIVATIONS,
                "falls back: TensorRT 8.6 has no INT4 type (the ONNX parser refuses INT4 weights), so the weights "
                "must be built at the activations' precision",
                "https://docs.nvidia.com/deeplearning/tensorrt/archives/tensorrt-1001/developer-guide/index.html "
                "(revision history: INT4 type added in 10.0)",
                **_TRT_ENGINE,
            ),
        },
        sharing=_TRT_SHARING,
        floats_per_session=True,
        per_request_int4=False,
        per_request_int4_reason=_NO_BITSHIFT,
        min_compute_capability=5.0,
    ),
    Runtime(
        name="tensorrt-10",
        title="TensorRT 10",
        weights={
            **_float("TensorRT GEMM", "https://docs.nvidia.com/deeplearning/tensorrt/latest/", **_TRT_ENGINE),
            "int8": Handling(
                "int8",
                "quantized weights stored in the engine (explicit quantization); whether a weight-only INT8 GEMM "
                "reads them on SM 8.7 is not established",
                "https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/"
                "quantized-types-explicit-quantization.html",
                **_TRT_ENGINE,
            ),
            "int4": Handling(
                "int4",
                "weight-only INT4 with block quantization: the GEMM reads 4-bit weights and dequantizes them in the "
                "kernel, activations stay in floats",
                "https://github.com/NVIDIA/TensorRT/releases/tag/v10.0.0; https://docs.nvidia.com/deeplearning/"
                "tensorrt/latest/inference-library/work-with-quantized-types.html",
                **_TRT_ENGINE,
            ),
        },
        sharing=_TRT_SHARING,
        floats_per_session=True,
        per_request_int4=False,
        per_request_int4_reason=_NO_BITSHIFT,
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
