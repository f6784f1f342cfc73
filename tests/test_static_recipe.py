"""A static neuron set's recipe: the fluctuation criterion, the width ratio, the calibration prompts, the flags."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CM, make_inputs, tiny_model

from coreMatching import ConfigError, CoreMatchingConfig, CoreMatchingLlava
from coreMatching.config import DEFAULT_STATIC_WIDTH_RATIO
from coreMatching.static_neurons import (
    CRITERIA,
    DEFAULT_STATIC_CRITERION,
    StaticNeurons,
    StaticRecipe,
    calibrate,
)
from export.__main__ import STATIC_CRITERIA, main
from export.calibration import CALIBRATION_START, calibration_items
from export.config import ExportConfig
from vqadata.data import shapes_items

REPO = Path(__file__).resolve().parent.parent
LAYER = 2  # the tiny model's narrowable layer under CALIBRATE (neuron layers 1..2, prune layer 1)
CALIBRATE = CoreMatchingConfig(token_budget=5, prune_layer=1, neuron_layers=(1, 3))


def _down_projs(model) -> list:
    return [layer.mlp.down_proj for layer in model.model.language_model.layers]


def test_fluctuation_keeps_the_largest_activation_variance_times_the_down_column_norm() -> None:
    model = tiny_model("tiny-llama")
    reference = CoreMatchingLlava(model, CALIBRATE)
    prompts = [make_inputs(model, seed=s) for s in range(3)]
    down = _down_projs(model)[LAYER]
    seen: list[np.ndarray] = []  # each prefill's FFN activation of the layer: [T, D]
    handle = down.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0].double().cpu().numpy().copy()))
    try:
        for p in prompts:
            reference.prefill(*p)
    finally:
        handle.remove()
    a = np.concatenate(seen)  # [sum T, D]: later layers see only the kept tokens
    assert a.shape[0] < 3 * prompts[0][0].shape[1]
    score = a.var(axis=0) * np.square(down.weight.detach().double().numpy()).sum(axis=0)  # [D]
    expected = tuple(sorted(np.argsort(-score, kind="stable")[:9].tolist()))

    static = calibrate(reference, prompts, [LAYER], size=9, calibration="three prompts", criterion="fluctuation")
    assert static.criterion == "fluctuation" and static.neurons[LAYER] == expected
    frequency = calibrate(reference, prompts, [LAYER], size=9, calibration="three prompts", criterion="frequency")
    assert frequency.criterion == "frequency"
    assert static.counts == frequency.counts  # counted whatever the criterion: coverage reads them
    assert static.neurons != frequency.neurons  # a different rule (on this model: checked, not assumed)
    assert not any(d._forward_pre_hooks or d._forward_hooks for d in _down_projs(model))


def test_a_constant_neuron_is_dropped_and_the_hooks_go_even_when_a_prompt_fails() -> None:
    from models.presets import build_random_model

    model = build_random_model("tiny-llama", seed=0)
    mlp = model.model.language_model.layers[LAYER].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[0] = 0.0  # SiLU(0) * up = 0 on every token: neuron 0 never varies
        mlp.down_proj.weight[:, 0] = 100.0  # however large its column
    reference = CoreMatchingLlava(model, CALIBRATE)
    width = mlp.gate_proj.weight.shape[0]
    prompts = [make_inputs(model, seed=s) for s in range(2)]
    static = calibrate(reference, prompts, [LAYER], size=width - 1, calibration="two", criterion="fluctuation")
    assert static.neurons[LAYER] == tuple(range(1, width))

    def failing():
        yield prompts[0]
        raise RuntimeError("the calibration data ran dry")

    with pytest.raises(RuntimeError, match="ran dry"):
        calibrate(reference, failing(), [LAYER], size=4, calibration="x", criterion="fluctuation")
    assert not any(d._forward_pre_hooks for d in _down_projs(model))


def test_the_width_ratio_widens_the_set_in_whole_blocks_up_to_d() -> None:
    budgets = CoreMatchingConfig().resolve(num_layers=32, intermediate_size=512, num_image_tokens=576)
    assert budgets.core_neurons == 205
    assert budgets.static_width(1, 1.0) == 205 and budgets.static_width(32, 1.0) == 224  # N at a ratio of 1
    assert budgets.static_width(1, 1.25) == 257 and budgets.static_width(align=32, ratio=1.25) == 288
    assert budgets.static_width() == 257 and budgets.static_width(32) == 288  # the default ratio: 1.25
    assert budgets.static_width(1, 2.6) == 512 and budgets.static_width(32, 4.0) == 512  # at most D
    tenth = CoreMatchingConfig(neuron_ratio=0.25).resolve(num_layers=32, intermediate_size=400, num_image_tokens=576)
    assert tenth.static_width(1, 1.1) == 110  # N * ratio an integer: not bumped by binary rounding


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"criterion": "magnitude"}, "unknown static criterion 'magnitude'; use --static-criterion frequency or"),
        ({"width_ratio": 0.99}, r"outside \[1, 4\]; pass --static-width-ratio between 1"),
        ({"width_ratio": 4.5}, "--static-width-ratio"),
        ({"width_ratio": float("nan")}, "--static-width-ratio"),
        ({"width_ratio": True}, "--static-width-ratio"),
    ],
)
def test_a_recipe_refuses_unknown_criteria_and_ratios_outside_1_to_4(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        StaticRecipe(**kwargs)
    assert "\n" not in str(error.value)


def test_the_recipe_defaults() -> None:
    assert DEFAULT_STATIC_CRITERION == "fluctuation" and DEFAULT_STATIC_WIDTH_RATIO == 1.25
    assert StaticRecipe() == StaticRecipe("fluctuation", 1.25) and StaticRecipe().is_default
    assert not StaticRecipe("frequency").is_default and not StaticRecipe(width_ratio=1.0).is_default
    assert StaticRecipe(width_ratio=1).width_ratio == 1 and StaticRecipe(width_ratio=4.0).width_ratio == 4.0
    assert set(CRITERIA) == {"frequency", "fluctuation"}


def test_the_json_keeps_the_criterion_and_old_files_were_frequency() -> None:
    scores = {3: torch.tensor([0.5, 0.1, 0.9, 0.9])}
    counts = {3: torch.tensor([1, 2, 0, 1])}
    static = StaticNeurons.from_scores(scores, counts, 2, prompts=2, calibration="t", criterion="fluctuation")
    assert static.neurons == {3: (2, 3)} and static.criterion == "fluctuation"  # ties: the lower index
    data = static.to_json()
    assert data["criterion"] == "fluctuation" and StaticNeurons.from_json(data) == static
    del data["criterion"]
    assert StaticNeurons.from_json(data).criterion == "frequency"
    with pytest.raises(ConfigError, match="unknown static criterion"):
        StaticNeurons.from_json({**data, "criterion": "magnitude"})


def test_calibration_prompts_start_after_the_questions_the_recipe_is_chosen_on() -> None:
    items, where = calibration_items(None, 3)
    assert CALIBRATION_START == 1000
    assert [i.id for i in items] == [i.id for i in shapes_items("validation", 3, start=1000)]
    assert [i.id for i in items] != [i.id for i in shapes_items("validation", 3)]
    assert where == "shapes validation split, items 1000-1002"


def test_an_export_config_takes_a_recipe_only_with_static_neurons(tmp_path) -> None:
    recipe = StaticRecipe("frequency", 1.0)  # not the default recipe (fluctuation, 1.25)
    assert ExportConfig(out=tmp_path, static_neurons=True, static_recipe=recipe).static_recipe == recipe
    assert ExportConfig(out=tmp_path).static_recipe.is_default
    with pytest.raises(ConfigError, match="--static-criterion/--static-width-ratio shape the static neuron set; add"):
        ExportConfig(out=tmp_path, static_recipe=recipe)
    with pytest.raises(ConfigError, match="must be a StaticRecipe"):
        ExportConfig(out=tmp_path, static_neurons=True, static_recipe="fluctuation")  # type: ignore[arg-type]


class _Stop(Exception):
    pass


def test_the_build_flags_reach_the_config(monkeypatch, tmp_path) -> None:
    import export.build

    got: list[ExportConfig] = []

    def fake_build(config, on_stage=None):
        got.append(config)
        raise _Stop

    monkeypatch.setattr(export.build, "build", fake_build)
    flags = ["--static-neurons", "--static-criterion", "frequency", "--static-width-ratio", "1.5"]  # not the defaults
    with pytest.raises(_Stop):
        main(["build", "--out", str(tmp_path / "b"), *flags])
    with pytest.raises(_Stop):
        main(["build", "--out", str(tmp_path / "b"), "--static-neurons"])
    assert got[0].static_recipe == StaticRecipe("frequency", 1.5) and got[1].static_recipe.is_default
    assert got[1].static_recipe == StaticRecipe("fluctuation", 1.25)  # the flags' defaults: the recipe's


def test_the_build_flags_name_every_criterion_and_the_default(capsys) -> None:
    assert tuple(CRITERIA) == STATIC_CRITERIA  # spelled out in export/__main__.py: it imports no torch
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--static-criterion {frequency,fluctuation}" in text and f"(default {DEFAULT_STATIC_CRITERION})" in text
    with pytest.raises(SystemExit):
        main(["build", "--static-neurons", "--static-criterion", "magnitude"])
    assert "invalid choice: 'magnitude'" in capsys.readouterr().err


def _evaluate_script():
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_evaluation_takes_the_recipe(monkeypatch, tmp_path, capsys) -> None:
    from evaluation.evaluate import EvalConfig

    config = EvalConfig(static_calibration=4, static_criterion="frequency", static_width_ratio=1.5)
    assert config.static_recipe == StaticRecipe("frequency", 1.5)  # not the default recipe
    assert EvalConfig().static_recipe.is_default
    with pytest.raises(ConfigError, match="unknown static criterion"):
        EvalConfig(static_criterion="magnitude")
    with pytest.raises(ConfigError, match="--static-width-ratio"):
        EvalConfig(static_width_ratio=0.5)

    script = _evaluate_script()
    got = []

    def fake_job(**kwargs):
        got.append(kwargs["config"])
        raise ValueError("stop here")

    monkeypatch.setattr(script, "EvalJob", fake_job)
    flags = ["--static-calibration", "4", "--static-criterion", "frequency", "--static-width-ratio", "1.5"]
    assert script.main([*flags, "--out-dir", str(tmp_path)]) == 2
    assert got[0].static_recipe == StaticRecipe("frequency", 1.5) and got[0].static_calibration == 4
    assert script.main(["--static-width-ratio", "5", "--out-dir", str(tmp_path)]) == 2
    assert "--static-width-ratio" in capsys.readouterr().err


def test_a_fluctuation_build_with_a_wider_set_validates(checkpoint, tmp_path) -> None:
    from buildformat import read
    from export.build import build

    config = ExportConfig(
        out=tmp_path / "build",
        model_dir=checkpoint("llama"),
        corematching=CM,
        max_prompt_tokens=64,
        max_sequence=128,
        static_neurons=True,
        calibration_count=3,
        static_recipe=StaticRecipe("fluctuation", 1.25),
    )
    result = build(config)
    assert result.validation.passed, result.validation.to_json()  # the narrowed model against the graphs
    record = read(result.out).static_neurons
    assert record is not None and record.calibration == "shapes validation split, items 1000-1002"
    static = StaticNeurons.load(result.out / record.file)
    assert static.criterion == "fluctuation" and static.prompts == 3
    n = math.ceil(CM.neuron_ratio * static.intermediate_size)
    assert static.size == record.neurons == min(static.intermediate_size, math.ceil(n * 1.25)) > n
