"""Stand-ins for cuda-python and TensorRT's runtime, for the TensorRT backend's tests without a GPU.

`FakeCudart` keeps "device" memory in host buffers and bounds-checks every access against its
allocations; `fake_tensorrt` gives TensorRT 8.6 (bindings, int32 I/O) or 10.x (named tensors) engines
that run their ONNX graph in ONNX Runtime on the bound addresses.

The engines hold the optimization profiles of their plan (tests/fake_tensorrt.py's builder writes them) and
check them as TensorRT does: a context runs on one profile, which no other live context of the engine
holds (the first context gets profile 0, any other must select one); an input's shape must lie in the
active profile's range; on 8.6 each profile has its own block of bindings, and a context only takes the
indices of its profile's block.
"""

from __future__ import annotations

import ctypes
import enum
import json
import math
import types
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort


class CudaError(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2


class FakeCudart:
    cudaMemcpyKind = types.SimpleNamespace(
        cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3
    )

    def __init__(self) -> None:
        self.blocks: dict[int, Any] = {}
        self.copies_2d = 0
        self.transfers: list[tuple[str, int]] = []  # ("up" | "down", bytes) of every host <-> device copy

    def device(self, ptr: int, nbytes: int) -> None:
        assert any(a <= ptr and ptr + nbytes <= a + len(b) for a, b in self.blocks.items()), "out of bounds"

    def cudaMalloc(self, nbytes: int) -> tuple[Any, int]:
        if nbytes > 1 << 34:
            return CudaError.cudaErrorMemoryAllocation, 0
        block = ctypes.create_string_buffer(nbytes)
        self.blocks[ctypes.addressof(block)] = block
        return CudaError.cudaSuccess, ctypes.addressof(block)

    def cudaFree(self, ptr: int) -> tuple[Any]:
        return (CudaError.cudaSuccess if self.blocks.pop(ptr, None) is not None else CudaError.cudaErrorInvalidValue,)

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: int, stream: Any) -> tuple[Any]:
        if kind != 2:
            self.device(dst, nbytes)
        if kind != 1:
            self.device(src, nbytes)
        if kind in (1, 2):
            self.transfers.append(("up" if kind == 1 else "down", nbytes))
        ctypes.memmove(dst, src, nbytes)
        return (CudaError.cudaSuccess,)

    def cudaMemcpy2DAsync(
        self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, kind: int, stream: Any
    ) -> tuple[Any]:
        assert kind == 3
        if width > dpitch or width > spitch:
            return (CudaError.cudaErrorInvalidValue,)
        self.device(dst, (height - 1) * dpitch + width)
        self.device(src, (height - 1) * spitch + width)
        for row in range(height):
            ctypes.memmove(dst + row * dpitch, src + row * spitch, width)
        self.copies_2d += 1
        return (CudaError.cudaSuccess,)

    def cudaMemsetAsync(self, ptr: int, value: int, nbytes: int, stream: Any) -> tuple[Any]:
        self.device(ptr, nbytes)
        ctypes.memset(ptr, value, nbytes)
        return (CudaError.cudaSuccess,)

    def cudaStreamCreate(self) -> tuple[Any, int]:
        return CudaError.cudaSuccess, 7

    def cudaStreamSynchronize(self, stream: Any) -> tuple[Any]:
        return (CudaError.cudaSuccess,)

    cudaStreamDestroy = cudaStreamSynchronize

    def cudaDeviceSynchronize(self) -> tuple[Any]:
        return (CudaError.cudaSuccess,)


# -- fake TensorRT engines that run ONNX Runtime ----------------------------------------------------------

Shape = tuple[int, ...]


