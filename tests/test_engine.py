"""The TensorRT engine builder without TensorRT or a GPU: fake `tensorrt` modules and hand-made builds.

The builds are format 4 (tests/fake_manifests_v4.py): one engine per graph, the decoder stacks' with a
prefill and a decode optimization profile. One test (marked gpu) builds real engines for the build named by
COREMATCHING_TEST_BUILD.
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
from fake_manifests_v4 import make_build, manifest_v4_json
from fake_tensorrt import fake_trt, plan_json

from buildformat import MANIFEST, Dim, Manifest, ManifestError, read, sha256_file, verify, with_files, write
from export import engine
from export.engine import (
    KNOWN_GRAPHS,
    EngineBuildError,
    EngineConfig,
    EngineError,
    UnsupportedTensorRTError,
    build_engines,
    engine_profiles,
    profiles_from_manifest,
    record_engines,
    trt_api,
)
from export.engine_cli import add_engine_parser, run_engine
from runtime import gpu
from runtime.gpu import DeviceInfo, NoGpuError

ROOT = Path(__file__).resolve().parents[1]
ORIN = DeviceInfo("Orin", "8.7")
CM_GRAPHS = ("vision", "lower", "select", "upper", "neurons")


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
    assert config.build_dir == tmp_path and config.graphs is None  # every graph of the build
    assert (config.fp16, config.workspace_mb, config.force) == (False, 4096, False)
    assert EngineConfig(tmp_path, graphs=["upper", "lower"]).graphs == ("upper", "lower")  # type: ignore[arg-type]
    for bad in (0, -5, True, "4096", 1.5):
        with pytest.raises(ValueError, match="workspace"):
            EngineConfig(tmp_path, workspace_mb=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown graph.*'lm_head'"):
        EngineConfig(tmp_path, graphs=("lower", "lm_head"))
    with pytest.raises(ValueError, match=r"unknown graph.*'prefill'"):  # the format-3 graphs are gone
        EngineConfig(tmp_path, graphs=("prefill",))
    with pytest.raises(ValueError, match="no graphs"):
        EngineConfig(tmp_path, graphs=())
    with pytest.raises(ValueError, match="twice"):
        EngineConfig(tmp_path, graphs=("upper", "upper"))
    # Which graphs: the build's, in its (prefill) order.
    manifest = Manifest.from_json(manifest_v4_json())
    assert EngineConfig(tmp_path).graphs_of(manifest) == CM_GRAPHS
    assert EngineConfig(tmp_path, graphs=("upper", "vision")).graphs_of(manifest) == ("vision", "upper")
    with pytest.raises(ManifestError, match="no 'decoder' graph"):
        EngineConfig(tmp_path, graphs=("decoder",)).graphs_of(manifest)
    assert set(KNOWN_GRAPHS) == {"vision", "decoder", *CM_GRAPHS}


def test_stacks_get_a_prefill_and_a_decode_profile() -> None:
    manifest = Manifest.from_json(manifest_v4_json())
    lower = engine_profiles(manifest, "lower")
    assert list(lower) == ["prefill", "decode"]  # TensorRT numbers them in this order: the runtime selects 0, 1
    assert lower["prefill"]["input_ids"] == ((1, 17), (1, 20), (1, 64))  # the prompt
    assert lower["prefill"]["past.0.key"] == ((1, 2, 1, 16),) * 3  # one masked slot
    assert lower["decode"]["input_ids"] == ((1, 1),) * 3  # one token
    assert lower["decode"]["past.1.value"] == ((1, 2, 17, 16), (1, 2, 52, 16), (1, 2, 127, 16))  # the cache
    assert lower["decode"]["image_features"] == ((1, 16, 64),) * 3  # static: the same in both
    upper = engine_profiles(manifest, "upper")
    assert upper["prefill"]["hidden"] == ((1, 6, 64), (1, 9, 64), (1, 53, 64))  # the kept tokens
    assert upper["prefill"]["ffn.2.gate"] == ((128, 64),) * 3  # every neuron
    assert upper["decode"]["ffn.2.down_t"] == ((32, 64),) * 3  # the request's core neurons
    assert upper["decode"]["past.2.key"] == ((1, 2, 6, 16), (1, 2, 41, 16), (1, 2, 116, 16))
    for graph in ("vision", "select", "neurons"):  # prefill only: one profile, the manifest's dims
        assert list(engine_profiles(manifest, graph)) == ["prefill"]
    assert engine_profiles(manifest, "neurons")["prefill"]["ffn.2.up"] == ((128, 64),) * 3
    assert profiles_from_manifest(manifest, "vision") == {"pixel_values": ((1, 3, 32, 32),) * 3}
    dense = Manifest.from_json(manifest_v4_json(dense=True))
    assert list(engine_profiles(dense, "decoder")) == ["prefill", "decode"]
    assert engine_profiles(dense, "decoder")["decode"]["past.3.key"][2] == (1, 2, 127, 16)


def test_profiles_reject_unknown_or_bad_dims() -> None:
    data = manifest_v4_json()
    data["graphs"]["select"]["inputs"][0]["shape"] = [1, "T", 64]
    with pytest.raises(ManifestError, match="'T'"):
        profiles_from_manifest(Manifest.from_json(data), "select")
    with pytest.raises(ManifestError, match="min <= opt <= max"):
        Dim(64, 8, 128)  # a manifest with such a range does not parse
    data = manifest_v4_json()
    data["graphs"]["lower"]["inputs"][0]["shape"] = [1, -1]
    manifest = Manifest.from_json(data)
    with pytest.raises(ManifestError, match="invalid dimension -1"):
        engine_profiles(manifest, "lower")
    with pytest.raises(ManifestError, match="no 'audio' graph"):
        profiles_from_manifest(manifest, "audio")
    no_decode = Manifest.from_json(manifest_v4_json()).with_(decode_dims={})
    with pytest.raises(ManifestError, match="no decode_dims for the decode profile of upper"):
        engine_profiles(no_decode, "upper")
    assert list(engine_profiles(no_decode, "select")) == ["prefill"]  # prefill-only graphs need none


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
    with (build / "lower.onnx").open("ab") as f:
        f.write(b" ")
    with pytest.raises(ManifestError, match=r"lower\.onnx does not match its sha256"):
        build_engines(EngineConfig(build, graphs=("lower",)))
    build_engines(EngineConfig(build, graphs=("select",)))  # only the graphs being built are hashed
    assert trt.calls["networks"]
    with (build / "weights.bin").open("ab") as f:  # the weights every graph reads count too
        f.write(b"x")
    assert cli(str(build), "--graphs", "select", "--force") == 2
    (line,) = error_lines(capsys)
    assert "weights.bin does not match its sha256" in line


def test_refuses_graphs_the_build_lacks(tmp_path: Path, with_trt, capsys) -> None:
    build = make_build(tmp_path, dense=True)
    trt = with_trt()
    assert cli(str(build), "--graphs", "vision,upper") == 2
    (line,) = error_lines(capsys)
    assert "no 'upper' graph" in line and "vision, decoder" in line
    assert trt.calls["networks"] == []


def test_refuses_a_manifest_without_decode_dims(tmp_path: Path, with_trt) -> None:
    build = make_build(tmp_path, decode_dims={})
    trt = with_trt()
    with pytest.raises(ManifestError, match="no decode_dims"):
        build_engines(EngineConfig(build))
    assert trt.calls["networks"] == [] and not (build / "engines").exists()


def test_cli_reports_bad_arguments_and_missing_build(tmp_path: Path, capsys) -> None:
    assert cli(str(tmp_path / "nope")) == 2
    (line,) = error_lines(capsys)
    assert "does not exist" in line
    assert cli(str(tmp_path), "--graphs", "lower,lm_head") == 2
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
    profiles = {g: ("prefill", "decode") if g in ("lower", "upper") else ("prefill",) for g in files}
    return record_engines(build, manifest, files, workspace_mb=2048, profiles=profiles, **info)


def test_record_engines_writes_section_and_hashes(tmp_path: Path) -> None:
    build = make_build(tmp_path)
    manifest = read(build)
    new = record(build, manifest, fake_engines(build, "upper", "lower"))
    assert manifest.engines is None  # the caller's manifest is untouched (frozen)
    on_disk = read(build)
    assert on_disk == new
    assert on_disk.to_json()["engines"] == {
        "tensorrt_version": "10.3.0",
        "api": "named-tensors",
        "fp16": True,
        "workspace_mb": 2048,
        "device": {"name": "Orin", "compute_capability": "8.7"},
        "graphs": {  # in the build's order
            "lower": {"file": "engines/lower.plan", "profiles": ["prefill", "decode"]},
            "upper": {"file": "engines/upper.plan", "profiles": ["prefill", "decode"]},
        },
        "note": "an engine runs only on the GPU model and TensorRT version that built it",
    }
    assert on_disk.engines.profiles["upper"] == ("prefill", "decode")
    assert on_disk.files["engines/upper.plan"] == sha256_file(build / "engines/upper.plan")
    verify(build, on_disk)  # every listed file, old and new, checks out
    assert [p.name for p in build.iterdir() if p.name.startswith(".")] == []  # no temporary manifest left


def test_record_engines_writes_nothing_on_failure(tmp_path: Path) -> None:
    build = make_build(tmp_path)
    before = (build / MANIFEST).read_bytes()
    with pytest.raises(ManifestError, match=r"engines/upper\.plan missing"):
        record(build, read(build), {"upper": "engines/upper.plan"})
    assert (build / MANIFEST).read_bytes() == before


def test_record_engines_keeps_only_engines_of_the_same_target(tmp_path: Path) -> None:
    build = make_build(tmp_path)
    record(build, read(build), fake_engines(build, "vision", "lower"))
    # Same TensorRT, GPU and precision: rebuilding upper keeps vision and lower listed, with their profiles.
    kept = record(build, read(build), fake_engines(build, "upper"))
    assert list(kept.engines.graphs) == ["vision", "lower", "upper"]
    assert kept.engines.profiles["lower"] == ("prefill", "decode")
    # Another TensorRT version: the older engines are unlisted, hashes included.
    other = record(build, read(build), fake_engines(build, "select"), tensorrt_version="10.4.0")
    assert list(other.engines.graphs) == ["select"] and list(other.engines.profiles) == ["select"]
    assert "engines/vision.plan" not in other.files and "engines/select.plan" in other.files


# --- whole builds through a fake TensorRT --------------------------------------------------------------------


@pytest.mark.parametrize(("version", "api", "flags"), [("8.6.1", "bindings", 1), ("10.3.0", "named-tensors", 0)])
def test_build_engines_with_fake_tensorrt(tmp_path: Path, with_trt, version: str, api: str, flags: int) -> None:
    build = make_build(tmp_path)
    trt = with_trt(version)
    report = build_engines(EngineConfig(build, fp16=True, workspace_mb=512))
    assert (report.api, report.tensorrt_version, report.device) == (api, version, ORIN)
    assert tuple(report.engines) == CM_GRAPHS  # one engine per graph, in prefill order
    assert [n.flags for n in trt.calls["networks"]] == [flags] * len(CM_GRAPHS)
    configs = dict(zip(CM_GRAPHS, trt.calls["configs"], strict=True))
    assert all(c.pools == {"WORKSPACE": 512 << 20} and c.flags == {"FP16"} for c in configs.values())
    assert configs["vision"].profiles == []  # static: TensorRT's own default profile
    assert [len(configs[g].profiles) for g in CM_GRAPHS[1:]] == [2, 1, 2, 1]  # the stacks serve both phases
    prefill, decode = configs["upper"].profiles
    manifest = read(build)
    dynamic = {s.name for s in manifest.graphs["upper"].inputs if any(isinstance(d, str) for d in s.shape)}
    assert set(prefill.shapes) == set(decode.shapes) == dynamic  # only the dynamic inputs get shapes, in both
    assert prefill.shapes["past.3.value"] == ((1, 2, 1, 16),) * 3
    assert decode.shapes["past.3.value"] == ((1, 2, 6, 16), (1, 2, 41, 16), (1, 2, 116, 16))
    assert decode.shapes["ffn.2.gate"] == ((32, 64),) * 3 and prefill.shapes["ffn.2.gate"] == ((128, 64),) * 3
    plan = plan_json((build / "engines/upper.plan").read_bytes())  # the fake plan keeps what it was built with
    assert plan["file"] == "upper.onnx" and len(plan["profiles"]) == 2
    assert manifest.engines.api == api and manifest.engines.fp16 is True
    assert manifest.engines.profiles == {
        "vision": ("prefill",),
        "lower": ("prefill", "decode"),
        "select": ("prefill",),
        "upper": ("prefill", "decode"),
        "neurons": ("prefill",),
    }
    verify(build, manifest)
    assert sorted(p.name for p in build.iterdir() if p.name.startswith(".")) == []


def test_dense_and_static_neuron_builds(tmp_path: Path, with_trt) -> None:
    with_trt()
    dense = build_engines(EngineConfig(make_build(tmp_path / "dense", dense=True)))
    assert dense.profiles == {"vision": ("prefill",), "decoder": ("prefill", "decode")}
    static = make_build(tmp_path / "static", per_request_neurons=False)
    assert tuple(build_engines(EngineConfig(static)).engines) == ("vision", "lower", "select", "upper")


def test_cli_summary_and_force(tmp_path: Path, with_trt, capsys) -> None:
    build = make_build(tmp_path)
    with_trt()
    assert cli(str(build), "--graphs", "upper,select") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["graph", "engine", "size", "profiles"]
    assert out[1].split()[:2] == ["select", "engines/select.plan"] and out[1].split()[-1] == "prefill"
    assert out[2].split()[0] == "upper" and out[2].split()[-1] == "prefill,decode"
    assert "named-tensors" in out[3] and "Orin" in out[3]
    before = snapshot(build)
    assert cli(str(build), "--graphs", "upper") == 2  # exists: refused without --force
    (line,) = error_lines(capsys)
    assert "engines/upper.plan" in line and "--force" in line
    assert snapshot(build) == before
    assert cli(str(build), "--graphs", "upper,lower", "--force") == 0  # replaces upper beside select
    assert list(read(build).engines.graphs) == ["lower", "select", "upper"]


def test_failed_build_leaves_nothing(tmp_path: Path, with_trt, capsys) -> None:
    build = make_build(tmp_path)
    with_trt(fail_at=3)  # select, after vision and lower succeeded
    before = snapshot(build)
    with pytest.raises(EngineBuildError, match="failed to build the select engine"):
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
    inputs = {"hidden": [1, -1, 64], "act.1": [-1, 128], "image_start": [1], "attention_mask": [1, -1]}
    (build / "select.onnx").write_text(json.dumps({"inputs": inputs}))
    write(build, with_files(build, read(build), ["select.onnx"]))
    with pytest.raises(EngineBuildError, match=r"not in the manifest: \['attention_mask'\]"):
        build_engines(EngineConfig(build, graphs=("select",)))


def test_fp16_on_tensorrt_11_and_on_slow_fp16(tmp_path: Path, with_trt, caplog) -> None:
    build = make_build(tmp_path)
    with_trt("11.4.0", fp16_flag=False)
    with pytest.raises(EngineError, match="removed the fp16 builder flag"):
        build_engines(EngineConfig(build, fp16=True, graphs=("select",)))
    with_trt("8.6.1", fast_fp16=False, device=DeviceInfo("NVIDIA TITAN Xp", "6.1"))
    with caplog.at_level("INFO", logger="export.engine"):
        report = build_engines(EngineConfig(build, fp16=True, graphs=("upper",)))
    assert report.api == "bindings"
    assert "TITAN Xp has no fast fp16" in caplog.text and "TensorRT 8.6.1 (bindings API)" in caplog.text
    assert "[1/1] building upper engine (fp16, prefill: " in caplog.text and "; decode: " in caplog.text
    assert "[1/1] upper engine built" in caplog.text


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
        assert engine_.num_optimization_profiles == len(report.profiles[graph]), graph  # stacks: prefill, decode
        inputs = [i.name for i in manifest.graphs[graph].inputs]
        if report.api == "named-tensors":
            names = [engine_.get_tensor_name(i) for i in range(engine_.num_io_tensors)]
        else:
            names = [engine_.get_binding_name(i) for i in range(engine_.num_bindings)]
        assert set(inputs) <= set(names), graph
