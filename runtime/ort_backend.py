"""The ONNX Runtime backend: TensorRT, CUDA or CPU execution provider (torch-free).

Per request the cache is one zero-padded buffer per layer, sized once for the
prompt and the longest answer. The decode session is IO-bound to those buffers
and to the request's compacted FFN weights once; every step rebinds only the
token's embedding and positions, and writes the token's own cache entries (the
decode graph's `new.{i}.*` outputs, [1, n_kv, 1, hd]) into the buffers.

On the CPU provider the bound buffers are the numpy arrays themselves (ONNX
Runtime reads them in place), so a step moves no cache bytes. On a GPU
provider the buffers and the compacted weights are uploaded once per request
(`runtime.cuda_memory`, cuda-python) and bound by device pointer; a step moves
the embedding, two integers and the logits across the bus, and writes the
token's cache entries with one strided device copy per tensor. (The GPU path
has not run here: the development machine has no GPU.)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from buildformat import GRAPHS, Manifest
from buildformat.names import (
    IMAGE_FEATURES,
    IMAGE_START,
    INPUT_IDS,
    INPUTS_EMBEDS,
    KEPT_IMAGE_TOKENS,
    LOGITS,
    PIXEL_VALUES,
    core_neurons_layer,
    is_present,
    is_request_input,
    new_name,
    past_name,
)
from runtime.backend import Backend, BackendError, PrefillResult, activation_dtype
from runtime.decode_state import DecodeState

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

    The prefill and decode graphs share most weights; loaded separately they would be held twice
    (and once more pre-packed). Each session gets `add_initializer` views of the same mapped pages,
    and pre-packing is off, so the process holds each weight once (the pages are the file's).
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

    def options(self, graph: str) -> Any:
        options = self.ort.SessionOptions()
        options.log_severity_level = 3
        if self.level is not None:
            options.graph_optimization_level = self.level
        # No CPU arena: it keeps every peak allocation for the life of the session (measured: 120 MB
        # more at the same speed on the llava-7b-shape benchmark).
        options.enable_cpu_mem_arena = False
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
        for name, entry in self.index.graphs[f"{graph}.onnx"].items():
            # One value per stored weight, given to every session that reads it (weights.bin holds each once).
            if entry.offset not in self.shared:
                self.shared[entry.offset] = self._value(entry)
            options.add_initializer(name, self.shared[entry.offset])
        return options

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


class OrtBackend(Backend):
    def __init__(
        self,
        build_dir: str | Path,
        manifest: Manifest,
        provider: str = "auto",
        optimization_level: Any = None,
        accuracy_level: int = 1,
    ) -> None:
        """`optimization_level`: an onnxruntime.GraphOptimizationLevel (default: ONNX Runtime's, all);
        `accuracy_level`: MatMulNBits' for quantized builds (`ACCURACY_LEVELS`)."""
        if accuracy_level not in ACCURACY_LEVELS:
            raise BackendError(f"accuracy level must be one of {ACCURACY_LEVELS}, got {accuracy_level!r}")
        ort = _import_ort()
        self.build_dir = Path(build_dir)
        self.manifest = manifest
        self.dtype = activation_dtype(manifest)
        providers, warnings = choose_providers(
            provider, ort.get_available_providers(), self.build_dir, manifest.precision == "float16"
        )
        for warning in warnings:
            log.warning(warning)
        # The CUDA provider reads each weight from one device copy that every session shares (ONNX Runtime
        # uses an added initializer in place when it already lives on the device the session plans it on);
        # TensorRT builds its engines from host copies, and the CPU shares the mapped file.
        first = providers[0] if isinstance(providers[0], str) else providers[0][0]
        device = "cuda" if first == PROVIDERS["cuda"] else "cpu"
        self._weights = SharedWeights(self.build_dir, manifest, ort, optimization_level, accuracy_level, device=device)
        self.sessions = {
            name: ort.InferenceSession(
                str(self.build_dir / manifest.graph(name).file), self._weights.options(name), providers=providers
            )
            for name in GRAPHS
        }
        used = self.sessions["decode"].get_providers()[0]
        self.name = f"onnxruntime/{used}"
        # On a GPU provider the cache lives on the device, written one token at a time; that needs
        # cuda-python (`runtime.cuda_memory`, kept in `_cuda`). Without it the host buffers still
        # work, but ONNX Runtime then copies them to the device on every step.
        self._cuda: Any = None
        self._device_type = "cuda"  # what ONNX Runtime is told the device pointers point into
        if used != PROVIDERS["cpu"]:
            try:
                from runtime import cuda_memory

                cuda_memory.load_cudart()
                self._cuda = cuda_memory
            except BackendError as e:
                log.warning("%s; the KV cache will be copied to the GPU on every decode step", e)
        self._ort = ort
        self._decode_inputs = {i.name for i in self.sessions["decode"].get_inputs()}
        self._prefill_inputs = {i.name for i in self.sessions["prefill"].get_inputs()}
        self._binding: Any = None
        self.last_run_seconds = 0.0
        self._buffers: dict[str, np.ndarray] = {}  # host cache buffers (CPU provider)
        self._new: dict[str, np.ndarray] = {}  # host step outputs (CPU provider)
        self._device: dict[str, Any] = {}  # device buffers by tensor name (GPU providers)
        self._state: DecodeState | None = None

    # -- stateless graphs -------------------------------------------------------------

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self.sessions[graph]
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feeds), strict=True))

    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        return self._run("vision", {PIXEL_VALUES: pixel_values.astype(self.dtype)})[IMAGE_FEATURES]

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self._run("embed", {INPUT_IDS: input_ids.astype(np.int64)})[INPUTS_EMBEDS]

    # -- one request --------------------------------------------------------------------

    def prefill(self, inputs_embeds: np.ndarray, image_start: int, capacity: int) -> PrefillResult:
        # The last request's cache and compacted weights go first: never two requests' worth at once.
        self._binding = None
        self._release()
        feeds = {INPUTS_EMBEDS: inputs_embeds}
        if IMAGE_START in self._prefill_inputs:
            feeds[IMAGE_START] = np.array([image_start], dtype=np.int64)
        out = self._run("prefill", feeds)
        prompt = inputs_embeds.shape[1]
        state = DecodeState.start(
            {n: v.shape[2] for n, v in out.items() if is_present(n)}, prompt, capacity - prompt, image_start
        )
        binding = self.sessions["decode"].io_binding()
        for name, value in out.items():
            if is_present(name):
                past = past_name(name)
                self._bind_cache(binding, past, value, state.capacity[past])
            elif is_request_input(name):
                self._bind_input(binding, name, np.ascontiguousarray(value))  # once per request
        if IMAGE_START in self._decode_inputs:  # a merge's key bias sits at the image slots
            self._bind_input(binding, IMAGE_START, np.array([image_start], dtype=np.int64))
        self._logits = np.empty((1, self.manifest.model.vocab_size), self.dtype)
        binding.bind_ortvalue_output(LOGITS, self._ort.OrtValue.ortvalue_from_numpy(self._logits))
        self._binding = binding
        self._state = state
        kept = out.get(KEPT_IMAGE_TOKENS)
        layers = {name: core_neurons_layer(name) for name in out}
        core = {layer: out[name].tolist() for name, layer in layers.items() if layer is not None}
        return PrefillResult(
            logits=out[LOGITS][0].astype(np.float32),
            kept_image_tokens=None if kept is None else kept.tolist(),
            core_neurons=core,
        )

    def _bind_input(self, binding: Any, name: str, value: np.ndarray) -> None:
        """A request-long input, on the host (read in place) or uploaded once to the device."""
        if self._cuda is None:
            binding.bind_cpu_input(name, value)
            return
        device = self._cuda.DeviceBuffer.from_numpy(value)
        self._device[name] = device
        binding.bind_input(name, self._device_type, 0, value.dtype, list(value.shape), device.ptr)

    def _bind_cache(self, binding: Any, key: str, present: np.ndarray, capacity: int) -> None:
        """One layer's cache buffer of `capacity` tokens holding the prompt's `present` [1, n_kv, L, hd],
        zero padded (padding is masked in the graph; zeros keep 0 * padding finite), and the step
        output that receives the new token's entries."""
        shape = (*present.shape[:2], capacity, present.shape[3])
        new_shape = (*present.shape[:2], 1, present.shape[3])
        new = new_name(key)
        if self._cuda is None:
            buffer = np.zeros(shape, present.dtype)
            buffer[:, :, : present.shape[2]] = present
            self._buffers[key] = buffer
            binding.bind_cpu_input(key, buffer)  # read in place: no copy per step
            self._new[key] = np.empty(new_shape, present.dtype)
            binding.bind_ortvalue_output(new, self._ort.OrtValue.ortvalue_from_numpy(self._new[key]))
            return
        # Device: no host copy of the cache is kept (on a Jetson host and device memory are the same).
        buffer = self._cuda.DeviceBuffer(shape, present.dtype)
        buffer.zero()
        staged = self._cuda.DeviceBuffer.from_numpy(present)
        self._cuda.write_prefix(buffer, staged)
        self._cuda.check(self._cuda.load_cudart().cudaDeviceSynchronize(), "cudaDeviceSynchronize")
        staged.free()
        step = self._cuda.DeviceBuffer(new_shape, present.dtype)
        self._device[key], self._device[new] = buffer, step
        binding.bind_input(key, self._device_type, 0, present.dtype, list(shape), buffer.ptr)
        binding.bind_output(new, self._device_type, 0, present.dtype, list(new_shape), step.ptr)

    def end_request(self) -> None:
        self._binding = None
        self._release()

    def _release(self) -> None:
        for buffer in self._device.values():
            buffer.free()
        self._device, self._buffers, self._new = {}, {}, {}
        self._state = None

    def decode(self, token_id: int) -> np.ndarray:
        if self._binding is None or self._state is None:
            raise BackendError("decode before prefill: run a prompt first")
        binding, state = self._binding, self._state
        state.check_room()
        binding.bind_cpu_input(INPUTS_EMBEDS, self.embed(np.array([[token_id]], dtype=np.int64)))
        for name, value in state.step_inputs(self._decode_inputs).items():
            binding.bind_cpu_input(name, value)
        start = time.perf_counter()
        self.sessions["decode"].run_with_iobinding(binding)
        self.last_run_seconds = time.perf_counter() - start  # the graph alone: the rest is Python overhead
        for past, new, index in state.writes():
            if self._cuda is None:
                self._buffers[past][:, :, index] = self._new[past][:, :, 0]  # the token's own entries only
            else:
                self._cuda.write_token(self._device[past], self._device[new], index)
        if self._cuda is not None:
            self._cuda.check(self._cuda.load_cudart().cudaDeviceSynchronize(), "cudaDeviceSynchronize")
        state.advance()
        return self._logits[0].astype(np.float32)
