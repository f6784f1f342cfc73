"""The TensorRT engine builder without TensorRT or a GPU: fake `tensorrt` modules and hand-made builds.

One test (marked gpu) builds real engines for the build named by COREMATCHING_TEST_BUILD.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from fake_manifests import manifest_json, write_manifest
from fake_tensorrt import fake_trt

from buildformat import MANIFEST, Dim, Manifest, ManifestError, read, sha256_file, verify, with_files, write
from export import engine
from export.engine import (
    GRAPHS,
    EngineBuildError,
    EngineConfig,
    EngineError,
    UnsupportedTensorRTError,
    build_engines,
    profiles_from_manifest,
    record_engines,
    trt_api,
)
from export.engine_cli import add_engine_parser, run_engine
from runtime import gpu
from runtime.gpu import DeviceInfo, NoGpuError

ROOT = Path(__file__).resolve().parents[1]
ORIN = DeviceInfo("Orin", "8.7")

# Inputs of each graph as the manifest lists them (the shapes of docs/architecture.md, tiny sizes).
INPUTS: dict[str, list[tuple[str, str, list[Any]]]] = {
    "vision": [("pixel_values", "float32", [1, 3, 32, 32])],
    "embed": [("input_ids", "int64", [1, "S"])],
    "prefill": [("inputs_embeds", "float32", [1, "S", 64]), ("image_start", "int64", [1])],
    "decode": [
        ("inputs_embeds", "float32", [1, 1, 64]),
        ("position_ids", "int64", [1, 1]),
        ("past_key_0", "float32", [1, 2, "P", 16]),
        ("past_key_3", "float32", [1, 2, "Q", 16]),
    ],
}
DIMS = {
    "S": {"min": 1, "opt": 40, "max": 128},
    "P": {"min": 1, "opt": 40, "max": 128},
    "Q": {"min": 0, "opt": 8, "max": 72},
}


def manifest_dict(**changes: Any) -> dict[str, Any]:
    """The manifest's JSON."""
    graphs = {
        g: {
            "file": f"{g}.onnx",
            "external_data": "decode.onnx.data" if g == "decode" else None,
            "inputs": [{"name": n, "dtype": t, "shape": s} for n, t, s in INPUTS[g]],
            "outputs": [{"name": "out", "dtype": "float32", "shape": [1, 8]}],
        }
        for g in GRAPHS
    }
    return manifest_json(**({"dims": DIMS, "graphs": graphs} | changes))


def make_build(tmp_path: Path, **changes: Any) -> Path:
    """A build directory whose .onnx files are JSON that the fake parser reads (network input shapes)."""
    build = tmp_path / "build"
    build.mkdir()
    manifest = manifest_dict(**changes)
    for entry in manifest["graphs"].values():
        shapes = {s["name"]: [-1 if isinstance(d, str) else d for d in s["shape"]] for s in entry["inputs"]}
        (build / entry["file"]).write_text(json.dumps({"inputs": shapes}))
    (build / "decode.onnx.data").write_bytes(b"\0" * 64)
    (build / "tokenizer.json").write_text("{}")
    write_manifest(build, manifest, [*(f"{g}.onnx" for g in GRAPHS), "decode.onnx.data", "tokenizer.json"])
    return build


@pytest.fixture
def with_trt(monkeypatch: pytest.MonkeyPatch):
    """Installs a fake tensorrt module and a fake GPU; returns a function that makes the module."""

    def install(*args: Any, device: DeviceInfo = ORIN, **kwargs: Any) -> types.ModuleType:
        trt = fake_trt(*args, **kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(engine, "detect_gpu", lambda: device)
        return trt

    return install


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="export")
    add_engine_parser(parser.add_subparsers(dest="command", required=True))
    return run_engine(parser.parse_args(["engine", *argv]))


def error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err


def snapshot(build: Path) -> dict[str, bytes]:
    return {str(p.relative_to(build)): p.read_bytes() for p in sorted(build.rglob("*")) if p.is_file()}


# --- configuration -------------------------------------------------------------------------------------------


