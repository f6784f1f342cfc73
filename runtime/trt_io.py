"""TensorRT's two API generations (torch-free, and `tensorrt` is never imported here).

Which one a TensorRT version has (`tensorrt_version`, read by the backend and by `python -m export engine`, which
records it in the manifest's `engines.api`): 8.6 ("bindings": one pointer list indexed by binding,
execute_async_v2) and 10.x and later ("named-tensors": one address per tensor name, execute_async_v3). 9.x
shipped only as TensorRT-LLM previews, between the two, and is refused.

`EngineIO` is one execution context of an engine, bound to one of its optimization profiles, behind one
interface by tensor name whichever the generation. The decoder stacks' engines have two profiles (prefill,
decode: docs/tensorrt.md); the backend makes one context per profile from the same engine, so the weights,
which the engine holds, are held once. Each context selects its profile once, when it is made: TensorRT lets
a profile be in use by one live context of an engine at a time, and gives the first context profile 0.

How a profile shows in each generation:
- 8.6: every profile has its own block of bindings, `num_bindings // num_optimization_profiles` of them; the
  bindings of profile p are those of profile 0 offset by p * that count (their names end in " [profile p]").
  set_binding_shape/get_binding_shape take the offset index, and execute_async_v2 the whole list of
  num_bindings addresses, of which only the active profile's block is read.
- 10.x: tensors keep their names in every profile; the context's active profile decides which ranges apply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.backend import BackendError

BINDINGS, NAMED_TENSORS = "bindings", "named-tensors"
SUPPORTED = "8.6 is the minimum (8.6 for Pascal GPUs, 10.x for SM 7.5 and later)"

Shape = tuple[int, ...]


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
    """One execution context of an engine, on optimization profile `profile`: shapes, addresses and launches by
    tensor name. `stream_handle` is where the profile switch is enqueued (the caller's launch stream)."""

    api = ""

    def __init__(self, trt: Any, engine: Any, graph: str, profile: int = 0, stream_handle: int = 0) -> None:
        self.trt, self.engine, self.graph, self.profile = trt, engine, graph, profile
        profiles = int(getattr(engine, "num_optimization_profiles", 1))
        if not 0 <= profile < max(profiles, 1):
            raise BackendError(
                f"the {graph} engine has {profiles} optimization profile(s), not {profile + 1}: rebuild the engines "
                "with `python -m export engine BUILD --force`"
            )
        self.num_profiles = profiles
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"TensorRT could not create an execution context for {graph} (out of GPU memory?)")
        # TensorRT gives the first context of an engine profile 0; any other must select one no live context holds.
        if profiles > 1 and not self.context.set_optimization_profile_async(profile, stream_handle):
            raise self._fail(f"optimization profile {profile} (is another context on it?)")
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
        return BackendError(f"TensorRT refused {what} for the {self.graph} engine (profile {self.profile})")

    # Per API:
    def _names(self) -> list[str]:
        raise NotImplementedError

    def _is_input(self, name: str) -> bool:
        raise NotImplementedError

    def _is_shape_tensor(self, name: str) -> bool:
        raise NotImplementedError

    def dtype(self, name: str) -> np.dtype:
        raise NotImplementedError

    def engine_shape(self, name: str) -> Shape:
        """The shape the engine declares, -1 on dynamic axes."""
        raise NotImplementedError

    def profile_shape(self, name: str) -> tuple[Shape, Shape, Shape]:
        """(min, opt, max) of a dynamic input in this context's profile."""
        raise NotImplementedError

    def set_input_shape(self, name: str, shape: Shape) -> None:
        raise NotImplementedError

    def output_shape(self, name: str) -> Shape:
        raise NotImplementedError

    def bind(self, name: str, ptr: int) -> None:
        raise NotImplementedError

    def execute(self, stream_handle: int) -> None:
        raise NotImplementedError


class BindingsIO(EngineIO):
    """TensorRT 8.6: bindings by index, a block of them per profile; execute_async_v2 takes every binding's
    address (all profiles' blocks: only the active one is read)."""

    api = BINDINGS

    def __init__(self, trt: Any, engine: Any, graph: str, profile: int = 0, stream_handle: int = 0) -> None:
        total = engine.num_bindings
        profiles = max(int(getattr(engine, "num_optimization_profiles", 1)), 1)
        if total % profiles:
            raise BackendError(f"the {graph} engine has {total} bindings for {profiles} profiles; rebuild the engines")
        self._per_profile = total // profiles
        self._offset = profile * self._per_profile  # profile p's bindings are profile 0's, offset by this
        super().__init__(trt, engine, graph, profile, stream_handle)
        self._addresses = [0] * total

    def _names(self) -> list[str]:
        return [self.engine.get_binding_name(i) for i in range(self._per_profile)]

    def _index(self, name: str) -> int:
        """The binding of `name` in this context's profile."""
        return self._offset + self._slot[name]

    def _is_input(self, name: str) -> bool:
        return bool(self.engine.binding_is_input(self._slot[name]))

    def _is_shape_tensor(self, name: str) -> bool:
        return bool(getattr(self.engine, "is_shape_binding", lambda i: False)(self._slot[name]))

    def dtype(self, name: str) -> np.dtype:
        # 8.6 has no INT64 I/O: the ONNX parser makes int64 inputs and outputs INT32.
        return np.dtype(self.trt.nptype(self.engine.get_binding_dtype(self._slot[name])))

    def engine_shape(self, name: str) -> Shape:
        return tuple(self.engine.get_binding_shape(self._slot[name]))

    def profile_shape(self, name: str) -> tuple[Shape, Shape, Shape]:
        low, opt, high = self.engine.get_profile_shape(self.profile, self._index(name))
        return tuple(low), tuple(opt), tuple(high)

    def set_input_shape(self, name: str, shape: Shape) -> None:
        if not self.context.set_binding_shape(self._index(name), tuple(shape)):
            raise self._fail(f"{name} of shape {tuple(shape)} (outside its optimization profile?)")

    def output_shape(self, name: str) -> Shape:
        return tuple(self.context.get_binding_shape(self._index(name)))

    def bind(self, name: str, ptr: int) -> None:
        self._addresses[self._index(name)] = ptr

    def execute(self, stream_handle: int) -> None:
        if not self.context.execute_async_v2(self._addresses, stream_handle):
            raise self._fail("execute_async_v2")


class NamedTensorsIO(EngineIO):
    """TensorRT 10.x: I/O tensors by name in every profile; the context keeps each address until it is set again."""

    api = NAMED_TENSORS

    def _names(self) -> list[str]:
        return [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def _is_input(self, name: str) -> bool:
        return bool(self.engine.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT)

    def _is_shape_tensor(self, name: str) -> bool:
        return bool(getattr(self.engine, "is_shape_inference_io", lambda n: False)(name))

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))

    def engine_shape(self, name: str) -> Shape:
        return tuple(self.engine.get_tensor_shape(name))

    def profile_shape(self, name: str) -> tuple[Shape, Shape, Shape]:
        low, opt, high = self.engine.get_tensor_profile_shape(name, self.profile)
        return tuple(low), tuple(opt), tuple(high)

    def set_input_shape(self, name: str, shape: Shape) -> None:
        if not self.context.set_input_shape(name, tuple(shape)):
            raise self._fail(f"{name} of shape {tuple(shape)} (outside its optimization profile?)")

    def output_shape(self, name: str) -> Shape:
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
