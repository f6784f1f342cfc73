"""The TensorRT backend without TensorRT or a GPU: copy geometry, API choice, refusals, and a whole request.

`FakeCudart` stands in for cuda-python with host memory (every device access is bounds-checked against its
allocations), and `fake_tensorrt` for TensorRT 8.6 (bindings, int32 I/O) or 10.x (named tensors), each engine
running its ONNX graph in ONNX Runtime on the bound addresses. One test (marked gpu) runs the real thing.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import math
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from fake_manifests import manifest_json

import buildformat
from buildformat import Engines, Manifest
from export.engine import profiles_from_manifest
from export.ort_runner import OrtBuild
from runtime import cuda_memory, trt_backend
from runtime.backend import BackendError
from runtime.cuda_memory import Copy2D, DeviceBuffer, prefix_copy, token_copy, write_prefix, write_token
from runtime.trt_backend import BindingsIO, NamedTensorsIO, TrtBackend, select_api

ROOT = Path(__file__).resolve().parents[1]
GPU_NAME = "NVIDIA Fake GPU"
STEPS = 16


# -- the copy geometry against numpy ----------------------------------------------------------------------


def emulate(plan: Copy2D, dst: np.ndarray, src: np.ndarray) -> None:
    """What cudaMemcpy2DAsync does, on the bytes of two host arrays."""
    assert plan.width <= plan.dpitch and plan.width <= plan.spitch
    d, s = dst.reshape(-1).view(np.uint8), src.reshape(-1).view(np.uint8)
    for row in range(plan.height):
        start = plan.dst_offset + row * plan.dpitch
        d[start : start + plan.width] = s[row * plan.spitch : row * plan.spitch + plan.width]


GEOMETRIES = [(1, 1, 1), (2, 7, 16), (8, 33, 128), (32, 5, 64)]  # (n_kv, B, hd)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, np.float64])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_token_copy_writes_one_position(geometry: tuple[int, int, int], dtype: Any) -> None:
    num_kv, capacity, head_dim = geometry
    rng = np.random.default_rng(0)
    for index in sorted({0, capacity // 2, capacity - 1}):
        buffer = rng.standard_normal((1, num_kv, capacity, head_dim)).astype(dtype)
        new = rng.standard_normal((1, num_kv, 1, head_dim)).astype(dtype)
        expected = buffer.copy()
        expected[:, :, index] = new[:, :, 0]
        emulate(token_copy(num_kv, capacity, head_dim, np.dtype(dtype).itemsize, index), buffer, new)
        np.testing.assert_array_equal(buffer, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_prefix_copy_fills_the_first_positions(geometry: tuple[int, int, int], dtype: Any) -> None:
    num_kv, capacity, head_dim = geometry
    rng = np.random.default_rng(1)
    for length in sorted({0, 1, capacity // 2, capacity}):
        buffer = np.zeros((1, num_kv, capacity, head_dim), dtype)
        present = rng.standard_normal((1, num_kv, length, head_dim)).astype(dtype)
        expected = buffer.copy()
        expected[:, :, :length] = present
        emulate(prefix_copy(num_kv, capacity, length, head_dim, np.dtype(dtype).itemsize), buffer, present)
        np.testing.assert_array_equal(buffer, expected)


def test_copy_geometry_numbers() -> None:
    # fp16 Llama-7B layer: 32 heads of 128, a 2047-position buffer, token 600.
    assert token_copy(32, 2047, 128, 2, 600) == Copy2D(600 * 256, 2047 * 256, 256, 256, 32)
    assert prefix_copy(8, 100, 40, 64, 4) == Copy2D(0, 100 * 256, 40 * 256, 40 * 256, 8)
    with pytest.raises(ValueError, match="outside"):
        token_copy(2, 10, 4, 4, 10)
    with pytest.raises(ValueError, match="does not fit"):
        prefix_copy(2, 10, 11, 4, 4)


# -- a fake cuda-python over host memory ------------------------------------------------------------------


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


@pytest.fixture
def cudart(monkeypatch: pytest.MonkeyPatch) -> FakeCudart:
    fake = FakeCudart()
    monkeypatch.setattr(cuda_memory, "_CUDART", fake)
    return fake


def test_device_buffers_and_cache_writes(cudart: FakeCudart) -> None:
    rng = np.random.default_rng(2)
    host = rng.standard_normal((1, 4, 9, 8)).astype(np.float16)
    buffer = DeviceBuffer.from_numpy(host)
    assert (buffer.shape, buffer.dtype, buffer.nbytes) == ((1, 4, 9, 8), np.float16, host.nbytes)
    new = DeviceBuffer.from_numpy(rng.standard_normal((1, 4, 1, 8)).astype(np.float16))
    write_token(buffer, new, 5)
    host[:, :, 5] = new.to_numpy()[:, :, 0]
    np.testing.assert_array_equal(buffer.to_numpy(), host)
    buffer.zero()
    present = DeviceBuffer.from_numpy(rng.standard_normal((1, 4, 3, 8)).astype(np.float16))
    write_prefix(buffer, present)
    expected = np.zeros_like(host)
    expected[:, :, :3] = present.to_numpy()
    np.testing.assert_array_equal(buffer.to_numpy(), expected)
    assert cudart.copies_2d == 2
    wrong = DeviceBuffer((1, 4, 1, 8), np.float32)
    with pytest.raises(ValueError, match="does not match"):
        write_token(buffer, wrong, 0)
    for b in (buffer, new, present, wrong):
        b.free()
    assert not cudart.blocks


def test_cuda_errors_are_named(cudart: FakeCudart) -> None:
    with pytest.raises(BackendError, match=r"cudaMalloc of .* failed: cudaErrorMemoryAllocation"):
        DeviceBuffer((1 << 40,), np.uint8)


# -- API choice, refusals, imports ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "expected"),
    [("8.6.1", BindingsIO), ("8.6.1.6", BindingsIO), ("10.3.0", NamedTensorsIO), ("10.0.1.6", NamedTensorsIO)],
)
def test_api_follows_the_tensorrt_version(version: str, expected: type) -> None:
    assert select_api(types.SimpleNamespace(__version__=version)) is expected
    assert expected.api == ("bindings" if version.startswith("8") else "named-tensors")


@pytest.mark.parametrize("version", ["8.5.3", "9.2.0", "7.1.3", "", "unknown"])
def test_unsupported_tensorrt_versions_are_refused(version: str) -> None:
    with pytest.raises(BackendError, match=r"TensorRT|8\.6"):
        select_api(types.SimpleNamespace(__version__=version))


def _engine_manifest(build: Path, version: str = "8.6.1", gpu: str = GPU_NAME) -> Engines:
    (build / "engines").mkdir(parents=True, exist_ok=True)
    for graph in trt_backend.GRAPHS:
        (build / "engines" / f"{graph}.plan").write_bytes(graph.encode())
    return Engines(
        tensorrt_version=version,
        api="bindings" if version.startswith("8") else "named-tensors",
        fp16=False,
        workspace_mb=1024,
        device={"name": gpu, "compute_capability": "8.7"},
        graphs={g: f"engines/{g}.plan" for g in trt_backend.GRAPHS},
    )


def _with_engines(engines: Engines | None) -> Manifest:
    return Manifest.from_json(manifest_json()).with_(engines=engines)


def _no_tensorrt() -> Any:
    raise AssertionError("tensorrt must not be imported for a build without engines")


def test_build_without_engines_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trt_backend, "import_tensorrt", _no_tensorrt)
    with pytest.raises(BackendError) as error:
        TrtBackend(tmp_path, _with_engines(None))
    assert str(error.value) == (
        f"{tmp_path} has no TensorRT engines: run `python -m export engine {tmp_path}` on this machine first"
    )
    engines = _engine_manifest(tmp_path)
    partial = dataclasses.replace(engines, graphs={g: f for g, f in engines.graphs.items() if g != "decode"})
    with pytest.raises(BackendError, match="no TensorRT engine for decode: run `python -m export engine"):
        TrtBackend(tmp_path, _with_engines(partial))


@pytest.mark.parametrize(
    ("built_with", "built_on", "expected"),
    [
        ("8.6.1", GPU_NAME, "built with TensorRT 8.6.1, this machine has 10.3.0"),
        ("10.3.0", "Orin", f"built on Orin, this machine has {GPU_NAME}"),
    ],
)
def test_engines_of_another_tensorrt_or_gpu_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, built_with: str, built_on: str, expected: str
) -> None:
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(trt_backend, "current_gpu", lambda: GPU_NAME)
    with pytest.raises(BackendError) as error:
        TrtBackend(tmp_path, _with_engines(_engine_manifest(tmp_path, built_with, built_on)))
    message = str(error.value)
    assert expected in message and "\n" not in message
    assert "an engine only runs on the GPU and TensorRT version that built it" in message


def test_cache_sizes_are_clamped_to_the_profile() -> None:
    assert trt_backend.cache_size("past.0.key", 30, 10, 17, 127) == 40
    assert trt_backend.cache_size("past.0.key", 3, 2, 17, 127) == 17  # up to the profile's minimum
    assert trt_backend.cache_size("past.0.key", 100, 28, 17, 127) == 127  # the last token needs no slot
    with pytest.raises(BackendError, match=r"needs 128 cache positions .* admits 127"):
        trt_backend.cache_size("past.0.key", 100, 29, 17, 127)


def test_import_loads_no_torch_tensorrt_or_cuda() -> None:
    code = (
        "import runtime.trt_backend, runtime.cuda_memory, sys; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'tensorrt', 'cuda')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


# -- a whole request on fake TensorRT engines that run ONNX Runtime ------------------------------------


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


def prompt(manifest: Manifest) -> tuple[np.ndarray, np.ndarray, int]:
    """input_ids [1, S] `<s> text <image>*n text`, pixel_values, image_start."""
    model = manifest.model
    n_img, size = model.num_image_tokens, model.image_size
    ids = [model.bos_token_id, 11, 12, 13] + [model.image_token_id] * n_img + list(range(20, 27))
    pixels = np.random.default_rng(3).standard_normal((1, 3, size, size)).astype(np.float32)
    return np.array([ids], dtype=np.int64), pixels, 4


def greedy(backend: TrtBackend, manifest: Manifest, steps: int) -> tuple[list[int], list[np.ndarray], Any]:
    """The pipeline's flow, greedy."""
    ids, pixels, start = prompt(manifest)
    features = backend.vision(pixels)
    embeds = backend.embed(ids)
    embeds[0, start : start + features.shape[1]] = features[0]
    result = backend.prefill(embeds, start, ids.shape[1] + steps)
    logits = [result.logits]
    tokens = [int(np.argmax(result.logits))]
    for _ in range(steps - 1):
        logits.append(backend.decode(tokens[-1]))
        tokens.append(int(np.argmax(logits[-1])))
    return tokens, logits, result.kept_image_tokens


