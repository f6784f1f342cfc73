"""The TensorRT backend without TensorRT or a GPU: copy geometry, API choice, refusals, and a whole request.

`FakeCudart` stands in for cuda-python with host memory (every device access is bounds-checked against
its allocations), and `fake_tensorrt` for TensorRT 8.6 (bindings, int32 I/O) or 10.x (named tensors), each
engine running its ONNX graph in ONNX Runtime on the bound addresses and checking its optimization profiles
(both in tests/fake_cuda.py). The whole-request test builds its engines with `build_engines` through the
fake builder (tests/fake_tensorrt.py), whose plans carry the profiles the fake runtime then enforces.
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
from fake_manifests_v4 import manifest_v4_json
from fake_tensorrt import fake_trt

import buildformat
from buildformat import Engines, Manifest
from buildformat.names import STACKS, is_ffn
from export import engine
from export.engine import EngineConfig, build_engines
from runtime import cuda_memory, gpu, trt_backend
from runtime.backend import Backend, BackendError
from runtime.cuda_memory import Copy2D, DeviceBuffer, prefix_copy, token_copy, write_prefix, write_token
from runtime.gpu import DeviceInfo, NoGpuError
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


def _engine_manifest(build: Path, manifest: Manifest, version: str = "8.6.1", gpu: str = GPU_NAME) -> Engines:
    """An engines section (and stand-in engine files) for every graph of `manifest`."""
    (build / "engines").mkdir(parents=True, exist_ok=True)
    for graph in manifest.graph_names:
        (build / "engines" / f"{graph}.plan").write_bytes(graph.encode())
    return Engines(
        tensorrt_version=version,
        api="bindings" if version.startswith("8") else "named-tensors",
        fp16=False,
        workspace_mb=1024,
        device={"name": gpu, "compute_capability": "8.7"},
        graphs={g: f"engines/{g}.plan" for g in manifest.graph_names},
        profiles={g: ("prefill", "decode") if g in STACKS else ("prefill",) for g in manifest.graph_names},
    )


def _manifest(**changes: Any) -> Manifest:
    return Manifest.from_json(manifest_v4_json(**changes))


def _no_tensorrt() -> Any:
    raise AssertionError("tensorrt must not be imported for a build without engines")


def test_build_without_engines_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trt_backend, "import_tensorrt", _no_tensorrt)
    manifest = _manifest()
    with pytest.raises(BackendError) as error:
        TrtBackend(tmp_path, manifest)
    assert str(error.value) == (
        f"{tmp_path} has no TensorRT engines: run `python -m export engine {tmp_path}` on this machine first"
    )
    engines = _engine_manifest(tmp_path, manifest)
    partial = dataclasses.replace(engines, graphs={g: f for g, f in engines.graphs.items() if g != "upper"})
    with pytest.raises(BackendError, match="no TensorRT engine for upper: run `python -m export engine"):
        TrtBackend(tmp_path, manifest.with_(engines=partial))
    (tmp_path / "engines" / "neurons.plan").unlink()
    with pytest.raises(BackendError, match=r"engine file\(s\) .*neurons\.plan are missing"):
        TrtBackend(tmp_path, manifest.with_(engines=engines))
    # A build without per-request neurons has no neurons graph, so needs no neurons engine.
    static = _manifest(per_request_neurons=False)
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(trt_backend, "current_gpu", lambda: GPU_NAME)
    with pytest.raises(BackendError, match=r"built with TensorRT 8\.6\.1"):  # past the engine files, to the version
        TrtBackend(tmp_path, static.with_(engines=engines))


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
    manifest = _manifest()
    with pytest.raises(BackendError) as error:
        TrtBackend(tmp_path, manifest.with_(engines=_engine_manifest(tmp_path, manifest, built_with, built_on)))
    message = str(error.value)
    assert expected in message and "\n" not in message
    assert "an engine only runs on the GPU and TensorRT version that built it" in message


def test_detect_gpu_through_cuda_python(monkeypatch: pytest.MonkeyPatch) -> None:
    ok = types.SimpleNamespace(value=0, name="cudaSuccess")

    def runtime(count: int) -> types.SimpleNamespace:
        prop = types.SimpleNamespace(name=b"NVIDIA TITAN Xp\x00\x00", major=6, minor=1)
        return types.SimpleNamespace(
            cudaGetDeviceCount=lambda: (ok if count else types.SimpleNamespace(value=100, name="NoDevice"), count),
            cudaGetDeviceProperties=lambda i: (ok, prop),
        )

    monkeypatch.setattr(gpu, "_cuda_runtime", lambda: runtime(1))
    assert gpu.detect_gpu() == DeviceInfo("NVIDIA TITAN Xp", "6.1")
    assert gpu.detect_gpu().sm == (6, 1)
    monkeypatch.setattr(gpu, "_cuda_runtime", lambda: runtime(0))
    with pytest.raises(NoGpuError, match="NoDevice"):
        gpu.detect_gpu()


def test_detect_gpu_without_cuda_python_or_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_library(name: str) -> None:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(gpu, "_cuda_runtime", lambda: None)
    monkeypatch.setattr(gpu.ctypes, "CDLL", no_library)
    with pytest.raises(NoGpuError, match="libcuda"):
        gpu.detect_gpu()


def test_cache_sizes_are_clamped_to_the_profile() -> None:
    assert trt_backend.cache_size("past.0.key", 30, 10, 17, 127) == 40
    assert trt_backend.cache_size("past.0.key", 3, 2, 17, 127) == 17  # up to the profile's minimum
    assert trt_backend.cache_size("past.0.key", 100, 28, 17, 127) == 127  # the last token needs no slot
    with pytest.raises(BackendError, match=r"needs 128 cache positions .* decode profile admits 127"):
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


@pytest.fixture(scope="module")
def builds(built: Any) -> Any:
    """builds("cm" | "dense") -> the build directory of a tiny build (conftest's, shared with the export tests)."""
    return lambda mode: Path(built("llama-gqa", mode).out)


def engines_for(build: Path, version: str, monkeypatch: pytest.MonkeyPatch) -> Manifest:
    """`python -m export engine` on the fake builder (a plan keeps the profiles it was given); the new manifest."""
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt(version))
    monkeypatch.setattr(engine, "detect_gpu", lambda: DeviceInfo(GPU_NAME, "8.7"))
    build_engines(EngineConfig(build, workspace_mb=256))
    return buildformat.read(build)


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "version"), [("cm", "8.6.1"), ("cm", "10.3.0"), ("dense", "10.3.0")])
def test_request_on_fake_engines_matches_onnxruntime(
    builds: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cudart: FakeCudart,
    mode: str,
    version: str,
) -> None:
    build = Path(shutil.copytree(builds(mode), tmp_path / "build"))
    manifest = engines_for(build, version, monkeypatch)
    trt = fake_tensorrt(version, build, cudart)
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_backend, "current_gpu", lambda: GPU_NAME)
    reference = traced(build, manifest, OrtBackend(build, manifest, "cpu"))  # ONNX Runtime's CPU provider

    backend = TrtBackend(build, manifest)
    # One engine per graph, loaded once; each stack's two contexts share it (its weights), one per profile.
    assert [e.file for e in trt.engines] == [manifest.graph(g).file for g in manifest.graph_names]
    io_class = BindingsIO if version.startswith("8") else NamedTensorsIO
    for graph in backend.stacks:
        prefill, decode = backend.prefill_io[graph], backend.decode_io[graph]
        assert isinstance(decode, io_class) and prefill.engine is decode.engine
        assert prefill.engine.num_optimization_profiles == 2
        assert (prefill.context.active_optimization_profile, decode.context.active_optimization_profile) == (0, 1)
    assert set(backend.decode_io) == set(backend.stacks) == {g for g in manifest.graph_names if g in STACKS}
    binds: list[tuple[str, int, str, int]] = []
    bind = io_class.bind
    monkeypatch.setattr(
        io_class, "bind", lambda io, name, ptr: (binds.append((io.graph, io.profile, name, ptr)), bind(io, name, ptr))
    )
    decode_bindings = sum(len(io.inputs) + len(io.outputs) for io in backend.decode_io.values())
    layers = manifest.model.num_layers
    for _ in range(2):  # a second request on the same backend gives the same answer
        before, binds[:] = cudart.copies_2d, []
        transfers = len(cudart.transfers)
        got = traced(build, manifest, backend)
        assert got.tokens == reference.tokens
        np.testing.assert_allclose(got.step_logits, reference.step_logits, atol=1e-4)
        assert got.kept_image_tokens == reference.kept_image_tokens
        assert got.core_neurons == reference.core_neurons
        assert cudart.copies_2d - before == 2 * layers * STEPS  # the prefix once, then one write per step
        # The decode contexts are bound once per request, the compacted weights to the ffn.* inputs that the full
        # ones (uploaded once) fill in prefill.
        assert sum(1 for g, p, _, _ in binds if p == 1) == decode_bindings
        ffn = {(p, n): ptr for g, p, n, ptr in binds if is_ffn(n) and g in STACKS}
        assert bool(ffn) == (mode == "cm")  # the dense build has no neuron-sparse layer
        assert all(ptr == backend._bound[n].ptr for (p, n), ptr in ffn.items() if p == 0)
        assert all(ptr != backend._bound[n].ptr for (p, n), ptr in ffn.items() if p == 1)
        # Only ids, positions and lengths go up (the pixels once), only logits and the prefill's results come down.
        moved = cudart.transfers[transfers:]
        pixels = prompt(manifest)[1].nbytes
        assert max(n for kind, n in moved if kind == "up") == pixels
        assert sorted({n for kind, n in moved if kind == "up"})[-2] <= prompt(manifest)[0].nbytes
        vocab = manifest.model.vocab_size * np.dtype(np.float32).itemsize
        features = manifest.model.num_image_tokens * manifest.model.hidden_size * np.dtype(np.float32).itemsize
        assert vocab in {n for kind, n in moved if kind == "down"}  # no cache entry ever comes back
        assert max(n for kind, n in moved if kind == "down") <= max(vocab, features)

    # The cache is sized for the request: one token more than it holds is refused, so is a longer request.
    ids, pixels, _ = prompt(manifest)
    backend.vision(pixels)
    backend.prefill(ids, 4, ids.shape[1] + 2)
    backend.decode(1)
    backend.decode(1)
    with pytest.raises(BackendError, match="outgrew the cache"):
        backend.decode(1)
    limit = manifest.max_sequence
    with pytest.raises(BackendError, match="cache positions"):
        backend.prefill(ids, 4, limit + 1)
    backend.prefill(ids, 4, limit)  # the build's longest sequence fits
    np.testing.assert_allclose(backend.image_features(), reference.image_features[None], atol=1e-5)
    backend.close()
    assert not cudart.blocks  # every device buffer was freed


