"""The build format: the typed manifest's JSON round trip, its checks, and the graphs' declared names
(the packages' layering: tests/test_layering.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_manifests import manifest_json, write_manifest

import buildformat
from buildformat import (
    CoreMatchingInfo,
    Engines,
    Manifest,
    ManifestError,
    QuantizationChecks,
    SkippedValidation,
    ValidationRecord,
)

ROOT = Path(__file__).resolve().parents[1]

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

CASE = {
    "name": "example",
    "question": "What colour is the circle?",
    "prompt_tokens": 589,
    "steps": 32,
    "max_logit_diff": 9.5367431640625e-06,
    "tolerance": 0.0001,
    "max_vision_diff": 4.649162292480469e-06,
    "equal_tokens": 32,
    "kept_equal": True,
    "core_equal": True,
    "kept_overlap": 1.0,
    "core_overlap": 1.0,
    "kept_image_tokens": 64,
    "problems": [],
    "passed": True,
}
# The validation record as builds have written it (export/validate.py, export/validate_quant.py).
VALIDATION = {
    "passed": True,
    "reference": "coreMatching",
    "precision": "float32",
    "criteria": {
        "absolute": 0.0001,
        "relative": 0.0,
        "min_overlap": 1.0,
        "near_ties": False,
        "score_band": 0.0,
        "selection_slack": 1.0,
    },
    "optimization_level": "ORT_ENABLE_ALL",
    "cases": [
        CASE,
        CASE
        | {
            "name": "random",
            "kept_equal": None,
            "core_equal": None,
            "kept_overlap": None,
            "core_overlap": None,
            "kept_image_tokens": None,
        },
    ],
}
QUANTIZATION_CHECKS = {
    "weights": "int4",
    "block_size": 32,
    "validated_at": "accuracy level 1 (fp32 arithmetic), float32 criteria",
    "distance_to_float": [
        {
            "case": "example",
            "equal_tokens": 12,
            "steps": 32,
            "max_logit_diff": 0.25,
            "relative_logit_diff": 0.01,
            "first_token_equal": True,
        }
    ],
    "accuracy_level_4": [{"case": "example", "max_logit_diff": 0.5, "equal_tokens": 0, "steps": 32}],
}


def full_json() -> dict:
    return manifest_json(
        corematching=CM,
        dims={"B": {"min": 1, "opt": 1, "max": 1}},
        decode_dims={"B": {"min": 17, "opt": 80, "max": 127}},
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
        validation=VALIDATION,
        build_seconds=12.5,
    )


def test_json_round_trip_keeps_every_field() -> None:
    data = full_json()
    manifest = Manifest.from_json(data)
    assert isinstance(manifest.corematching, CoreMatchingInfo) and manifest.corematching.neuron_layers == (3, 8)
    assert isinstance(manifest.engines, Engines) and manifest.engines.graphs == {"decode": "engines/decode.plan"}
    assert manifest.weights.graphs["decode.onnx"]["w"].shape == (4, 8)
    assert manifest.max_sequence == 128  # the decode profile's cache, not the prefill's one masked slot
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert manifest.to_json()["corematching"] == CM
    dense = Manifest.from_json(manifest_json())
    assert dense.dense and dense.corematching is None and dense.to_json()["corematching"] == {"dense": True}


@pytest.mark.parametrize(
    "record",
    [VALIDATION, VALIDATION | {"quantization": QUANTIZATION_CHECKS}, {"passed": None, "skipped": "--no-validate"}],
    ids=["float", "quantized", "skipped"],
)
def test_validation_record_reads_and_writes_the_same_json(record) -> None:
    manifest = Manifest.from_json(manifest_json(validation=record))
    assert json.dumps(manifest.to_json()["validation"]) == json.dumps(record)  # same keys, same order
    assert Manifest.from_json(manifest.to_json()) == manifest
    validation = manifest.validation
    if "skipped" in record:
        assert validation == SkippedValidation("--no-validate") and validation.passed is None
        return
    assert isinstance(validation, ValidationRecord) and validation.passed is True
    assert [case.name for case in validation.cases] == ["example", "random"]
    assert validation.cases[1].kept_equal is None and validation.criteria.absolute == 1e-4
    if "quantization" in record:
        checks = validation.quantization
        assert isinstance(checks, QuantizationChecks) and checks.fast_accuracy_level == 4
        assert checks.distance_to_float[0].equal_tokens == 12 and checks.fast[0].max_logit_diff == 0.5
    assert Manifest.from_json(manifest_json()).validation is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v: v["cases"][0].pop("tolerance"), r"validation\.cases\.example\.tolerance is missing"),
        (lambda v: v["cases"][0].update(equal_tokens="32"), "equal_tokens has the wrong type"),
        (lambda v: v["cases"][0].update(problems=["logits differ"]), r"example\.passed disagrees"),
        (lambda v: v.update(reference="onnx"), "reference is 'onnx'"),
        (lambda v: v["criteria"].update(min_overlap=2.0), r"min_overlap is 2\.0"),
        (lambda v: v.update(cases=[]), r"validation\.cases is empty"),
    ],
)
def test_a_bad_validation_field_is_named_in_one_line(change, message) -> None:
    record = json.loads(json.dumps(VALIDATION))
    change(record)
    with pytest.raises(ManifestError, match=message) as error:
        Manifest.from_json(manifest_json(validation=record))
    assert "\n" not in str(error.value) and "rebuild" in str(error.value)


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


def test_graph_names_are_the_ones_builds_carry() -> None:
    """The one declaration of the graphs' input and output names (export and runtime both read it), held to
    the literal names that existing builds and docs/architecture.md use."""
    from buildformat import names

    assert names.cache_name(names.PAST, 3, "key") == "past.3.key"
    assert names.past_name("new.3.value") == "past.3.value" and names.new_name("past.3.key") == "new.3.key"
    assert names.cache_names(names.NEW, [0, 1]) == ["new.0.key", "new.0.value", "new.1.key", "new.1.value"]
    assert names.ffn_name(5, "down_t") == "ffn.5.down_t" and names.ffn_layer("ffn.12.gate_t.q") == 12
    assert (
        names.compact_name("ffn.5.up_t.q") == "compact.5.up_t.q" and names.bound_name("compact.5.up_t") == "ffn.5.up_t"
    )
    assert names.is_ffn("ffn.5.up_t.scale") and not names.is_ffn("logits")
    assert names.core_neurons_name(7) == "core_neurons.7" and names.core_neurons_layer("core_neurons.7") == 7
    assert (names.VISION.inputs, names.VISION.outputs) == (("pixel_values",), ("image_features",))
    assert names.STEP_INPUTS == ("input_ids", "position_ids", "past_length")
    assert names.graph_set(True, False) == ("vision", "decoder")
    assert names.graph_set(False, True) == ("vision", "lower", "select", "upper", "neurons")
    lower = names.stack_names(
        [0, 1], embeds=True, head=False, merge=False, bound_layers=[1], act_layers=[1], attention_layer=1
    )
    assert lower.inputs[:5] == ("input_ids", "image_features", "image_start", "position_ids", "past_length")
    assert lower.inputs[-3:] == ("ffn.1.gate", "ffn.1.up", "ffn.1.down_t")
    assert lower.outputs == ("hidden", "new.0.key", "new.0.value", "new.1.key", "new.1.value", "act.1", "attn_last.1")
    upper = names.stack_names(
        [2], embeds=False, head=True, merge=True, bound_layers=[], act_layers=[], attention_layer=None
    )
    assert upper.inputs == (
        "hidden",
        "position_ids",
        "past_length",
        "image_start",
        "kept_bias",
        "past.2.key",
        "past.2.value",
    )
    assert upper.outputs == ("logits", "new.2.key", "new.2.value")
    assert (names.IMAGE_START, names.KEPT_IMAGE_TOKENS, names.KEPT_BIAS) == (
        "image_start",
        "kept_image_tokens",
        "kept_bias",
    )
