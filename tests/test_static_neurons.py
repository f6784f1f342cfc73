"""A static neuron set: calibration, the narrowed reference, the build that bakes it, its errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CM, make_inputs, tiny_model

from buildformat import read
from coreMatching import ConfigError, CoreMatchingConfig, CoreMatchingLlava
from coreMatching.layers import CompactFFN
from coreMatching.static_neurons import StaticNeurons, calibrate, narrow_ffn_, per_request_off
from export.__main__ import main
from export.config import ExportConfig


def test_from_counts_keeps_the_most_frequent_with_ties_to_the_lower_index() -> None:
    counts = {3: torch.tensor([1, 5, 5, 0, 5, 2]), 4: torch.tensor([0, 0, 0, 0, 0, 0])}
    static = StaticNeurons.from_counts(counts, 3, prompts=5, calibration="test")
    assert static.neurons == {3: (1, 2, 4), 4: (0, 1, 2)}
    assert static.layers == [3, 4] and static.size == 3
    assert static.coverage() == {3: 15 / 18, 4: 1.0}
    again = StaticNeurons.from_json(json.loads(json.dumps(static.to_json())))
    assert again == static


@pytest.mark.parametrize(
    ("neurons", "message"),
    [
        ({}, "at least one layer"),
        ({1: (0, 1), 2: (0,)}, "same count"),
        ({1: (2, 1)}, "ascending"),
        ({1: (0, 9)}, "below"),
    ],
)
def test_a_malformed_set_is_refused(neurons, message) -> None:
    with pytest.raises(ConfigError, match=message):
        StaticNeurons(neurons=neurons, intermediate_size=8, prompts=1, calibration="x")


def test_an_empty_neuron_range_selects_no_neurons_per_request() -> None:
    budgets = CoreMatchingConfig(neuron_layers=(3, 3)).resolve(
        num_layers=8, intermediate_size=512, num_image_tokens=576
    )
    assert budgets.neuron_sparse_layers == [] and not budgets.is_neuron_sparse(3)
    with pytest.raises(ConfigError, match="start <= stop"):
        CoreMatchingConfig(neuron_layers=(4, 3))
    paper = CoreMatchingConfig().resolve(num_layers=32, intermediate_size=11008, num_image_tokens=576)
    assert paper.narrowable_layers == list(range(6, 27))  # the prune layer (2) is not among them
    assert paper.core_neurons == 4404
    assert paper.static_width(1, 1.0) == 4404 and paper.static_width(32, 1.0) == 4416  # int4: whole blocks
    assert paper.static_width() == 5505 and paper.static_width(32) == 5536  # the default ratio: ceil(1.25 N)
    early = CoreMatchingConfig(prune_layer=6).resolve(num_layers=32, intermediate_size=11008, num_image_tokens=576)
    assert early.narrowable_layers == list(range(7, 27))


def _narrowed(neurons: dict[int, tuple[int, ...]]):
    from models.presets import build_random_model

    model = build_random_model("tiny-llama", seed=0)
    d_ff = model.config.text_config.intermediate_size
    return model, narrow_ffn_(model, StaticNeurons(neurons=neurons, intermediate_size=d_ff, prompts=1, calibration="x"))


def test_narrowing_computes_the_compacted_ffn_of_the_same_neurons() -> None:
    full = tiny_model("tiny-llama")
    kept = tuple(range(0, full.config.text_config.intermediate_size, 3))
    _, narrowed = _narrowed({2: kept})
    x = torch.randn(1, 5, full.config.text_config.hidden_size)
    mlp = full.model.language_model.layers[2].mlp
    compact = CompactFFN.gather(mlp, torch.tensor(kept))
    small = narrowed.model.language_model.layers[2].mlp
    assert small.gate_proj.weight.shape[0] == len(kept)
    assert torch.equal(small(x), compact(x, mlp.act_fn))
    with pytest.raises(ConfigError, match="already narrowed"):
        narrow_ffn_(narrowed, StaticNeurons({2: kept}, full.config.text_config.intermediate_size, 1, "x"))


def test_calibration_counts_the_per_request_core_neurons() -> None:
    model = tiny_model("tiny-llama")
    config = CoreMatchingConfig(token_budget=5, prune_layer=1, neuron_layers=(1, 3))
    reference = CoreMatchingLlava(model, config)
    prompts = [make_inputs(model, seed=s) for s in range(3)]
    static = calibrate(reference, prompts, [2], size=7, calibration="three prompts", criterion="frequency")
    budgets = reference.budgets(int(prompts[0][0].eq(model.config.image_token_id).sum()))
    assert static.prompts == 3 and static.size == 7 and static.criterion == "frequency"
    assert sum(static.counts[2]) == 3 * budgets.core_neurons  # every prompt counts its N core neurons once
    per_prompt = [set(reference.prefill(*p).core_neurons[2].tolist()) for p in prompts]
    common = set.intersection(*per_prompt)
    assert all(static.counts[2][i] == 3 for i in common)

    # The narrowed model without per-request neurons runs the static set in prefill and decoding.
    _, narrowed_model = _narrowed(dict(static.neurons))
    off = per_request_off(config, budgets)
    narrowed = CoreMatchingLlava(narrowed_model, off).generate(*prompts[0], max_new_tokens=3, stop_at_eos=False)
    assert narrowed.core_neurons == {} and len(narrowed.tokens) == 3


@pytest.fixture(scope="module")
def static_build(checkpoint, tmp_path_factory):
    from export.build import build

    out = tmp_path_factory.mktemp("static") / "build"
    config = ExportConfig(
        out=out,
        model_dir=checkpoint("llama"),
        corematching=CM,
        max_prompt_tokens=64,
        max_sequence=128,
        static_neurons=True,
        calibration_count=3,
    )
    return build(config)


def test_a_static_build_validates_and_takes_no_compacted_ffn(static_build, built) -> None:
    report = static_build.validation
    assert report.passed, report.to_json()
    assert all(case.equal_tokens == 32 and case.max_logit_diff <= 1e-4 for case in report.cases)
    manifest = read(static_build.out)
    record = manifest.static_neurons
    assert record is not None and record.prompts == 3 and record.calibration.startswith("shapes validation")
    static = StaticNeurons.load(static_build.out / record.file)
    assert tuple(static.layers) == record.layers == (2,) and static.size == record.neurons
    assert manifest.corematching.neuron_layers[0] == manifest.corematching.neuron_layers[1]  # none per request
    assert manifest.graph_names == ("vision", "lower", "select", "upper")  # no neurons graph: nothing per request
    for stack in ("lower", "upper"):
        assert not any(spec.name.startswith("ffn.") for spec in manifest.graph(stack).inputs)
    assert not manifest.weights.bound
    per_request = built("llama", "cm")
    assert (static_build.out / "weights.bin").stat().st_size < (per_request.out / "weights.bin").stat().st_size
    assert manifest.flops.decode_corematching < per_request.manifest.flops.decode_dense


def test_a_static_build_is_answered_by_the_runtime_and_validated_again(static_build, capsys) -> None:
    from PIL import Image

    from runtime import Pipeline

    pipeline = Pipeline.load(static_build.out, provider="cpu")
    answer = pipeline.answer(Image.new("RGB", (64, 64), "red"), "What colour is it?", max_new_tokens=4)
    assert len(answer.kept_image_tokens) == 5 and len(answer.token_ids) >= 1
    assert main(["validate", str(static_build.out)]) == 0  # the model is narrowed again from the build's set
    assert "passed" in capsys.readouterr().out


def test_plan_of_a_static_build_is_the_static_plan(static_build) -> None:
    from planner.plan import plan_build, plan_manifest

    manifest = read(static_build.out)
    source = manifest.model.source
    got = plan_manifest(manifest, model=source, max_sequence=128, prompt_tokens=40)
    common = {"weights": "fp32", "activations": "fp32", "token_budget": 5, "max_sequence": 128, "prompt_tokens": 40}
    assert got == plan_build(source, neurons="static", **common)
    assert got.weights_stored < plan_build(source, neurons="per-request", **common).weights_stored


def test_calibration_from_a_jsonl_file(checkpoint, tmp_path) -> None:
    from PIL import Image

    from export.build import build

    Image.new("RGB", (32, 32), "blue").save(tmp_path / "a.png")
    lines = [{"image": "a.png", "question": "What colour is it?"}, {"image": "a.png", "question": "Is it a circle?"}]
    data = tmp_path / "calibration.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = ExportConfig(
        out=tmp_path / "build",
        model_dir=checkpoint("llama"),
        corematching=CM,
        max_prompt_tokens=64,
        max_sequence=128,
        static_neurons=True,
        calibration=data,
        validate=False,
    )
    result = build(config)
    assert result.manifest.static_neurons.prompts == 2
    assert result.manifest.static_neurons.calibration == "calibration.jsonl, first 2"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dense", "--static-neurons"], "drop --dense"),
        (["--calibration", "x.jsonl"], "add --static-neurons"),
        (["--static-neurons", "--calibration-count", "0"], "at least 1"),
        (["--static-neurons", "--calibration", "missing.jsonl"], "missing.jsonl: no such file"),
        (["--static-criterion", "frequency"], "add --static-neurons"),  # not the default criterion
        (["--static-width-ratio", "1.5"], "add --static-neurons"),
        (["--static-neurons", "--static-width-ratio", "0.5"], "pass --static-width-ratio between 1"),
    ],
)
def test_static_flag_errors_are_one_line(flags, message, tmp_path, capsys) -> None:
    code = main(["build", "--out", str(tmp_path / "b"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_an_int4_static_build_is_tensorrt_compatible(checkpoint, tmp_path) -> None:
    """Nothing is gathered per request, so no nibble unpacking (BitShift) and whole int4 blocks."""
    from export.build import build

    config = ExportConfig(
        out=tmp_path / "build",
        model_dir=checkpoint("llama"),
        corematching=CM,
        weights="int4",
        block_size=16,
        max_prompt_tokens=64,
        max_sequence=128,
        static_neurons=True,
        calibration_count=2,
    )
    result = build(config)
    assert result.validation.passed, result.validation.to_json()
    manifest = result.manifest
    assert manifest.tensorrt_compatible, manifest.tensorrt_reason
    assert manifest.static_neurons.neurons % 16 == 0 and manifest.quantization.kept_float == 0
    assert any(entry.dtype == "int4" for entry in manifest.weights.graphs["upper.onnx"].values())  # views, not copies
