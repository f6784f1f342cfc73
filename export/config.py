"""Typed configuration of `python -m export build`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from coreMatching.config import CoreMatchingConfig
from coreMatching.errors import ConfigError
from coreMatching.quant_scheme import WeightPrecision, WeightQuant
from coreMatching.static_neurons import DEFAULT_STATIC_RECIPE, StaticRecipe

# The dynamo exporter of torch 2.13 writes opset 18 and later.
SUPPORTED_OPSETS = range(18, 24)
INT4_OPSET = 21  # int4 and block_size in DequantizeLinear


# No fused int4 kernel (MatMulNBits) takes weights gathered per request: measured 3-9x slower decode steps than
# a static set (docs/benchmarks/precisions.md), so the combination is refused (planner.runtimes says the same).
INT4_PER_REQUEST = (
    "--weights int4 with per-request core neurons has no fused kernel: every decode step would dequantize the "
    "request's compacted FFN (3-9x slower than a static set); add --static-neurons, or use --weights int8 or fp32"
)


@dataclass(frozen=True)
class ExportConfig:
    """What `python -m export build` builds.

    model_dir: a local llava-hf directory; None builds the embedded default model.
    out: the build directory (written to a temporary directory next to it, then renamed).
    corematching: the budgets; None builds the dense model (every token, every neuron).
    fp16: activations (and float weights) in float16 (validated with a looser tolerance, docs/architecture.md).
    weights: "fp32"/"fp16" (the activations'), or "int8"/"int4" weight-only quantization of the 2-D
        MatMul weights (docs/quantization.md); block_size: int4's block along the reduction axis.
    max_prompt_tokens / max_sequence: the longest prompt and prompt + answer the graphs are
        profiled for (TensorRT optimization profiles; the runtime refuses longer ones).
    tensorrt: keep the static-budget graphs within TensorRT's limits (chunked neuron selection
        where N is beyond TopK's K < 3840).
    static_neurons: bake a static neuron set (counted over `calibration_count` prompts of `calibration`,
        a JSONL file of image and question, or None: the shapes validation split) into narrower FFN
        weights in every graph, instead of selecting core neurons per request (docs/method.md);
        static_recipe: how that set ranks each layer's neurons and how wide it is (a multiple of N).
    """

    out: Path
    model_dir: Path | None = None
    corematching: CoreMatchingConfig | None = field(default_factory=CoreMatchingConfig)
    fp16: bool = False
    weights: WeightPrecision | None = None  # None: the activations' float precision
    block_size: int = 32
    opset: int | None = None  # None: 18, or 21 for int4 weights (blocked DequantizeLinear)
    force: bool = False
    validate: bool = True
    max_prompt_tokens: int = 1024
    max_sequence: int = 2048
    tensorrt: bool = True
    static_neurons: bool = False
    calibration: Path | None = None
    calibration_count: int = 64
    static_recipe: StaticRecipe = DEFAULT_STATIC_RECIPE

    def __post_init__(self) -> None:
        if self.static_neurons and self.corematching is None:
            raise ConfigError("--static-neurons narrows CoreMatching's neuron-sparse layers; drop --dense")
        if not self.static_neurons and self.calibration is not None:
            raise ConfigError("--calibration is the static neuron set's calibration data; add --static-neurons")
        if not isinstance(self.static_recipe, StaticRecipe):
            raise ConfigError(f"static_recipe must be a StaticRecipe, got {type(self.static_recipe).__name__}")
        if not self.static_neurons and not self.static_recipe.is_default:
            raise ConfigError(
                "--static-criterion/--static-width-ratio shape the static neuron set; add --static-neurons"
            )
        if self.calibration is not None and not self.calibration.is_file():
            raise ConfigError(
                f"--calibration {self.calibration}: no such file; pass a JSONL file of image and question lines"
            )
        if self.calibration_count < 1:
            raise ConfigError(f"--calibration-count must be at least 1, got {self.calibration_count}")
        activations = "fp16" if self.fp16 else "fp32"
        if self.weights is None:
            object.__setattr__(self, "weights", activations)
        WeightQuant.from_name(self.weights, self.block_size)  # type: ignore[arg-type]  # checks both
        if self.weights in ("fp32", "fp16") and self.weights != activations:
            raise ConfigError(
                f"--weights {self.weights} with {activations} activations: float weights follow the activations "
                f"(add or drop --fp16), or quantize them with --weights int8 or int4"
            )
        cm = self.corematching
        sparse = cm is not None and (cm.neuron_layers is None or cm.neuron_layers[0] < cm.neuron_layers[1])
        if self.weights == "int4" and sparse and not self.static_neurons:
            raise ConfigError(INT4_PER_REQUEST)
        if self.opset is None:
            object.__setattr__(self, "opset", INT4_OPSET if self.weights == "int4" else 18)
        if self.weights == "int4" and self.opset < INT4_OPSET:  # type: ignore[operator]
            raise ConfigError(f"--weights int4 needs --opset {INT4_OPSET} or later (blocked DequantizeLinear)")
        if self.opset not in SUPPORTED_OPSETS:
            raise ConfigError(
                f"--opset {self.opset} is not supported; use {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}"
            )
        if self.max_prompt_tokens < 2:
            raise ConfigError(f"max_prompt_tokens must be at least 2, got {self.max_prompt_tokens}")
        if self.max_sequence <= self.max_prompt_tokens:
            raise ConfigError(
                f"max_sequence ({self.max_sequence}) must be larger than max_prompt_tokens ({self.max_prompt_tokens})"
            )

    @property
    def quant(self) -> WeightQuant | None:
        """The quantization scheme, or None for float weights."""
        return WeightQuant.from_name(self.weights, self.block_size)  # type: ignore[arg-type]

    @property
    def dense(self) -> bool:
        return self.corematching is None
