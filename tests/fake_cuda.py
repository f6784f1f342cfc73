"""Stand-ins for cuda-python and TensorRT's runtime, for the TensorRT backend's tests without a GPU.

`FakeCudart` keeps "device" memory in host buffers and bounds-checks every access against its
allocations; `fake_tensorrt` gives TensorRT 8.6 (bindings, int32 I/O) or 10.x (named tensors) engines
that run their ONNX graph in ONNX Runtime on the bound addresses.
"""

from __future__ import annotations

import ctypes
import enum
import math
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from buildformat import Manifest
from export.engine import profiles_from_manifest


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


class FakeEngine:
    """One graph of the build in ONNX Runtime; TensorRT 8.6's int64 I/O comes as int32, like its parser's."""

    def __init__(self, build: Path, manifest: Manifest, graph: str, cudart: FakeCudart, int32: bool) -> None:
        self.graph, self.cudart, self.int32 = graph, cudart, int32
        self.session = ort.InferenceSession(str(build / manifest.graphs[graph].file))
        self.profiles = profiles_from_manifest(manifest, graph)
        io = [(t, True) for t in self.session.get_inputs()] + [(t, False) for t in self.session.get_outputs()]
        self.names = [t.name for t, _ in io]
        self.inputs = {t.name for t, is_input in io if is_input}
        self.ort_dtypes = {
            t.name: np.float16 if "float16" in t.type else np.int64 if "int64" in t.type else np.float32 for t, _ in io
        }
        self.shapes = {t.name: tuple(d if isinstance(d, int) else -1 for d in t.shape) for t, _ in io}

    def dtype(self, name: str) -> Any:
        return np.int32 if self.int32 and self.ort_dtypes[name] == np.int64 else self.ort_dtypes[name]

    def create_execution_context(self) -> FakeContext:
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.shapes = {n: s for n, s in engine.shapes.items() if n in engine.inputs and -1 not in s}
        self.addresses: dict[str, int] = {}
        self._outputs: dict[tuple, dict[str, tuple[int, ...]]] = {}

    def set_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        low, _, high = self.engine.profiles[name]
        if len(shape) != len(low) or not all(a <= d <= b for a, d, b in zip(low, shape, high, strict=True)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def out_shape(self, name: str) -> tuple[int, ...]:
        if name in self.engine.inputs:
            return self.shapes[name]
        key = tuple(sorted(self.shapes.items()))
        if key not in self._outputs:  # TensorRT infers output shapes from input shapes: run on zeros for them
            feeds = {n: np.zeros(s, self.engine.ort_dtypes[n]) for n, s in self.shapes.items()}
            out = self.engine.session.run(None, feeds)
            self._outputs[key] = {o.name: v.shape for o, v in zip(self.engine.session.get_outputs(), out, strict=True)}
        return self._outputs[key][name]

    def run(self, addresses: dict[str, int]) -> bool:
        engine, feeds = self.engine, {}
        for name in engine.inputs:
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
        return True


class FakeEngine86(FakeEngine):
    @property
    def num_bindings(self) -> int:
        return len(self.names)

    def get_binding_name(self, i: int) -> str:
        return self.names[i]

    def binding_is_input(self, i: int) -> bool:
        return self.names[i] in self.inputs

    def get_binding_dtype(self, i: int) -> Any:
        return self.dtype(self.names[i])

    def get_binding_shape(self, i: int) -> tuple[int, ...]:
        return self.shapes[self.names[i]]

    def create_execution_context(self) -> FakeContext86:
        return FakeContext86(self)


class FakeContext86(FakeContext):
    def set_binding_shape(self, i: int, shape: tuple[int, ...]) -> bool:
        return self.set_shape(self.engine.names[i], shape)

    def get_binding_shape(self, i: int) -> tuple[int, ...]:
        return self.out_shape(self.engine.names[i])

    def execute_async_v2(self, bindings: list[int], stream_handle: int) -> bool:
        return self.run(dict(zip(self.engine.names, bindings, strict=True)))


class FakeEngine10(FakeEngine):
    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name in self.inputs else "OUTPUT"

    def get_tensor_dtype(self, name: str) -> Any:
        return self.dtype(name)

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def create_execution_context(self) -> FakeContext10:
        return FakeContext10(self)


class FakeContext10(FakeContext):
    set_input_shape = FakeContext.set_shape
    get_tensor_shape = FakeContext.out_shape

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        return self.run(self.addresses)


def fake_tensorrt(version: str, build: Path, manifest: Manifest, cudart: FakeCudart) -> Any:
    int32 = version.startswith("8.")
    engine_class = FakeEngine86 if int32 else FakeEngine10

    class Runtime:
        def __init__(self, logger: Any) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> FakeEngine:
            return engine_class(build, manifest, data.decode(), cudart, int32)

    logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    modes = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    return types.SimpleNamespace(
        __version__=version, Logger=logger, Runtime=Runtime, nptype=np.dtype, TensorIOMode=modes
    )