def test_engine_config_defaults_and_validation(tmp_path: Path) -> None:
    config = EngineConfig(str(tmp_path))  # type: ignore[arg-type]
    assert config.build_dir == tmp_path and config.graphs == GRAPHS
    assert (config.fp16, config.workspace_mb, config.force) == (False, 4096, False)
    assert EngineConfig(tmp_path, graphs=["decode", "prefill"]).graphs == ("decode", "prefill")  # type: ignore[arg-type]
    for bad in (0, -5, True, "4096", 1.5):
        with pytest.raises(ValueError, match="workspace"):
            EngineConfig(tmp_path, workspace_mb=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown graph.*'lm_head'"):
        EngineConfig(tmp_path, graphs=("prefill", "lm_head"))
    with pytest.raises(ValueError, match="no graphs"):
        EngineConfig(tmp_path, graphs=())
    with pytest.raises(ValueError, match="twice"):
        EngineConfig(tmp_path, graphs=("decode", "decode"))


def test_profiles_from_manifest() -> None:
    manifest = Manifest.from_json(manifest_dict())
    assert profiles_from_manifest(manifest, "prefill") == {
        "inputs_embeds": ((1, 1, 64), (1, 40, 64), (1, 128, 64)),
        "image_start": ((1,), (1,), (1,)),
    }
    decode = profiles_from_manifest(manifest, "decode")
    assert decode["past_key_0"] == ((1, 2, 1, 16), (1, 2, 40, 16), (1, 2, 128, 16))
    assert decode["past_key_3"] == ((1, 2, 0, 16), (1, 2, 8, 16), (1, 2, 72, 16))  # an empty cache is allowed
    assert decode["position_ids"] == ((1, 1), (1, 1), (1, 1))
    assert profiles_from_manifest(manifest, "vision") == {"pixel_values": ((1, 3, 32, 32),) * 3}


def test_profiles_reject_unknown_or_bad_dims() -> None:
    data = manifest_dict()
    data["graphs"]["prefill"]["inputs"][0]["shape"] = [1, "T", 64]
    with pytest.raises(ManifestError, match="'T'"):
        profiles_from_manifest(Manifest.from_json(data), "prefill")
    with pytest.raises(ManifestError, match="min <= opt <= max"):
        Dim(64, 8, 128)  # a manifest with such a range does not parse
    data = manifest_dict()
    data["graphs"]["embed"]["inputs"][0]["shape"] = [1, -1]
    manifest = Manifest.from_json(data)
    with pytest.raises(ManifestError, match="invalid dimension -1"):
        profiles_from_manifest(manifest, "embed")
    with pytest.raises(ManifestError, match="no 'audio' graph"):
        profiles_from_manifest(manifest, "audio")


# --- the TensorRT API switch ---------------------------------------------------------------------------------


def namespace_trt(version: str, *, fp16: bool = True) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        __version__=version,
        NetworkDefinitionCreationFlag=types.SimpleNamespace(EXPLICIT_BATCH=0),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
        BuilderFlag=types.SimpleNamespace(FP16="FP16") if fp16 else types.SimpleNamespace(),
    )


def test_trt_api_86_uses_bindings_and_explicit_batch() -> None:
    for version in ("8.6.1", "8.6.2.3", "8.6.1.post1"):  # JetPack 6.0 ships 8.6.2
        api = trt_api(namespace_trt(version))
        assert (api.name, api.network_flags, api.major, api.minor) == ("bindings", 1, 8, 6)
        assert (api.workspace_pool, api.fp16_flag, api.version) == ("WORKSPACE", "FP16", version)


def test_trt_api_10_uses_named_tensors_and_no_flags() -> None:
    api = trt_api(namespace_trt("10.3.0"))
    assert (api.name, api.network_flags, api.fp16_flag) == ("named-tensors", 0, "FP16")
    api = trt_api(namespace_trt("11.4.0.106", fp16=False))  # 11 removed BuilderFlag.FP16 (strong typing)
    assert (api.name, api.network_flags, api.fp16_flag) == ("named-tensors", 0, None)


def test_trt_api_refuses_older_than_86() -> None:
    for version in ("8.5.3", "7.2.3", "nightly"):
        with pytest.raises(UnsupportedTensorRTError, match=r"8\.6 is the minimum"):
            trt_api(namespace_trt(version))


