"""Device memory for the TensorRT backend, over cuda-python's runtime API (no torch, no pycuda).

cuda-python is imported on first use, not with this module: `cuda.bindings.runtime` (cuda-python 12.6 and
later, 13.x) or the older `cuda.cudart`. Every call's return code is checked; a failure raises BackendError
naming the CUDA error.

The KV cache of a request is one buffer per layer, [1, n_kv, B, hd], zero padded. A decode step writes
only its own token's entries, [1, n_kv, 1, hd], at position `index` of axis 2: that is n_kv rows of
hd * itemsize bytes, B * hd * itemsize bytes apart in the buffer, so one cudaMemcpy2DAsync moves them
(`write_token`). The prefill's cache [1, n_kv, L, hd] lands in the first L positions the same way
(`write_prefix`). The geometry of both copies is plain arithmetic (`token_copy`, `prefix_copy`),
testable without a GPU.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.backend import BackendError

_CUDART: Any = None  # the loaded runtime module; tests put a fake here


def load_cudart() -> Any:
    """cuda-python's runtime API module, imported once."""
    global _CUDART
    if _CUDART is None:
        errors = []
        for name in ("cuda.bindings.runtime", "cuda.cudart"):
            try:
                _CUDART = importlib.import_module(name)
                break
            except (ImportError, OSError) as e:  # OSError: the package is there, libcudart is not
                errors.append(f"{name}: {e}")
        else:
            raise BackendError(
                f"cuda-python cannot be imported ({'; '.join(errors)}): pip install 'cuda-python>=12.0' "
                "(the major version of your CUDA driver; on a Jetson, the one of its JetPack)"
            )
    return _CUDART


def _error_name(err: Any) -> str:
    name = getattr(err, "name", None)
    if name:
        return str(name)
    try:
        _, text = load_cudart().cudaGetErrorName(err)
        return text.decode() if isinstance(text, bytes) else str(text)
    except Exception:  # the name is only for the message
        return f"CUDA error {err}"