@pytest.mark.slow
def test_profiles_are_enforced(
    cm_build: tuple[Path, Manifest], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cudart: FakeCudart
) -> None:
    """What the fakes check, as TensorRT does: a profile serves one live context; shapes stay in its ranges; on 8.6
    a context takes only its own profile's bindings."""
    build = Path(shutil.copytree(cm_build[0], tmp_path / "build"))
    manifest = engines_for(build, "8.6.1", monkeypatch)
    trt = fake_tensorrt("8.6.1", build, cudart)
    stack = next(g for g in manifest.graph_names if g in STACKS)
    plan = (build / manifest.engines.graphs[stack]).read_bytes()
    eng = trt.Runtime(None).deserialize_cuda_engine(plan)
    prefill = BindingsIO(trt, eng, stack, 0)
    decode = BindingsIO(trt, eng, stack, 1)
    with pytest.raises(BackendError, match="optimization profile 1"):  # profile 1 is decode's while it lives
        BindingsIO(trt, eng, stack, 1)
    with pytest.raises(BackendError, match="has 2 optimization profile"):
        BindingsIO(trt, eng, stack, 2)
    per = eng.num_bindings // 2
    assert eng.get_binding_name(per).endswith(" [profile 1]")
    past = next(n for n in decode.inputs if n.startswith("past."))
    assert decode._index(past) == prefill._index(past) + per
    low, _, high = decode.profile_shape(past)
    assert (low[2], high[2]) == (manifest.decode_dims["B"].min, manifest.decode_dims["B"].max)
    assert prefill.profile_shape(past)[2][2] == 1  # prefill: one masked slot
    with pytest.raises(BackendError, match="outside its optimization profile"):
        prefill.set_input_shape(past, low)  # a decode shape in the prefill profile
    decode.set_input_shape(past, high)
    assert not decode.context.set_binding_shape(prefill._index(past), high)  # another profile's binding
    del decode
    BindingsIO(trt, eng, stack, 1)  # free again once its context is gone


# -- the real thing -----------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_tensorrt_engines_match_onnxruntime(request: pytest.FixtureRequest, tmp_path: Path) -> None:
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
    build_engines(EngineConfig(build, workspace_mb=1024))
    manifest = buildformat.read(build)
    reference = traced(build, manifest, OrtBackend(build, manifest, "cpu"))  # ONNX Runtime's CPU provider
    with TrtBackend(build, manifest) as backend:
        got = traced(build, manifest, backend)
    assert got.tokens == reference.tokens
    assert got.kept_image_tokens == reference.kept_image_tokens
    np.testing.assert_allclose(got.logits[0], reference.logits[0], atol=1e-2)  # TF32 kernels
