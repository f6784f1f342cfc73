"""TensorRT's two API generations (torch-free, and `tensorrt` is never imported here).

Which one a TensorRT version has (`tensorrt_version`, read by the backend and by `python -m export engine`, which
records it in the manifest's `engines.api`): 8.6 ("bindings": one pointer list indexed by binding,
execute_async_v2) and 10.x and later ("named-tensors": one address per tensor name, execute_async_v3). 9.x
shipped only as TensorRT-LLM previews, between the two, and is refused.

`EngineIO` is one execution context of an engine behind one interface, by tensor name, whichever the generation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.backend import BackendError

BINDINGS, NAMED_TENSORS = "bindings", "named-tensors"
SUPPORTED = "8.6 is the minimum (8.6 for Pascal GPUs, 10.x for SM 7.5 and later)"


class UnsupportedTensorRT(BackendError):
    """A TensorRT version that neither API generation covers, or that cannot be read."""


@dataclass(frozen=True)
class TrtVersion:
    text: str  # tensorrt.__version__, as the manifest records it
    major: int
    minor: int

    @property
    def api(self) -> str:
        return BINDINGS if self.major == 8 else NAMED_TENSORS


def tensorrt_version(trt: Any) -> TrtVersion:
    """The version of an imported `tensorrt` module, from its `__version__`; raises UnsupportedTensorRT for one
    that is not 8.6 or 10.x and later."""
    text = str(getattr(trt, "__version__", ""))
    match = re.match(r"(\d+)\.(\d+)", text)
    if not match:
        raise UnsupportedTensorRT(f"cannot read TensorRT's version ({text!r}): {SUPPORTED}")
    version = TrtVersion(text, int(match[1]), int(match[2]))
    if (version.major, version.minor) < (8, 6):
        raise UnsupportedTensorRT(f"TensorRT {text} is too old: {SUPPORTED}")
    if version.major == 9:
        raise UnsupportedTensorRT(f"TensorRT {text} is not supported (a TensorRT-LLM preview): use 8.6 or 10.x")
    return version


class EngineIO:
    """One execution context of an engine: shapes, addresses and launches by tensor name."""

    api = ""

    def __init__(self, trt: Any, engine: Any, graph: str) -> None:
        self.trt, self.engine, self.graph = trt, engine, graph
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"TensorRT could not create an execution context for {graph} (out of GPU memory?)")
        names = self._names()
        self._slot = {name: i for i, name in enumerate(names)}
        self.inputs = [n for n in names if self._is_input(n)]
        self.outputs = [n for n in names if n not in self.inputs]
        shape_inputs = [n for n in self.inputs if self._is_shape_tensor(n)]
        if shape_inputs:  # they would need host memory, which this backend never binds
            raise BackendError(f"the {graph} engine takes shape tensor(s) {', '.join(shape_inputs)}: unsupported")

    def is_dynamic(self, name: str) -> bool:
        return any(d < 0 for d in self.engine_shape(name))

    def _fail(self, what: str) -> BackendError:
        return BackendError(f"TensorRT refused {what} for the {self.graph} engine")

    # Per API:
    def _names(self) -> list[str]:
        raise NotImplementedError

    def _is_input(self, name: str) -> bool:
        raise NotImplementedError

    def _is_shape_tensor(self, name: str) -> bool:
        raise NotImplementedError

    def dtype(self, name: str) -> np.dtype:
        raise NotImplementedError

    def engine_shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        raise NotImplementedError

    def output_shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def bind(self, name: str, ptr: int) -> None:
        raise NotImplementedError

    def execute(self, stream_handle: int) -> None:
        raise NotImplementedError


class BindingsIO(EngineIO):
    """TensorRT 8.6: bindings by index; execute_async_v2 takes the list of every binding's address."""

    api = BINDINGS

    def __init__(self, trt: Any, engine: Any, graph: str) -> None:
        super().__init__(trt, engine, graph)
        self._addresses = [0] * engine.num_bindings

    def _names(self) -> list[str]:
        return [self.engine.get_binding_name(i) for i in range(self.engine.num_bindings)]

    def _is_input(self, name: str) -> bool:
        return bool(self.engine.binding_is_input(self._slot[name]))

    def _is_shape_tensor(self, name: str) -> bool:
        return bool(getattr(self.engine, "is_shape_binding", lambda i: False)(self._slot[name]))

    def dtype(self, name: str) -> np.dtype:
        # 8.6 has no INT64 I/O: the ONNX parser makes int64 inputs and outputs INT32.
        return np.dtype(self.trt.nptype(self.engine.get_binding_dtype(self._slot[name])))

    def engine_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.engine.get_binding_shape(self._slot[name]))

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self.context.set_binding_shape(self._slot[name], tuple(shape)):
            raise self._fail(f"{name} of shape {tuple(shape)} (outside its optimization profile?)")

    def output_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.context.get_binding_shape(self._slot[name]))

    def bind(self, name: str, ptr: int) -> None:
        self._addresses[self._slot[name]] = ptr

    def execute(self, stream_handle: int) -> None:
        if not self.context.execute_async_v2(self._addresses, stream_handle):
            raise self._fail("execute_async_v2")


class NamedTensorsIO(EngineIO):
    """TensorRT 10.x: I/O tensors by name; the context keeps each address until it is set again."""

    api = NAMED_TENSORS

    def _names(self) -> list[str]:
        return [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def _is_input(self, name: str) -> bool:
        return bool(self.engine.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT)

    def _is_shape_tensor(self, name: str) -> bool:
        return bool(getattr(self.engine, "is_shape_inference_io", lambda n: False)(name))

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))

    def engine_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.engine.get_tensor_shape(name))

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(name, tuple(shape)):
            raise self._fail(f"{name} of shape {tuple(shape)} (outside its optimization profile?)")

    def output_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.context.get_tensor_shape(name))

    def bind(self, name: str, ptr: int) -> None:
        if not self.context.set_tensor_address(name, ptr):
            raise self._fail(f"the address of {name}")

    def execute(self, stream_handle: int) -> None:
        if not self.context.execute_async_v3(stream_handle):
            raise self._fail("execute_async_v3")


def select_api(trt: Any) -> type[EngineIO]:
    """BindingsIO for TensorRT 8.6, NamedTensorsIO for 10.x and later."""
    return BindingsIO if tensorrt_version(trt).api == BINDINGS else NamedTensorsIO
