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
    is_present,
    new_name,
    past_name,
    present_name,
)
from runtime.backend import Backend, BackendError, PrefillResult, activation_dtype
from runtime.decode_state import DecodeState
from runtime.ort_sessions import ACCURACY_LEVELS, PROVIDERS, SharedWeights, _import_ort, choose_providers

log = logging.getLogger(__name__)


class OrtBackend(Backend):
    def __init__(
        self,
        build_dir: str | Path,
        manifest: Manifest,
        provider: str = "auto",
        optimization_level: Any = None,
        accuracy_level: int = 1,
        fused: bool = True,
    ) -> None:
        """`optimization_level`: an onnxruntime.GraphOptimizationLevel (default: ONNX Runtime's, all);
        `accuracy_level`: MatMulNBits' for quantized builds (`ACCURACY_LEVELS`); `fused`: on the CPU provider,
        run the stacks' ONNX Runtime form where the build has one (False: the portable form, as TensorRT)."""
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
        # The fused form's GroupQueryAttention writes the cache in place on the host (CPU provider).
        self.fused = fused and first == PROVIDERS["cpu"] and bool(manifest.fused)
        self.graphs = {name: manifest.graph(name, fused=self.fused) for name in manifest.graph_names}
        self.sessions = {
            name: ort.InferenceSession(
                str(self.build_dir / graph.file), self._weights.options(graph.file), providers=providers
            )
            for name, graph in self.graphs.items()
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
        """Runs `graph` on numpy arrays or OrtValues; -> every output, an OrtValue where the session runs. A
        fused stack's present.* outputs are its past buffers' own memory (`_bind_present`)."""
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
            if is_present(name):
                self._bind_present(binding, name)
            else:
                binding.bind_output(name, self._where)
        session.run_with_iobinding(binding)
        return dict(zip(names, binding.get_outputs(), strict=True))

    def _bind_present(self, binding: Any, present: str) -> None:
        """A fused stack writes the new entries into the past buffer itself: its output is bound to the
        buffer's memory (GroupQueryAttention then writes only the new tokens' entries)."""
        buffer = self._buffers[past_name(present)]
        binding.bind_output(present, "cpu", 0, buffer.dtype, list(buffer.shape), buffer.ctypes.data)

    def _fused_buffers(self, stack: str, capacity: int) -> dict[str, np.ndarray]:
        """A fused stack's cache buffers of `capacity` positions, made before its prefill (which fills them in
        place). Zeroed lazily by the OS: only the written pages are touched."""
        m = self.manifest.model
        shape = (1, m.num_kv_heads, capacity, m.head_dim)
        for past in self._pasts[stack]:
            self._buffers[past] = np.zeros(shape, self.dtype)
        return {past: self._buffers[past] for past in self._pasts[stack]}

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
        answer = capacity - prompt
        ids = {INPUT_IDS: input_ids.astype(np.int64), POSITION_IDS: np.arange(prompt, dtype=np.int64)}
        out = self._run(first, request | ids | self._pasts_for(first, prompt + answer))
        new_lengths = dict.fromkeys((present_name(p) for p in self._pasts[first] if self.fused), prompt)
        if SELECT in self.sessions:
            out |= self._run(SELECT, out | {IMAGE_START: start})
            kept = {HIDDEN: out[KEPT_HIDDEN], POSITION_IDS: out[KEPT_POSITIONS]}
            kept_length = out[KEPT_HIDDEN].shape()[1]
            out |= self._run(UPPER, request | out | kept | self._pasts_for(UPPER, kept_length + answer))
            new_lengths |= dict.fromkeys((present_name(p) for p in self._pasts[UPPER] if self.fused), kept_length)
        if NEURONS in self.sessions:
            out |= self._run(NEURONS, request | out)
        new_lengths |= {name: value.shape()[2] for name, value in out.items() if is_new(name)}
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

    def _pasts_for(self, stack: str, capacity: int) -> dict[str, Any]:
        """A stack's past inputs in prefill: its cache buffers (fused form), or one masked slot each."""
        return self._fused_buffers(stack, capacity) if self.fused else self._masked_pasts(stack)

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
                if self.fused:  # filled in place by the prefill: the step reads and writes the same buffer
                    binding.bind_cpu_input(past, self._buffers[past])
                    self._bind_present(binding, present_name(past))
                else:
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
                elif not is_new(name) and not is_present(name):  # activations for the prefill-only graphs
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
        for past, new, index in () if self.fused else state.writes():  # a fused stack wrote its own
            if self._cuda is None:
                self._buffers[past][:, :, index] = self._new[past][:, :, 0]  # the token's own entries only
            else:
                self._cuda.write_token(self._device[past], self._device[new], index)
        if self._cuda is not None:
            self._cuda.check(self._cuda.load_cudart().cudaDeviceSynchronize(), "cudaDeviceSynchronize")
        state.advance()
        return self._logits[0].astype(np.float32)
