"""The TensorRT backend without TensorRT or a GPU: copy geometry, API choice, refusals, and a whole request.

`FakeCudart` stands in for cuda-python with host memory (every device access is bounds-checked against
its allocations), and `fake_tensorrt` for TensorRT 8.6 (bindings, int32 I/O) or 10.x (named tensors), each
engine running its ONNX graph in ONNX Runtime on the bound addresses (both in tests/fake_cuda.py).
One test (marked gpu) runs the real thing.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_cuda import FakeCudart, fake_tensorrt
from fake_manifests import manifest_json

import buildformat
from buildformat import Engines, Manifest
from runtime import cuda_memory, trt_backend
from runtime.backend import Backend, BackendError
from runtime.cuda_memory import Copy2D, DeviceBuffer, prefix_copy, token_copy, write_prefix, write_token
from runtime.ort_backend import OrtBackend
from runtime.pipeline import GenerationTrace, Pipeline, Prompt
from runtime.trt_backend import TrtBackend
from runtime.trt_io import BindingsIO, NamedTensorsIO, select_api

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


def prompt(manifest: Manifest) -> tuple[np.ndarray, np.ndarray, int]:
    """input_ids [1, S] `<s> text <image>*n text`, pixel_values, image_start."""
    model = manifest.model
    n_img, size = model.num_image_tokens, model.image_size
    ids = [model.bos_token_id, 11, 12, 13] + [model.image_token_id] * n_img + list(range(20, 27))
    pixels = np.random.default_rng(3).standard_normal((1, 3, size, size)).astype(np.float32)
    return np.array([ids], dtype=np.int64), pixels, 4


def traced(build: Path, manifest: Manifest, backend: Backend) -> GenerationTrace:
    """STEPS greedy tokens of `prompt` through the runtime's generation loop (`Pipeline.run`) on `backend`."""
    ids, pixels, start = prompt(manifest)
    trace = GenerationTrace()
    request = Prompt(pixel_values=pixels, input_ids=ids, image_start=start, max_new_tokens=STEPS)
    Pipeline(build, manifest, backend).run(request, stop_at_eos=False, trace=trace)
    return trace


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
    reference = traced(build, manifest, OrtBackend(build, manifest, "cpu"))  # ONNX Runtime's CPU provider
    ids = prompt(manifest)[0]

    backend = TrtBackend(build, manifest)
    io_class = BindingsIO if version.startswith("8") else NamedTensorsIO
    assert isinstance(backend._io["decode"], io_class)
    binds: list[str] = []
    bind = io_class.bind
    monkeypatch.setattr(io_class, "bind", lambda self, name, ptr: (binds.append(self.graph), bind(self, name, ptr)))
    for _ in range(2):  # a second request on the same backend gives the same answer
        before = cudart.copies_2d
        got = traced(build, manifest, backend)
        assert got.tokens == reference.tokens
        np.testing.assert_allclose(got.step_logits, reference.step_logits, atol=1e-4)
        assert got.kept_image_tokens == reference.kept_image_tokens
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
    reference = traced(build, manifest, OrtBackend(build, manifest, "cpu"))  # ONNX Runtime's CPU provider
    with TrtBackend(build, manifest) as backend:
        got = traced(build, manifest, backend)
    assert got.tokens == reference.tokens
    assert got.kept_image_tokens == reference.kept_image_tokens
    np.testing.assert_allclose(got.logits[0], reference.logits[0], atol=1e-2)  # TF32 kernels