@pytest.fixture(scope="module")
def cm_build(built: Any) -> tuple[Path, Manifest]:
    """A tiny CoreMatching build (conftest's, shared with the export tests)."""
    result = built("llama-gqa", "cm")
    return Path(result.out), result.manifest


@pytest.mark.slow
@pytest.mark.parametrize("version", ["8.6.1", "10.3.0"])
def test_request_on_fake_engines_matches_onnxruntime(
    cm_build: tuple[Path, Manifest],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cudart: FakeCudart,
    version: str,
) -> None:
    source, manifest = cm_build
    build = Path(shutil.copytree(source, tmp_path / "build"))
    manifest = manifest.with_(engines=_engine_manifest(build, version))
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: fake_tensorrt(version, build, manifest, cudart))
    monkeypatch.setattr(trt_backend, "current_gpu", lambda: GPU_NAME)
    ids, pixels, _ = prompt(manifest)
    reference = OrtBuild(build, manifest).greedy(ids, pixels, STEPS)

    backend = TrtBackend(build, manifest)
    io_class = BindingsIO if version.startswith("8") else NamedTensorsIO
    assert isinstance(backend._io["decode"], io_class)
    binds: list[str] = []
    bind = io_class.bind
    monkeypatch.setattr(io_class, "bind", lambda self, name, ptr: (binds.append(self.graph), bind(self, name, ptr)))
    for _ in range(2):  # a second request on the same backend gives the same answer
        before = cudart.copies_2d
        tokens, logits, kept = greedy(backend, manifest, STEPS)
        assert tokens == reference.tokens
        np.testing.assert_allclose(np.stack(logits), reference.logits, atol=1e-4)
        assert kept == reference.kept_image_tokens
        layers = manifest.model.num_layers
        assert cudart.copies_2d - before == 2 * layers * STEPS  # the prefix once, then one write per step
    decode_binds = binds.count("decode")
    assert decode_binds == 2 * len(backend._io["decode"].inputs + backend._io["decode"].outputs)  # per request

    # The cache is sized for the request: one token more than it holds is refused, so is a longer request.
    embeds = backend.embed(ids)
    backend.prefill(embeds, 4, ids.shape[1] + 2)
    backend.decode(1)
    backend.decode(1)
    with pytest.raises(BackendError, match="outgrew the cache"):
        backend.decode(1)
    limit = manifest.max_sequence
    with pytest.raises(BackendError, match="cache positions"):
        backend.prefill(embeds, 4, limit + 1)
    backend.prefill(embeds, 4, limit)  # the build's longest sequence fits
    backend.close()
    assert not cudart.blocks  # every device buffer was freed


# -- the real thing -----------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_tensorrt_engines_match_onnxruntime(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    from export import engine
    from runtime import gpu

    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    try:
        cuda_memory.load_cudart()
    except BackendError as e:
        pytest.skip(str(e))
    try:
        gpu.detect_gpu()
    except gpu.NoGpuError as e:
        pytest.skip(str(e))
    source, _ = request.getfixturevalue("cm_build")  # after the skips: the build takes seconds
    build = Path(shutil.copytree(source, tmp_path / "build"))
    engine.build_engines(engine.EngineConfig(build, workspace_mb=1024))
    manifest = buildformat.read(build)
    ids, pixels, _ = prompt(manifest)
    reference = OrtBuild(build, manifest).greedy(ids, pixels, STEPS)
    with TrtBackend(build, manifest) as backend:
        tokens, logits, kept = greedy(backend, manifest, STEPS)
    assert tokens == reference.tokens
    assert kept == reference.kept_image_tokens
    np.testing.assert_allclose(logits[0], reference.logits[0], atol=1e-2)  # TF32 kernels