class FakeEngine:
    """One graph of the build in ONNX Runtime; TensorRT 8.6's int64 I/O comes as int32, like its parser's."""

    def __init__(self, build: Path, plan: dict[str, Any], cudart: FakeCudart, int32: bool) -> None:
        self.file, self.cudart, self.int32 = plan["file"], cudart, int32
        self.session = ort.InferenceSession(str(build / plan["file"]))  # its weights: weights.bin, loaded once
        io = [(t, True) for t in self.session.get_inputs()] + [(t, False) for t in self.session.get_outputs()]
        self.names = [t.name for t, _ in io]
        self.inputs = {t.name for t, is_input in io if is_input}
        self.ort_dtypes = {
            t.name: np.float16 if "float16" in t.type else np.int64 if "int64" in t.type else np.float32 for t, _ in io
        }
        self.shapes = {t.name: tuple(d if isinstance(d, int) else -1 for d in t.shape) for t, _ in io}
        # The plan's profiles (name -> (min, opt, max)); a static graph has TensorRT's one default profile.
        self.profiles = [{n: tuple(tuple(s) for s in r) for n, r in p.items()} for p in plan["profiles"]] or [{}]
        self.holders: dict[int, weakref.ref] = {}  # profile -> the live context on it
        self.contexts_made = 0

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)

    def dtype(self, name: str) -> Any:
        return np.int32 if self.int32 and self.ort_dtypes[name] == np.int64 else self.ort_dtypes[name]

    def held(self, profile: int, by: Any) -> bool:
        holder = self.holders.get(profile)
        return holder is not None and holder() is not None and holder() is not by

    def range(self, profile: int, name: str) -> tuple[Shape, Shape, Shape]:
        if name in self.profiles[profile]:
            return self.profiles[profile][name]
        return (self.shapes[name],) * 3  # a static input

    def create_execution_context(self) -> FakeContext:
        context = self.context_class(self)
        self.contexts_made += 1
        if not self.held(0, context):  # the first context of an engine gets profile 0
            context.select(0)
        return context

    context_class: type = None  # type: ignore[assignment]


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.profile = -1
        self.shapes: dict[str, Shape] = {}
        self.addresses: dict[str, int] = {}
        self._outputs: dict[tuple, dict[str, Shape]] = {}
        self.runs = 0

    def select(self, profile: int) -> bool:
        if not 0 <= profile < self.engine.num_optimization_profiles or self.engine.held(profile, self):
            return False
        if self.profile >= 0 and self.engine.holders.get(self.profile, lambda: None)() is self:
            del self.engine.holders[self.profile]
        self.engine.holders[profile] = weakref.ref(self)
        self.profile = profile
        # A switch drops the shapes of the dynamic inputs; the static ones are known.
        self.shapes = {n: s for n, s in self.engine.shapes.items() if n in self.engine.inputs and -1 not in s}
        return True

    def set_optimization_profile_async(self, profile: int, stream_handle: int) -> bool:
        return self.select(profile)

    @property
    def active_optimization_profile(self) -> int:
        return self.profile

    def set_shape(self, name: str, shape: Shape) -> bool:
        if self.profile < 0 or name not in self.engine.inputs:
            return False
        low, _, high = self.engine.range(self.profile, name)
        if len(shape) != len(low) or not all(a <= d <= b for a, d, b in zip(low, shape, high, strict=True)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def out_shape(self, name: str) -> Shape:
        if name in self.engine.inputs:
            return self.shapes.get(name, self.engine.shapes[name])
        assert self.engine.inputs <= self.shapes.keys(), f"{name}: not every input shape is set"
        key = tuple(sorted(self.shapes.items()))
        if key not in self._outputs:  # TensorRT infers output shapes from input shapes: run on zeros for them
            feeds = {n: np.zeros(s, self.engine.ort_dtypes[n]) for n, s in self.shapes.items()}
            out = self.engine.session.run(None, feeds)
            self._outputs[key] = {o.name: v.shape for o, v in zip(self.engine.session.get_outputs(), out, strict=True)}
        return self._outputs[key][name]

    def run(self, addresses: dict[str, int]) -> bool:
        engine, feeds = self.engine, {}
        if self.profile < 0 or engine.held(self.profile, self):
            return False
        if not engine.inputs <= self.shapes.keys():
            return False  # TensorRT: not every dynamic input's shape was set
        for name in engine.inputs:
            low, _, high = engine.range(self.profile, name)
            assert all(a <= d <= b for a, d, b in zip(low, self.shapes[name], high, strict=True)), name
            dtype, shape = np.dtype(engine.dtype(name)), self.shapes[name]
            nbytes = math.prod(shape) * dtype.itemsize
            engine.cudart.device(addresses[name], nbytes)
            host = np.frombuffer(ctypes.string_at(addresses[name], nbytes), dtype).reshape(shape)
            feeds[name] = host.astype(engine.ort_dtypes[name])
        for output, value in zip(engine.session.get_outputs(), engine.session.run(None, feeds), strict=True):
            assert value.shape == self.out_shape(output.name), output.name
            value = np.ascontiguousarray(value, engine.dtype(output.name))
            engine.cudart.device(addresses[output.name], value.nbytes)
            ctypes.memmove(addresses[output.name], value.ctypes.data, value.nbytes)
        self.runs += 1
        return True


class FakeContext86(FakeContext):
    """Bindings: the indices of the active profile's block only (those of another profile are refused)."""

    def _name(self, index: int) -> str | None:
        per = len(self.engine.names)
        return self.engine.names[index % per] if index // per == self.profile else None

    def set_binding_shape(self, index: int, shape: Shape) -> bool:
        name = self._name(index)
        return name is not None and self.set_shape(name, shape)

    def get_binding_shape(self, index: int) -> Shape:
        name = self._name(index)
        return (-1,) if name is None else self.out_shape(name)  # TensorRT: nbDims -1 for a bad index

    def execute_async_v2(self, bindings: list[int], stream_handle: int) -> bool:
        per = len(self.engine.names)
        if len(bindings) != per * self.engine.num_optimization_profiles:
            return False
        block = bindings[self.profile * per : (self.profile + 1) * per]
        return self.run(dict(zip(self.engine.names, block, strict=True)))


class FakeEngine86(FakeEngine):
    context_class = FakeContext86

    @property
    def num_bindings(self) -> int:
        return len(self.names) * self.num_optimization_profiles

    def _split(self, index: int) -> tuple[int, str]:
        profile, i = divmod(index, len(self.names))
        return profile, self.names[i]

    def get_binding_name(self, index: int) -> str:
        profile, name = self._split(index)
        return name if profile == 0 else f"{name} [profile {profile}]"

    def binding_is_input(self, index: int) -> bool:
        return self._split(index)[1] in self.inputs

    def get_binding_dtype(self, index: int) -> Any:
        return self.dtype(self._split(index)[1])

    def get_binding_shape(self, index: int) -> Shape:
        return self.shapes[self._split(index)[1]]

    def get_profile_shape(self, profile: int, binding: int | str) -> tuple[Shape, Shape, Shape]:
        if isinstance(binding, str):
            binding = self.names.index(binding)
        owner, name = self._split(binding)
        assert owner in (0, profile), f"binding {binding} belongs to profile {owner}, not {profile}"
        return self.range(profile, name)


class FakeContext10(FakeContext):
    set_input_shape = FakeContext.set_shape
    get_tensor_shape = FakeContext.out_shape

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        return self.run(self.addresses)


class FakeEngine10(FakeEngine):
    context_class = FakeContext10

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name in self.inputs else "OUTPUT"

    def get_tensor_dtype(self, name: str) -> Any:
        return self.dtype(name)

    def get_tensor_shape(self, name: str) -> Shape:
        return self.shapes[name]

    def get_tensor_profile_shape(self, name: str, profile: int) -> tuple[Shape, Shape, Shape]:
        return self.range(profile, name)


def fake_tensorrt(version: str, build: Path, cudart: FakeCudart) -> Any:
    """A `tensorrt` module whose Runtime loads the plans of tests/fake_tensorrt.py's builder; `engines` records
    every engine it loaded."""
    int32 = version.startswith("8.")
    engine_class = FakeEngine86 if int32 else FakeEngine10
    loaded: list[FakeEngine] = []

    class Runtime:
        def __init__(self, logger: Any) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> FakeEngine:
            loaded.append(engine_class(build, json.loads(data), cudart, int32))
            return loaded[-1]

    logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    modes = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    return types.SimpleNamespace(
        __version__=version, Logger=logger, Runtime=Runtime, nptype=np.dtype, TensorIOMode=modes, engines=loaded
    )
