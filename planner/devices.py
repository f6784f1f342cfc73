"""The deployment targets this project plans for (README: hardware), in one table.

Everything here is a published figure or a stated assumption; nothing is probed, so the
planner (`python -m planner`) runs on any machine, GPU or not, without torch.

Units: memory sizes are in GiB (2^30 bytes). DRAM is sold in binary sizes, so a "12 GB"
Titan Xp or an "8 GB" Orin Nano holds 12 or 8 GiB. Bandwidths are in GB/s (10^9 bytes/s),
as vendors quote them.

Usable memory (an assumption, stated per device kind):

- desktop GPU: the driver reserves ~0.1 GiB (a Titan Xp reports 12,196 MiB) and a display
  served by the same GPU (X server, compositor, browser) holds ~0.3-0.5 GiB, so 0.5 GiB is
  set aside;
- Jetson: CPU and GPU share one memory, so firmware carveouts (~0.4-0.6 GiB) and a headless
  L4T (Ubuntu, services, ~1.2 GiB) are set aside, 1.8 GiB in all; a GNOME desktop on the
  board costs ~1 GiB more (`sudo systemctl set-default multi-user.target` gives it back).

Runtime overhead (an estimate, not measured here: no GPU on the development machine): the
CUDA context, cuBLAS/cuDNN workspaces and the TensorRT or ONNX Runtime libraries and
arenas. On a Jetson those libraries load into the same shared memory, hence more.

Runtimes (`planner.runtimes.RUNTIMES`): the ones each device can run, the recommended one
first. `HOST` is the CPU pseudo-device: ONNX Runtime on the CPU, no GPU and no memory limit
the planner checks, for predicting what a build holds on the development machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from planner.runtimes import RUNTIMES

# The old single-precision choice of the planner (`--precision`, deprecated): see `planner.plan.PRECISION_ALIASES`.
Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "int8")

DESKTOP_RESERVED_GB = 0.5  # driver reserve + a display on the same GPU
JETSON_RESERVED_GB = 1.8  # carveouts + headless L4T, taken from the shared memory
DESKTOP_RUNTIME_OVERHEAD_GB = 0.75  # CUDA context (~0.3) + cuBLAS/cuDNN workspaces + TensorRT/ORT (~0.45)
JETSON_RUNTIME_OVERHEAD_GB = 1.0  # the same, with the libraries themselves in the shared memory
# A Python process with numpy, ONNX Runtime and the tokenizer imported: 58 MiB resident (measured), rounded up.
HOST_RUNTIME_OVERHEAD_GB = 0.1

_ORIN_TENSORRT = "8.6 (JetPack 6.0), 10.3 (JetPack 6.1/6.2)"


class UnknownDeviceError(ValueError):
    """`device(name)` was given a name that is not in `DEVICES`; the message lists the known names."""


@dataclass(frozen=True)
class Device:
    """One deployment target: its memory, speed and software limits.

    fp16_speed: fp16 arithmetic throughput relative to fp32 (Pascal GP102 runs fp16 at 1/64
        of fp32; Ampere's tensor cores at least twice fp32). Below 1, build fp32.
    usable_gb: what one model process can use after the OS, the display and carveouts
        (see the module docstring), before the runtime's own overhead; None: no limit is checked.
    recommended_precision: the activations' precision to build (fp32 where fp16 arithmetic is slow).
    runtimes: the runtimes of `planner.runtimes.RUNTIMES` that run on it, the recommended one first.
    """

    name: str
    title: str
    architecture: str
    compute_capability: str
    memory_gb: float | None
    shared_memory: bool  # Jetson: the CPU and the GPU allocate from the same DRAM
    usable_gb: float | None
    bandwidth_gbps: float  # DRAM bandwidth, GB/s; decode steps are bound by it
    fp16_speed: float
    int8: bool  # int8 kernels (dp4a on SM 6.1, tensor cores on SM 8.7)
    tensorrt: str  # TensorRT versions that run on this device
    recommended_precision: Precision
    recommended_tensorrt: str
    runtime_overhead_gb: float
    runtimes: tuple[str, ...]
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [r for r in self.runtimes if r not in RUNTIMES]
        if not self.runtimes or unknown:
            raise ValueError(f"{self.name}: runtimes must be some of {', '.join(RUNTIMES)}, got {self.runtimes!r}")
        slow = [r for r in self.runtimes if not RUNTIMES[r].runs_on(self.compute_capability)]
        if slow:
            raise ValueError(
                f"{self.name}: {', '.join(slow)} do not run on compute capability {self.compute_capability}"
            )
        if (self.usable_gb is None) != (self.memory_gb is None):
            raise ValueError(f"{self.name}: usable_gb and memory_gb are both set or both None")

    @property
    def usable_bytes(self) -> int | None:
        return None if self.usable_gb is None else int(self.usable_gb * 2**30)

    @property
    def recommended_runtime(self) -> str:
        return self.runtimes[0]

    @property
    def runtime_overhead_bytes(self) -> int:
        return int(self.runtime_overhead_gb * 2**30)

    @property
    def kind(self) -> str:
        return "jetson" if self.shared_memory else "desktop"


def _jetson(name: str, title: str, memory_gb: int, bandwidth_gbps: float, *notes: str) -> Device:
    return Device(
        name=name,
        title=title,
        architecture="Ampere (Orin iGPU)",
        compute_capability="8.7",
        memory_gb=memory_gb,
        shared_memory=True,
        usable_gb=memory_gb - JETSON_RESERVED_GB,
        bandwidth_gbps=bandwidth_gbps,
        fp16_speed=2.0,
        int8=True,
        tensorrt=_ORIN_TENSORRT,
        recommended_precision="fp16",
        recommended_tensorrt="10.3 (JetPack 6.1/6.2); 8.6 on JetPack 6.0",
        runtime_overhead_gb=JETSON_RUNTIME_OVERHEAD_GB,
        # JetPack 6.1/6.2 ship TensorRT 10.3, JetPack 6.0 TensorRT 8.6.
        runtimes=("tensorrt-10", "tensorrt-8.6", "onnxruntime-cuda"),
        notes=(
            f"{memory_gb} GiB LPDDR5 shared by CPU and GPU: host-side copies count too (loading an ONNX file "
            "without memory-mapping holds the weights twice until the session is built)",
            "build the TensorRT engines on the board itself (an engine runs only on the GPU and TensorRT "
            "version that built it); add swap for the build",
            *notes,
        ),
    )


_DEVICE_LIST: tuple[Device, ...] = (
    Device(
        name="titan-xp",
        title="NVIDIA Titan Xp",
        architecture="Pascal GP102",
        compute_capability="6.1",
        memory_gb=12,
        shared_memory=False,
        usable_gb=12 - DESKTOP_RESERVED_GB,
        bandwidth_gbps=547.7,
        fp16_speed=1 / 64,
        int8=True,
        tensorrt="8.6 at most (TensorRT 10 needs SM 7.0+)",
        recommended_precision="fp32",
        recommended_tensorrt="8.6 (or ONNX Runtime's CUDA provider)",
        runtime_overhead_gb=DESKTOP_RUNTIME_OVERHEAD_GB,
        runtimes=("tensorrt-8.6", "onnxruntime-cuda"),
        notes=(
            "12 GiB GDDR5X; fp16 arithmetic runs at 1/64 of fp32 on GP102: build fp32 (fp16 only halves the "
            "bytes, the kernels are far slower)",
            "a model that does not fit spills to host memory over PCIe, which dominates its time",
        ),
    ),
    _jetson("orin-nano-8gb", "NVIDIA Jetson Orin Nano 8GB", 8, 68.0),
    _jetson("orin-nx-16gb", "NVIDIA Jetson Orin NX 16GB", 16, 102.4),
    _jetson("agx-orin-32gb", "NVIDIA Jetson AGX Orin 32GB", 32, 204.8),
    _jetson("agx-orin-64gb", "NVIDIA Jetson AGX Orin 64GB", 64, 204.8),
)

DEVICES: dict[str, Device] = {d.name: d for d in _DEVICE_LIST}

HOST = Device(
    name="cpu",
    title="the host CPU",
    architecture="CPU",
    compute_capability="0",
    memory_gb=None,
    shared_memory=True,
    usable_gb=None,
    bandwidth_gbps=20.0,  # a desktop's DRAM, for the decode-step lower bound only
    fp16_speed=1.0,
    int8=True,
    tensorrt="none",
    recommended_precision="fp32",
    recommended_tensorrt="none (ONNX Runtime on the CPU)",
    runtime_overhead_gb=HOST_RUNTIME_OVERHEAD_GB,
    runtimes=("onnxruntime-cpu",),
    notes=("the host CPU: no memory limit is checked; the figures predict what the process holds",),
)


def device(name: str) -> Device:
    """The device called `name` (a deployment target, or "cpu": `HOST`); an `UnknownDeviceError` otherwise."""
    if name == HOST.name:
        return HOST
    try:
        return DEVICES[name]
    except (KeyError, TypeError):
        raise UnknownDeviceError(f"unknown device {name!r}; known devices: {', '.join(DEVICES)}, {HOST.name}") from None