# --- no TensorRT, no GPU -------------------------------------------------------------------------------------


def test_cli_without_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    build = make_build(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    before = snapshot(build)
    assert cli(str(build)) == 2
    (line,) = error_lines(capsys)
    assert "TensorRT" in line and "8.6" in line and "10.x" in line and "JetPack" in line
    assert snapshot(build) == before


def test_cli_without_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    build = make_build(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt())

    def no_gpu() -> DeviceInfo:
        raise gpu.no_gpu_error("cudaGetDeviceCount: cudaErrorNoDevice, 0 device(s)")

    monkeypatch.setattr(engine, "detect_gpu", no_gpu)
    assert cli(str(build)) == 2
    (line,) = error_lines(capsys)
    assert "no CUDA GPU" in line and "cudaErrorNoDevice" in line
    assert not (build / "engines").exists()


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


def test_tensorrt_10_refuses_pascal(tmp_path: Path, with_trt, capsys) -> None:
    with_trt("10.3.0", device=DeviceInfo("NVIDIA TITAN Xp", "6.1"))
    assert cli(str(make_build(tmp_path))) == 2
    (line,) = error_lines(capsys)
    assert "TensorRT 10.3.0 does not support NVIDIA TITAN Xp" in line and "8.6" in line


# --- refusing builds -----------------------------------------------------------------------------------------


def test_refuses_tensorrt_incompatible_build(tmp_path: Path, with_trt, capsys) -> None:
    reason = "token_budget auto selects a data-dependent number of tokens (ONNX Runtime only)"
    build = make_build(tmp_path, tensorrt={"compatible": False, "reason": reason})
    trt = with_trt()
    with pytest.raises(EngineError, match="cannot run in TensorRT: token_budget auto"):
        build_engines(EngineConfig(build))
    assert cli(str(build)) == 2
    (line,) = error_lines(capsys)
    assert reason in line
    assert trt.calls["networks"] == [] and not (build / "engines").exists()


def test_refuses_tampered_graph(tmp_path: Path, with_trt, capsys) -> None:
    build = make_build(tmp_path)
    trt = with_trt()
    with (build / "decode.onnx.data").open("ab") as f:  # external data counts too
        f.write(b"x")
    with pytest.raises(ManifestError, match=r"decode\.onnx\.data does not match its sha256"):
        build_engines(EngineConfig(build, graphs=("decode",)))
    build_engines(EngineConfig(build, graphs=("prefill",)))  # only the graphs being built are hashed
    assert trt.calls["networks"]
    assert cli(str(build), "--graphs", "decode", "--force") == 2
    error_lines(capsys)


def test_cli_reports_bad_arguments_and_missing_build(tmp_path: Path, capsys) -> None:
    assert cli(str(tmp_path / "nope")) == 2
    (line,) = error_lines(capsys)
    assert "does not exist" in line
    assert cli(str(tmp_path), "--graphs", "prefill,lm_head") == 2
    (line,) = error_lines(capsys)
    assert "lm_head" in line
    assert cli(str(tmp_path), "--workspace", "0") == 2
    error_lines(capsys)


# --- the manifest update -------------------------------------------------------------------------------------


def fake_engines(build: Path, *graphs: str) -> dict[str, str]:
    (build / "engines").mkdir(exist_ok=True)
    for g in graphs:
        (build / "engines" / f"{g}.plan").write_bytes(f"engine {g}".encode())
    return {g: f"engines/{g}.plan" for g in graphs}


def record(build: Path, manifest: Manifest, files: dict[str, str], **changes: Any) -> Manifest:
    info: dict[str, Any] = dict(device=ORIN, tensorrt_version="10.3.0", api="named-tensors", fp16=True)
    info.update(changes)
    return record_engines(build, manifest, files, workspace_mb=2048, **info)


def test_record_engines_writes_section_and_hashes(tmp_path: Path) -> None:
    build = make_build(tmp_path)
    manifest = read(build)
    new = record(build, manifest, fake_engines(build, "prefill", "decode"))
    assert manifest.engines is None  # the caller's manifest is untouched (frozen)
    on_disk = read(build)
    assert on_disk == new
    assert on_disk.to_json()["engines"] == {
        "tensorrt_version": "10.3.0",
        "api": "named-tensors",
        "fp16": True,
        "workspace_mb": 2048,
        "device": {"name": "Orin", "compute_capability": "8.7"},
        "graphs": {"prefill": {"file": "engines/prefill.plan"}, "decode": {"file": "engines/decode.plan"}},
        "note": "an engine runs only on the GPU model and TensorRT version that built it",
    }
    assert on_disk.files["engines/decode.plan"] == sha256_file(build / "engines/decode.plan")
    verify(build, on_disk)  # every listed file, old and new, checks out
    assert [p.name for p in build.iterdir() if p.name.startswith(".")] == []  # no temporary manifest left


def test_record_engines_writes_nothing_on_failure(tmp_path: Path) -> None:
    build = make_build(tmp_path)
    before = (build / MANIFEST).read_bytes()
    with pytest.raises(ManifestError, match=r"engines/decode\.plan missing"):
        record(build, read(build), {"decode": "engines/decode.plan"})
    assert (build / MANIFEST).read_bytes() == before


def test_record_engines_keeps_only_engines_of_the_same_target(tmp_path: Path) -> None:
    build = make_build(tmp_path)
    record(build, read(build), fake_engines(build, "vision", "prefill"))
    # Same TensorRT, GPU and precision: rebuilding decode keeps vision and prefill listed.
    kept = record(build, read(build), fake_engines(build, "decode"))
    assert list(kept.engines.graphs) == ["vision", "prefill", "decode"]
    # Another TensorRT version: the older engines are unlisted, hashes included.
    other = record(build, read(build), fake_engines(build, "embed"), tensorrt_version="10.4.0")
    assert list(other.engines.graphs) == ["embed"]
    assert "engines/vision.plan" not in other.files and "engines/embed.plan" in other.files


# --- whole builds through a fake TensorRT --------------------------------------------------------------------


@pytest.mark.parametrize(("version", "api", "flags"), [("8.6.1", "bindings", 1), ("10.3.0", "named-tensors", 0)])
def test_build_engines_with_fake_tensorrt(tmp_path: Path, with_trt, version: str, api: str, flags: int) -> None:
    build = make_build(tmp_path)
    trt = with_trt(version)
    report = build_engines(EngineConfig(build, fp16=True, workspace_mb=512))
    assert (report.api, report.tensorrt_version, report.device) == (api, version, ORIN)
    assert set(report.engines) == set(GRAPHS)
    assert (build / "engines/decode.plan").read_bytes() == b"PLAN:inputs_embeds,position_ids,past_key_0,past_key_3"
    assert [n.flags for n in trt.calls["networks"]] == [flags] * 4
    configs = dict(zip(GRAPHS, trt.calls["configs"], strict=True))
    assert all(c.pools == {"WORKSPACE": 512 << 20} and c.flags == {"FP16"} for c in configs.values())
    assert configs["vision"].profiles == []  # static: TensorRT's own default profile
    (decode,) = configs["decode"].profiles
    assert decode.shapes == {  # only the dynamic inputs get shapes
        "past_key_0": ((1, 2, 1, 16), (1, 2, 40, 16), (1, 2, 128, 16)),
        "past_key_3": ((1, 2, 0, 16), (1, 2, 8, 16), (1, 2, 72, 16)),
    }
    manifest = read(build)
    assert manifest.engines.api == api and manifest.engines.fp16 is True
    verify(build, manifest)
    assert sorted(p.name for p in build.iterdir() if p.name.startswith(".")) == []


def test_cli_summary_and_force(tmp_path: Path, with_trt, capsys) -> None:
    build = make_build(tmp_path)
    with_trt()
    assert cli(str(build), "--graphs", "embed,prefill") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["graph", "engine", "size"]
    assert out[1].split()[:2] == ["embed", "engines/embed.plan"] and out[2].split()[0] == "prefill"
    assert "named-tensors" in out[3] and "Orin" in out[3]
    before = snapshot(build)
    assert cli(str(build), "--graphs", "prefill") == 2  # exists: refused without --force
    (line,) = error_lines(capsys)
    assert "engines/prefill.plan" in line and "--force" in line
    assert snapshot(build) == before
    assert cli(str(build), "--graphs", "prefill,decode", "--force") == 0  # replaces prefill beside embed
    assert list(read(build).engines.graphs) == ["embed", "prefill", "decode"]


def test_failed_build_leaves_nothing(tmp_path: Path, with_trt, capsys) -> None:
    build = make_build(tmp_path)
    with_trt(fail_at=3)  # prefill, after vision and embed succeeded
    before = snapshot(build)
    with pytest.raises(EngineBuildError, match="failed to build the prefill engine"):
        build_engines(EngineConfig(build))
    assert snapshot(build) == before and sorted(p.name for p in build.iterdir()) == sorted(before)
    with_trt(parse_ok=False)
    assert cli(str(build)) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: TensorRT could not parse vision.onnx (2 error(s))")
    assert err[1:] == ["  In node 7 (TopK): K = 4403 exceeds 3840", "  network has no outputs"]
    assert snapshot(build) == before


def test_graph_and_manifest_must_agree_on_dynamic_inputs(tmp_path: Path, with_trt) -> None:
    build = make_build(tmp_path)
    with_trt()
    (build / "embed.onnx").write_text(json.dumps({"inputs": {"input_ids": [1, -1], "attention_mask": [1, -1]}}))
    write(build, with_files(build, read(build), ["embed.onnx"]))
    with pytest.raises(EngineBuildError, match=r"not in the manifest: \['attention_mask'\]"):
        build_engines(EngineConfig(build, graphs=("embed",)))


def test_fp16_on_tensorrt_11_and_on_slow_fp16(tmp_path: Path, with_trt, caplog) -> None:
    build = make_build(tmp_path)
    with_trt("11.4.0", fp16_flag=False)
    with pytest.raises(EngineError, match="removed the fp16 builder flag"):
        build_engines(EngineConfig(build, fp16=True, graphs=("embed",)))
    with_trt("8.6.1", fast_fp16=False, device=DeviceInfo("NVIDIA TITAN Xp", "6.1"))
    with caplog.at_level("INFO", logger="export.engine"):
        report = build_engines(EngineConfig(build, fp16=True, graphs=("embed",)))
    assert report.api == "bindings"
    assert "TITAN Xp has no fast fp16" in caplog.text and "TensorRT 8.6.1 (bindings API)" in caplog.text
    assert "[1/1] embed engine built" in caplog.text


# --- torch-free, and one real build --------------------------------------------------------------------------


def test_engine_modules_import_no_torch() -> None:
    code = (
        "import export.engine, export.engine_cli, sys; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def _real_tensorrt() -> Any:
    try:
        return importlib.import_module("tensorrt")
    except (ImportError, OSError) as e:
        pytest.skip(f"TensorRT is not installed ({e})")


@pytest.mark.gpu
def test_real_engine_build(tmp_path: Path) -> None:
    trt = _real_tensorrt()
    try:
        device = engine.detect_gpu()
    except NoGpuError as e:
        pytest.skip(str(e))
    source = os.environ.get("COREMATCHING_TEST_BUILD")
    if not source:
        pytest.skip("set COREMATCHING_TEST_BUILD to a build directory (python -m export build) to build engines")
    build = Path(shutil.copytree(source, tmp_path / "build", ignore=shutil.ignore_patterns("engines")))
    manifest = read(build)
    files = {n: h for n, h in manifest.files.items() if not n.startswith("engines/")}
    write(build, manifest.with_(engines=None, files=files))
    report = build_engines(EngineConfig(build, workspace_mb=1024))
    manifest = read(build)
    verify(build, manifest)
    assert dict(manifest.engines.device) == device.as_dict()
    assert manifest.engines.tensorrt_version == trt.__version__
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    for graph, path in report.engines.items():
        engine_ = runtime.deserialize_cuda_engine(path.read_bytes())
        assert engine_ is not None, graph
        inputs = [i.name for i in manifest.graphs[graph].inputs]
        if report.api == "named-tensors":
            names = [engine_.get_tensor_name(i) for i in range(engine_.num_io_tensors)]
        else:
            names = [engine_.get_binding_name(i) for i in range(engine_.num_bindings)]
        assert set(inputs) <= set(names), graph