def check(result: Any, what: str) -> tuple[Any, ...]:
    """The values after the error code of a cuda-python call; raises BackendError on failure."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(getattr(err, "value", err)) != 0:
        raise BackendError(f"{what} failed: {_error_name(err)}")
    return tuple(rest)


# -- the copy geometry (no GPU) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Copy2D:
    """One cudaMemcpy2DAsync: `height` rows of `width` bytes, from src + i*spitch to dst + dst_offset + i*dpitch."""

    dst_offset: int
    dpitch: int
    spitch: int
    width: int
    height: int


def token_copy(num_kv_heads: int, capacity: int, head_dim: int, itemsize: int, index: int) -> Copy2D:
    """new [1, n_kv, 1, hd] (contiguous) -> buffer [1, n_kv, capacity, hd] at position `index` of axis 2."""
    if not 0 <= index < capacity:
        raise ValueError(f"cache position {index} is outside a buffer of {capacity} positions")
    row = head_dim * itemsize
    return Copy2D(dst_offset=index * row, dpitch=capacity * row, spitch=row, width=row, height=num_kv_heads)


def prefix_copy(num_kv_heads: int, capacity: int, length: int, head_dim: int, itemsize: int) -> Copy2D:
    """present [1, n_kv, length, hd] (contiguous) -> the first `length` positions of [1, n_kv, capacity, hd]."""
    if not 0 <= length <= capacity:
        raise ValueError(f"a prompt cache of {length} positions does not fit a buffer of {capacity}")
    row = head_dim * itemsize
    return Copy2D(dst_offset=0, dpitch=capacity * row, spitch=length * row, width=length * row, height=num_kv_heads)


# -- streams and buffers ----------------------------------------------------------------------------------


class Stream:
    """A CUDA stream; `handle` is the integer TensorRT takes."""

    def __init__(self) -> None:
        (self.raw,) = check(load_cudart().cudaStreamCreate(), "cudaStreamCreate")
        self.handle = int(self.raw)

    def synchronize(self) -> None:
        check(load_cudart().cudaStreamSynchronize(self.raw), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.raw is not None:
            check(load_cudart().cudaStreamDestroy(self.raw), "cudaStreamDestroy")
            self.raw = None


def _raw(stream: Stream | None) -> Any:
    return 0 if stream is None else stream.raw  # 0: the legacy default stream


class DeviceBuffer:
    """A C-contiguous device array: shape, dtype, nbytes and the device pointer `ptr`."""

    def __init__(self, shape: tuple[int, ...], dtype: Any) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize
        # At least one byte: TensorRT refuses a null address even for an empty tensor.
        (ptr,) = check(load_cudart().cudaMalloc(max(self.nbytes, 1)), f"cudaMalloc of {self.nbytes} bytes")
        self.ptr = int(ptr)

    @classmethod
    def from_numpy(cls, array: np.ndarray, stream: Stream | None = None) -> DeviceBuffer:
        buffer = cls(array.shape, array.dtype)
        buffer.copy_from_numpy(array, stream)
        return buffer

    def copy_from_numpy(self, array: np.ndarray, stream: Stream | None = None) -> None:
        """Host to device, into the start of the buffer (a shorter array fills only its first bytes)."""
        host = np.ascontiguousarray(array, dtype=self.dtype)
        if host.nbytes > self.nbytes:
            raise ValueError(f"{host.nbytes} bytes do not fit a device buffer of {self.nbytes}")
        # From pageable memory the copy returns once the bytes are staged: `host` may go right after.
        rt = load_cudart()
        kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        check(rt.cudaMemcpyAsync(self.ptr, host.ctypes.data, host.nbytes, kind, _raw(stream)), "cudaMemcpyAsync HtoD")

    def to_numpy(self, stream: Stream | None = None) -> np.ndarray:
        """Device to host; waits for the stream, so the array is ready on return."""
        host = np.empty(self.shape, self.dtype)
        rt = load_cudart()
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(rt.cudaMemcpyAsync(host.ctypes.data, self.ptr, self.nbytes, kind, _raw(stream)), "cudaMemcpyAsync DtoH")
        if stream is None:
            check(rt.cudaDeviceSynchronize(), "cudaDeviceSynchronize")
        else:
            stream.synchronize()
        return host

    def zero(self, stream: Stream | None = None) -> None:
        check(load_cudart().cudaMemsetAsync(self.ptr, 0, self.nbytes, _raw(stream)), "cudaMemsetAsync")

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            check(load_cudart().cudaFree(ptr), "cudaFree")

    def __del__(self) -> None:
        # A safety net for buffers dropped without free(); at interpreter exit CUDA may be gone already.
        with contextlib.suppress(Exception):
            self.free()

    def __repr__(self) -> str:
        return f"DeviceBuffer({self.shape}, {self.dtype}, ptr=0x{self.ptr:x})"


def memcpy2d(dst_ptr: int, src_ptr: int, plan: Copy2D, stream: Stream | None = None) -> None:
    """One device-to-device cudaMemcpy2DAsync following `plan`."""
    rt = load_cudart()
    kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
    result = rt.cudaMemcpy2DAsync(
        dst_ptr + plan.dst_offset, plan.dpitch, src_ptr, plan.spitch, plan.width, plan.height, kind, _raw(stream)
    )
    check(result, "cudaMemcpy2DAsync")


def _cache_geometry(buffer: DeviceBuffer, part: DeviceBuffer, what: str) -> tuple[int, int, int]:
    if len(buffer.shape) != 4 or len(part.shape) != 4 or buffer.shape[0] != 1 or part.shape[0] != 1:
        raise ValueError(f"{what}: cache tensors are [1, n_kv, length, hd], not {part.shape} -> {buffer.shape}")
    if (part.shape[1], part.shape[3]) != (buffer.shape[1], buffer.shape[3]) or part.dtype != buffer.dtype:
        raise ValueError(f"{what}: {part.shape} {part.dtype} does not match the buffer {buffer.shape} {buffer.dtype}")
    return buffer.shape[1], buffer.shape[2], buffer.shape[3]


def write_token(buffer: DeviceBuffer, new: DeviceBuffer, index: int, stream: Stream | None = None) -> None:
    """buffer[:, :, index] = new[:, :, 0], with buffer [1, n_kv, B, hd] and new [1, n_kv, 1, hd] on the device."""
    num_kv, capacity, head_dim = _cache_geometry(buffer, new, "write_token")
    if new.shape[2] != 1:
        raise ValueError(f"write_token writes one position, not {new.shape[2]}")
    memcpy2d(buffer.ptr, new.ptr, token_copy(num_kv, capacity, head_dim, buffer.dtype.itemsize, index), stream)


def write_prefix(buffer: DeviceBuffer, present: DeviceBuffer, stream: Stream | None = None) -> None:
    """buffer[:, :, :L] = present, with present [1, n_kv, L, hd] (a prefill's cache) on the device."""
    num_kv, capacity, head_dim = _cache_geometry(buffer, present, "write_prefix")
    plan = prefix_copy(num_kv, capacity, present.shape[2], head_dim, buffer.dtype.itemsize)
    if plan.width:  # an empty prompt cache has nothing to copy
        memcpy2d(buffer.ptr, present.ptr, plan, stream)
