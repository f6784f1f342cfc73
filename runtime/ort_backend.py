"""The ONNX Runtime backend: TensorRT, CUDA or CPU execution provider (torch-free).

One session per graph, so each weight (in exactly one graph) is held once, and a quantized one is
pre-packed once. Every graph runs with IO binding: the image features, the stacks' hidden states
and a request's compacted FFN weights are OrtValues where the session runs (the host on the CPU
provider, the device on a GPU one) and go from one graph to the next without a copy.

Per request the cache is one zero-padded buffer per layer, sized once for the prompt and the
longest answer. In prefill the stacks run the prompt against one-slot past buffers (past_length 0)
and their `new.{i}.*` outputs fill the cache buffers; the decode bindings are made once, to those
buffers, the image features and the compacted weights, and every step rebinds only the token and
its positions, and writes the token's own cache entries into the buffers.

On the CPU provider the bound buffers are the numpy arrays themselves (ONNX Runtime reads them in
place), so a step moves no cache bytes. On a GPU provider the cache buffers live on the device
(`runtime.cuda_memory`, cuda-python) and are bound by device pointer; a step moves the token id,
two integers and the logits across the bus, and writes the token's cache entries with one strided
device copy per tensor. (The GPU path has not run here: the development machine has no GPU.)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from buildformat import Manifest
from buildformat.names import (
    HIDDEN,
    IMAGE_FEATURES,
    IMAGE_START,
    INPUT_IDS,
    KEPT_BIAS,
    KEPT_HIDDEN,
    KEPT_IMAGE_TOKENS,
    KEPT_POSITIONS,
    LOGITS,
    NEURONS,
    PAST_LENGTH,
    PIXEL_VALUES,
    POSITION_IDS,
    SELECT,
    STACKS,
    UPPER,
    VISION_GRAPH,
    compact_name,
    core_neurons_layer,
    is_ffn,
    is_new,
    is_past,
    new_name,
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

    def options(self, graph: str) -> Any:
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
        for name, entry in self.index.graphs[f"{graph}.onnx"].items():
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
        # The CUDA provider reads each weight from one device copy (ONNX Runtime uses an added initializer in
        # place when it already lives on the device the session plans it on); TensorRT builds its engines from
        # host copies, and the CPU shares the mapped file.
        first = providers[0] if isinstance(providers[0], str) else providers[0][0]
        device = "cuda" if first == PROVIDERS["cuda"] else "cpu"
        self._weights = SharedWeights(self.build_dir, manifest, ort, optimization_level, accuracy_level, device=device)
        self.sessions = {
            name: ort.InferenceSession(
                str(self.build_dir / manifest.graph(name).file), self._weights.options(name), providers=providers
            )
            for name in manifest.graph_names
        }
        self.stacks = [name for name in manifest.graph_names if name in STACKS]  # decoder, or lower and upper
        used = self.sessions[self.stacks[-1]].get_providers()[0]
        self.name = f"onnxruntime/{used}"
        # On a GPU provider the cache lives on the device, written one token at a time; that needs
        # cuda-python (`runtime.cuda_memory`, kept in `_cuda`). Without it the host buffers still
        # work, but ONNX Runtime then copies them to the device on every step.
        self._cuda: Any = None
        self._device_type = "cuda"  # what ONNX Runtime is told the cache's device pointers point into
        self._where = "cpu"  # where the OrtValues passed between graphs live
        if used != PROVIDERS["cpu"]:
            self._where = "cuda"
            try:
                from runtime import cuda_memory

                cuda_memory.load_cudart()
                self._cuda = cuda_memory
            except BackendError as e:
                log.warning("%s; the KV cache will be copied to the GPU on every decode step", e)
        self._ort = ort
        self._inputs = {name: [i.name for i in s.get_inputs()] for name, s in self.sessions.items()}
        self._pasts = {stack: [n for n in self._inputs[stack] if is_past(n)] for stack in self.stacks}
        self._full = self._weights.bound()  # the bound FFN weights, held once
        self._one_slot: dict[tuple[Any, ...], Any] = {}  # the prefill's masked past buffers, by shape
        self._features: Any = None
        self._bindings: dict[str, Any] = {}
        self._steps: dict[str, dict[str, np.ndarray]] = {}  # each stack's bound step inputs
        self.last_run_seconds = 0.0
        self._request: list[Any] = []  # what a request holds: cache buffers, step outputs, compacted weights
        self._buffers: dict[str, np.ndarray] = {}  # host cache buffers (CPU provider)
        self._new: dict[str, np.ndarray] = {}  # host step outputs (CPU provider)
        self._device: dict[str, Any] = {}  # device buffers by tensor name (GPU providers)
        self._state: DecodeState | None = None

    # -- running one graph --------------------------------------------------------------

    def _run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        """Runs `graph` on numpy arrays or OrtValues; -> every output, an OrtValue where the session runs."""
        session = self.sessions[graph]
        binding = session.io_binding()
        for name in self._inputs[graph]:
            value = feeds[name]
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        names = [o.name for o in session.get_outputs()]
        for name in names:
            binding.bind_output(name, self._where)
        session.run_with_iobinding(binding)
        return dict(zip(names, binding.get_outputs(), strict=True))

    def vision(self, pixel_values: np.ndarray) -> None:
        self._features = self._run(VISION_GRAPH, {PIXEL_VALUES: pixel_values.astype(self.dtype)})[IMAGE_FEATURES]

    def image_features(self) -> np.ndarray:
        if self._features is None:
            raise BackendError("no image yet: run vision first")
        return self._features.numpy()

    # -- one request --------------------------------------------------------------------

    def prefill(self, input_ids: np.ndarray, image_start: int, capacity: int) -> PrefillResult:
        if self._features is None:
            raise BackendError("prefill before vision: run the image first")
        # The last request's cache and compacted weights go first: never two requests' worth at once.
        self._release()
        prompt = input_ids.shape[1]
        start, zero = np.array([image_start], dtype=np.int64), np.array([0], dtype=np.int64)
        request = {IMAGE_FEATURES: self._features, IMAGE_START: start, PAST_LENGTH: zero, **self._full}
        first = self.stacks[0]
        ids = {INPUT_IDS: input_ids.astype(np.int64), POSITION_IDS: np.arange(prompt, dtype=np.int64)}
        out = self._run(first, request | ids | self._masked_pasts(first))
        if SELECT in self.sessions:
            out |= self._run(SELECT, out | {IMAGE_START: start})
            kept = {HIDDEN: out[KEPT_HIDDEN], POSITION_IDS: out[KEPT_POSITIONS]}
            out |= self._run(UPPER, request | out | kept | self._masked_pasts(UPPER))
        if NEURONS in self.sessions:
            out |= self._run(NEURONS, request | out)
        new_lengths = {name: value.shape()[2] for name, value in out.items() if is_new(name)}
        state = DecodeState.start(new_lengths, prompt, capacity - prompt, image_start)
        self._bind_decode(out, state, start)
        self._state = state
        kept_tokens = out.get(KEPT_IMAGE_TOKENS)
        layers = {name: core_neurons_layer(name) for name in out}
        return PrefillResult(
            logits=out[LOGITS].numpy()[0].astype(np.float32),
            kept_image_tokens=None if kept_tokens is None else kept_tokens.numpy().tolist(),
            core_neurons={layer: out[name].numpy().tolist() for name, layer in layers.items() if layer is not None},
        )

    def _masked_pasts(self, stack: str) -> dict[str, Any]:
        """One-slot zero buffers for a stack's past inputs: a prefill has no cached tokens (past_length 0
        masks the slot), and one slot keeps every shape non-empty (TensorRT profiles start at 1)."""
        m = self.manifest.model
        shape = (1, m.num_kv_heads, 1, m.head_dim)
        if shape not in self._one_slot:
            zeros = np.zeros(shape, self.dtype)
            where = ("cuda", 0) if self._where == "cuda" else ()
            self._one_slot[shape] = self._ort.OrtValue.ortvalue_from_numpy(zeros, *where)
        return dict.fromkeys(self._pasts[stack], self._one_slot[shape])

    def _bind_decode(self, out: dict[str, Any], state: DecodeState, start: np.ndarray) -> None:
        """The decode bindings, made once per request: the cache buffers filled with the prompt's entries, the
        image features, a merge's kept bias, the compacted FFN weights; the step's outputs."""
        m = self.manifest.model
        hidden = None
        if len(self.stacks) > 1:  # lower's hidden state is upper's input, where both run
            hidden = self._ort.OrtValue.ortvalue_from_shape_and_type((1, 1, m.hidden_size), self.dtype, self._where, 0)
            self._request.append(hidden)
        self._logits = np.empty((1, m.vocab_size), self.dtype)
        for stack in self.stacks:
            binding = self.sessions[stack].io_binding()
            for past in self._pasts[stack]:
                self._bind_cache(binding, past, out[new_name(past)], state.capacity[past])
            for name in self._inputs[stack]:
                if name == IMAGE_FEATURES:
                    binding.bind_ortvalue_input(name, self._features)
                elif name == IMAGE_START:
                    binding.bind_cpu_input(name, start)
                elif name == KEPT_BIAS:
                    binding.bind_ortvalue_input(name, out[KEPT_BIAS])
                elif is_ffn(name):  # the request's compacted weight, where the full one was bound in prefill
                    compact = out[compact_name(name)]
                    self._request.append(compact)
                    binding.bind_ortvalue_input(name, compact)
                elif name == HIDDEN:
                    binding.bind_ortvalue_input(name, hidden)
            for name in (o.name for o in self.sessions[stack].get_outputs()):
                if name == HIDDEN:
                    binding.bind_ortvalue_output(name, hidden)
                elif name == LOGITS:
                    binding.bind_ortvalue_output(name, self._ort.OrtValue.ortvalue_from_numpy(self._logits))
                elif not is_new(name):  # activations the prefill-only graphs read: unused in decode
                    binding.bind_output(name, self._where)
            # The step's ids and positions: bound once, written in place every step (ONNX Runtime reads a
            # bound host array where it lies), so a step makes no binding calls.
            steps = state.step_inputs(0, self._pasts[stack], self._inputs[stack])
            for name, value in steps.items():
                binding.bind_cpu_input(name, value)
            self._steps[stack] = steps
            self._bindings[stack] = binding

    def _bind_cache(self, binding: Any, key: str, present: Any, capacity: int) -> None:
        """One layer's cache buffer of `capacity` tokens holding the prompt's entries `present` [1, n_kv, L,
        hd] (an OrtValue), zero padded (padding is masked in the graph; zeros keep 0 * padding finite), and
        the step output that receives the new token's entries."""
        n_kv, length, head_dim = present.shape()[1], present.shape()[2], present.shape()[3]
        shape, new_shape = (1, n_kv, capacity, head_dim), (1, n_kv, 1, head_dim)
        new = new_name(key)
        if self._cuda is None:
            buffer = np.zeros(shape, self.dtype)
            buffer[:, :, :length] = present.numpy()
            self._buffers[key] = buffer
            binding.bind_cpu_input(key, buffer)  # read in place: no copy per step
            self._new[key] = np.empty(new_shape, self.dtype)
            binding.bind_ortvalue_output(new, self._ort.OrtValue.ortvalue_from_numpy(self._new[key]))
            return
        # Device: the prompt's entries are copied on the device (no host copy of the cache is kept).
        cuda = self._cuda
        buffer = cuda.DeviceBuffer(shape, self.dtype)
        buffer.zero()
        if self._where == "cuda":  # the stack wrote the entries on the device: copy them there
            itemsize = np.dtype(self.dtype).itemsize
            plan = cuda.prefix_copy(n_kv, capacity, length, head_dim, itemsize)
            cuda.memcpy2d(buffer.ptr, present.data_ptr(), plan)
        else:
            staged = cuda.DeviceBuffer.from_numpy(present.numpy())
            cuda.write_prefix(buffer, staged)
            cuda.check(cuda.load_cudart().cudaDeviceSynchronize(), "cudaDeviceSynchronize")
            staged.free()
        cuda.check(cuda.load_cudart().cudaDeviceSynchronize(), "cudaDeviceSynchronize")
        step = cuda.DeviceBuffer(new_shape, self.dtype)
        self._device[key], self._device[new] = buffer, step
        binding.bind_input(key, self._device_type, 0, self.dtype, list(shape), buffer.ptr)
        binding.bind_output(new, self._device_type, 0, self.dtype, list(new_shape), step.ptr)

    def end_request(self) -> None:
        self._release()
        self._features = None  # the image's too: an idle pipeline holds only its weights

    def _release(self) -> None:
        self._bindings, self._steps = {}, {}
        for buffer in self._device.values():
            buffer.free()
        self._device, self._buffers, self._new, self._request = {}, {}, {}, []
        self._state = None

    def decode(self, token_id: int) -> np.ndarray:
        if not self._bindings or self._state is None:
            raise BackendError("decode before prefill: run a prompt first")
        state = self._state
        state.check_room()
        for stack in self.stacks:
            for name, value in state.step_inputs(token_id, self._pasts[stack], self._inputs[stack]).items():
                self._steps[stack][name][...] = value
        start = time.perf_counter()
        for stack in self.stacks:
            self.sessions[stack].run_with_iobinding(self._bindings[stack])
        self.last_run_seconds = time.perf_counter() - start  # the graphs alone: the rest is Python overhead
        for past, new, index in state.writes():
            if self._cuda is None:
                self._buffers[past][:, :, index] = self._new[past][:, :, 0]  # the token's own entries only
            else:
                self._cuda.write_token(self._device[past], self._device[new], index)
        if self._cuda is not None:
            self._cuda.check(self._cuda.load_cudart().cudaDeviceSynchronize(), "cudaDeviceSynchronize")
        state.advance()
        return self._logits[0].astype(np.float32)
