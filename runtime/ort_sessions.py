"""ONNX Runtime sessions for a build (torch-free): the execution providers, and the weights file mapped once
and handed to every session (`SharedWeights`). `runtime.ort_backend` runs a request on them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from buildformat import Manifest
from runtime.backend import BackendError

log = logging.getLogger(__name__)

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
# What "auto" tries, best first.
AUTO_ORDER = ("tensorrt", "cuda", "cpu")
INT4 = 22  # onnx.TensorProto.INT4 (the runtime does not import onnx)
# MatMulNBits' accuracy levels (quantized builds): 1 multiplies in fp32 (the reference's arithmetic, what
# validation checks, the default here); 4 (ONNX Runtime's own default) with activations quantized to
# int8 per block, faster but measured to change greedy answers (docs/quantization.md).
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
TRT_CACHE = "trt_cache"


class ProviderError(BackendError):
    """An execution provider asked for by name is not available."""


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendError(
            "onnxruntime is not installed: pip install onnxruntime (CPU) or onnxruntime-gpu "
            "(NVIDIA GPU; on a Jetson the wheel built for your JetPack)"
        ) from e
    return onnxruntime


def choose_providers(requested: str, available: list[str], build_dir: Path, fp16: bool) -> tuple[list[Any], list[str]]:
    """(providers for InferenceSession, warnings). `requested`: auto, tensorrt, cuda or cpu.

    Under "auto" the best available provider leads and the others follow as fallbacks (with a
    warning when no GPU provider is there); a provider asked for by name must be available.
    """
    if requested != "auto" and requested not in PROVIDERS:
        raise ProviderError(f"unknown provider {requested!r}; use auto, {', '.join(PROVIDERS)}")
    have = [key for key in AUTO_ORDER if PROVIDERS[key] in available]
    warnings = []
    if requested == "auto":
        chosen = have
        if chosen[:1] == ["cpu"]:
            warnings.append("no GPU execution provider in this onnxruntime (install onnxruntime-gpu): using the CPU")
    elif requested in have:
        chosen = AUTO_ORDER[AUTO_ORDER.index(requested) :]
        chosen = [key for key in chosen if key in have]
    else:
        names = ", ".join(key for key in have) or "none"
        raise ProviderError(
            f"execution provider {requested!r} is not available in this onnxruntime (it has: {names}); "
            "install onnxruntime-gpu for cuda/tensorrt, or choose --provider auto"
        )
    providers: list[Any] = []
    for key in chosen:
        if key == "tensorrt":
            # Engines built by the provider are cached next to the build, so later runs start fast.
            options = {
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(build_dir / TRT_CACHE),
                "trt_fp16_enable": fp16,
            }
            providers.append((PROVIDERS[key], options))
        else:
            providers.append(PROVIDERS[key])
    return providers, warnings


class SharedWeights:
    """The build's weights.bin, memory-mapped once and given to every session as views.

    Each weight is in one graph: its session gets an `add_initializer` view of the mapped pages (float
    builds: pre-packing off, so the pages are the one copy; quantized builds: the session pre-packs its
    `MatMulNBits` weights once), and the bound FFN weights are views of the same file (`bound`).
    """

    def __init__(
        self,
        build_dir: Path,
        manifest: Manifest,
        ort: Any,
        level: Any = None,
        accuracy_level: int = 1,
        device: str = "cpu",
    ) -> None:
        self.device = device  # "cpu": views of the mapped file; "cuda": one device copy of each weight
        self.ort = ort
        self.level = level
        self.index = manifest.weights
        self.quantized = manifest.quantization is not None
        self.accuracy_level = accuracy_level
        self.shared: dict[int, Any] = {}  # weights.bin offset -> its OrtValue (must outlive the sessions)
        self.mapped = None
        if self.index:
            self.mapped = np.memmap(build_dir / self.index.file, dtype=np.uint8, mode="r")

    def options(self, file: str) -> Any:
        """The session options of the graph in `file` (the build's .onnx file), its weights added."""
        options = self.ort.SessionOptions()
        options.log_severity_level = 3
        if self.level is not None:
            options.graph_optimization_level = self.level
        # No CPU arena: it keeps every peak allocation for the life of the session (measured: 120 MB
        # more at the same speed on the llava-7b-shape benchmark).
        options.enable_cpu_mem_arena = False
        # A build runs several sessions one after another (the stacks, then the next step's): a finished
        # session's threads must not spin on for work while the next one's need the same cores (measured on 2
        # cores, a llava-7b-shape decode step: 82 ms spinning on, 50 ms stopped after each run).
        options.add_session_config_entry("session.force_spinning_stop", "1")
        if self.mapped is None:
            return options
        if self.quantized:
            # MatMulNBits (the fused form of a quantized weight's DequantizeLinear + MatMul) runs its fast
            # kernels on pre-packed weights only: measured 130 ms vs 0.9 ms for a 4096 x 11008 int4 matmul.
            # ONNX Runtime's Python API has no cross-session pre-packed container, so each session packs
            # its own copy of what it reads (docs/quantization.md, memory).
            options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(self.accuracy_level))
        else:
            options.add_session_config_entry("session.disable_prepacking", "1")
        for name, entry in self.index.graphs[file].items():
            # One value per stored weight, given to every session that reads it (weights.bin holds each once).
            if entry.offset not in self.shared:
                self.shared[entry.offset] = self._value(entry)
            options.add_initializer(name, self.shared[entry.offset])
        return options

    def bound(self) -> dict[str, Any]:
        """The full FFN weights the stacks take as inputs in prefill (per-request neuron-sparse layers), one
        value each: views of the mapped file, or one device copy."""
        return {name: self._value(entry) for name, entry in (self.index.bound if self.index else {}).items()}

    def _value(self, entry: Any) -> Any:
        if entry.dtype != "int4":
            view = np.ndarray(entry.shape, dtype=np.dtype(entry.dtype), buffer=self.mapped, offset=entry.offset)
            if self.device == "cuda":
                return self.ort.OrtValue.ortvalue_from_numpy(view, "cuda", 0)  # copied to the device once
            return self.ort.OrtValue.ortvalue_from_numpy(view)
        # int4 on the CUDA provider: ONNX Runtime's Python API makes int4 values on the host only, so each
        # session copies them to the device (docs/quantization.md).
        # numpy has no int4: ONNX Runtime takes the logical shape from the array and reads the packed
        # bytes (two values per byte) from its data pointer, so the array is a zero-stride view of the
        # shape over the first packed byte (nothing is copied; the bytes stay the mapped file's).
        first = np.ndarray((1,), dtype=np.uint8, buffer=self.mapped, offset=entry.offset)
        view = np.lib.stride_tricks.as_strided(first, shape=entry.shape, strides=(0,) * len(entry.shape))
        return self.ort.OrtValue.ortvalue_from_numpy_with_onnx_type(view, INT4)
