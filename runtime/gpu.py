"""Which CUDA GPU this machine has, without torch (cuda-python where installed, else the driver API).

TensorRT engines run only on the GPU model that built them: `python -m export engine` records the GPU
and the TensorRT backend checks it before loading.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


class NoGpuError(RuntimeError):
    """No CUDA GPU is visible: engines are built on the GPU that will run them."""


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: str  # "8.7"

    @property
    def sm(self) -> tuple[int, int]:
        major, _, minor = self.compute_capability.partition(".")
        return int(major), int(minor or 0)

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "compute_capability": self.compute_capability}


def no_gpu_error(detail: str) -> NoGpuError:
    return NoGpuError(
        f"no CUDA GPU is visible ({detail}): TensorRT engines are built on the GPU that will run them; "
        "check the NVIDIA driver and CUDA_VISIBLE_DEVICES, or run the build with ONNX Runtime instead"
    )


def _cuda_runtime() -> Any | None:
    """cuda-python's runtime module: `cuda.bindings.runtime` (12.6 and later) or the older `cuda.cudart`."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _cuda_ok(err: Any) -> bool:
    return getattr(err, "value", err) == 0  # cudaError_t enum or a plain int


def _text(value: Any) -> str:
    return (value.decode(errors="replace") if isinstance(value, bytes) else str(value)).split("\x00")[0].strip()


def _runtime_device(cudart: Any) -> DeviceInfo:
    err, count = cudart.cudaGetDeviceCount()
    if not _cuda_ok(err) or count < 1:
        raise no_gpu_error(f"cudaGetDeviceCount: {getattr(err, 'name', err)}, {count} device(s)")
    err, prop = cudart.cudaGetDeviceProperties(0)
    if not _cuda_ok(err):
        raise no_gpu_error(f"cudaGetDeviceProperties: {getattr(err, 'name', err)}")
    return DeviceInfo(_text(prop.name), f"{prop.major}.{prop.minor}")


def _driver_device() -> DeviceInfo:
    """The driver API through ctypes: works without cuda-python (a bare JetPack Python has only TensorRT)."""
    lib = None
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        raise no_gpu_error("the NVIDIA driver library libcuda could not be loaded")
    rc = lib.cuInit(0)
    if rc != 0:
        raise no_gpu_error(f"cuInit returned CUDA error {rc}")
    count, dev, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        raise no_gpu_error(f"cuDeviceGetCount found {count.value} device(s)")
    name = ctypes.create_string_buffer(256)
    lib.cuDeviceGet(ctypes.byref(dev), 0)
    lib.cuDeviceGetName(name, len(name), dev)
    lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # ..._MINOR
    return DeviceInfo(_text(name.value), f"{major.value}.{minor.value}")


def detect_gpu() -> DeviceInfo:
    """The first visible CUDA GPU (the one TensorRT builds for), without torch; raises NoGpuError."""
    cudart = _cuda_runtime()
    if cudart is not None:
        try:
            return _runtime_device(cudart)
        except NoGpuError:
            raise
        except Exception as e:  # cuda-python present but its libcudart is not: ask the driver
            log.debug("cuda-python could not query the GPU (%s); trying the driver API", e)
    return _driver_device()
