"""The build format: the typed manifest's JSON round trip, its checks, and the packages' layering."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from fake_manifests import manifest_json, write_manifest

import buildformat
from buildformat import CoreMatchingInfo, Engines, Manifest, ManifestError

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("buildformat", "coreMatching", "export", "models", "runtime", "vqa")

CM = {
    "dense": False,
    "token_budget": 64,
    "token_ratio": 0.5,
    "neuron_ratio": 0.4,
    "prune_layer": 2,
    "neuron_layers": [3, 8],
    "tokens_per_neuron_set": 288,
    "core_neurons": 128,
    "neuron_chunks": 1,
    "auto_range": [16, 512],
    "token_selector": "core-coverage",
    "token_merge": "nearest",
    "seed": 0,
}
GRAPH = {
    "file": "decode.onnx",
    "external_data": "weights.bin",
    "inputs": [{"name": "past.0.key", "dtype": "float32", "shape": [1, 2, "B", 16]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, 8]}],
}


def full_json() -> dict:
    return manifest_json(
        corematching=CM,
        dims={"B": {"min": 17, "opt": 80, "max": 127}},
        graphs={"decode": GRAPH},
        weights={"file": "weights.bin", "graphs": {"decode.onnx": {"w": [64, "float32", [4, 8]]}}},
        engines={
            "tensorrt_version": "10.3.0",
            "api": "named-tensors",
            "fp16": True,
            "workspace_mb": 1024,
            "device": {"name": "Orin", "compute_capability": "8.7"},
            "graphs": {"decode": {"file": "engines/decode.plan"}},
            "note": "",
        },
        validation={"passed": True},
        build_seconds=12.5,
    )


def test_json_round_trip_keeps_every_field() -> None:
    data = full_json()
    manifest = Manifest.from_json(data)
    assert isinstance(manifest.corematching, CoreMatchingInfo) and manifest.corematching.neuron_layers == (3, 8)
    assert isinstance(manifest.engines, Engines) and manifest.engines.graphs == {"decode": "engines/decode.plan"}
    assert manifest.weights.graphs["decode.onnx"]["w"].shape == (4, 8)
    assert manifest.max_sequence == 128 and manifest.dim_range("decode", "past.0.key", 2) == (17, 127)
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert manifest.to_json()["corematching"] == CM
    dense = Manifest.from_json(manifest_json())
    assert dense.dense and dense.corematching is None and dense.to_json()["corematching"] == {"dense": True}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["model"].pop("hidden_size"), "model.hidden_size is missing"),
        (lambda d: d["model"].update(num_layers="4"), "model.num_layers has the wrong type"),
        (lambda d: d["corematching"].update(token_budget=0), "token_budget should be a positive integer or 'auto'"),
        (lambda d: d.update(precision="int3"), "precision is 'int3'"),
        (lambda d: d["dims"].update(B={"min": 9, "opt": 1, "max": 3}), "min <= opt <= max"),
        (lambda d: d["graphs"]["decode"]["inputs"].append({"name": "x"}), "without name, dtype and shape"),
    ],
)
def test_a_bad_field_is_named_in_one_line(change, message) -> None:
    data = full_json()
    change(data)
    with pytest.raises(ManifestError, match=message) as error:
        Manifest.from_json(data)
    assert "\n" not in str(error.value) and "rebuild" in str(error.value)


def test_read_checks_version_and_digest_and_verify_checks_files(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0" * 64)
    written = write_manifest(tmp_path, full_json(), record=["weights.bin"])
    assert buildformat.read(tmp_path) == written
    buildformat.verify(tmp_path, written)
    (tmp_path / "weights.bin").write_bytes(b"\1" * 64)
    with pytest.raises(ManifestError, match=r"weights\.bin does not match its sha256"):
        buildformat.verify(tmp_path, written)

    data = json.loads((tmp_path / "manifest.json").read_text())
    data["corematching"]["token_budget"] = 32
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="edited after the build"):
        buildformat.read(tmp_path)
    data["format_version"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"rebuild it with `python -m export build --out .* --force`"):
        buildformat.read(tmp_path)
    with pytest.raises(ManifestError, match="does not exist"):
        buildformat.read(tmp_path / "nowhere")


def test_runtime_and_buildformat_import_no_torch_transformers_or_export() -> None:
    modules = [f"runtime.{p.stem}" for p in (ROOT / "runtime").glob("*.py") if p.stem not in ("__init__", "__main__")]
    code = (
        f"import buildformat, runtime, {', '.join(modules)}, sys; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'export')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return found


def test_layering_holds_in_the_source() -> None:
    """runtime/ and buildformat/ never import export (not even lazily); no package imports another's _private."""
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for module, names in _imports(path):
                top = module.split(".")[0]
                if package in ("runtime", "buildformat"):
                    assert top not in ("export", "torch", "transformers", "coreMatching", "vqa"), (path, module)
                if package == "buildformat":
                    assert top not in ("runtime", "models"), (path, module)
                if top in PACKAGES and top != package:
                    private = [n for n in names if n.startswith("_")]
                    assert not private, f"{path.relative_to(ROOT)} imports {private} from {module}"
