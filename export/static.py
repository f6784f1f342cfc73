"""`python -m export build --static-neurons`: calibrate a static neuron set and bake it into the model.

The set is counted with the per-request reference over a calibration set (a
JSONL file of image + question, or the shapes validation split), ranked by the
recipe's criterion and as wide as its ratio says (`StaticRecipe`), then the
model's FFN is narrowed in place (`coreMatching.static_neurons`) before tracing,
so every graph carries the narrower weights and the decode graph takes no
compacted FFN; the build's validation runs the same narrowed model.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from buildformat import Manifest, StaticNeuronsInfo
from coreMatching import CoreMatchingLlava
from coreMatching.config import Budgets, CoreMatchingConfig
from coreMatching.errors import ConfigError
from coreMatching.static_neurons import (
    DEFAULT_STATIC_RECIPE,
    FILE,
    StaticNeurons,
    StaticRecipe,
    calibrate,
    narrow_ffn_,
    per_request_off,
)
from export.calibration import calibration_items, calibration_prompts

log = logging.getLogger(__name__)


def static_recipe(criterion: str | None, width_ratio: float | None) -> StaticRecipe:
    """The recipe of `--static-criterion` and `--static-width-ratio` (None: the defaults)."""
    default = StaticRecipe()
    return StaticRecipe(
        default.criterion if criterion is None else criterion,
        default.width_ratio if width_ratio is None else width_ratio,
    )


def bake(
    model: Any,
    processor: Any,
    config: CoreMatchingConfig,
    budgets: Budgets,
    calibration: Path | None,
    count: int,
    align: int = 1,
    recipe: StaticRecipe = DEFAULT_STATIC_RECIPE,
) -> tuple[StaticNeurons, Budgets]:
    """Calibrates the set of `budgets`' neuron-sparse layers (but the prune layer) and narrows `model` to
    it, in place. -> (the set, the budgets the narrowed model is built with: no per-request layers)"""
    layers = budgets.narrowable_layers
    if not layers:
        raise ConfigError(
            f"--static-neurons: no layer to narrow (the neuron-sparse layers {budgets.neuron_layers[0]}.."
            f"{budgets.neuron_layers[1] - 1} hold only the prune layer); widen --neuron-layers"
        )
    items, where = calibration_items(calibration, count)
    size = budgets.static_width(align, recipe.width_ratio)
    log.info(
        "calibrating %d static neurons of %d (%s, width ratio %g) in layers %s over %s",
        size,
        budgets.intermediate_size,
        recipe.criterion,
        recipe.width_ratio,
        layers,
        where,
    )
    reference = CoreMatchingLlava(model, config)
    prompts = calibration_prompts(processor, model.dtype, items)
    static = calibrate(reference, prompts, layers, size, where, recipe.criterion)
    coverage = static.coverage()
    log.info(
        "static set keeps %s of the calibration's core-neuron picks", {k: round(v, 3) for k, v in coverage.items()}
    )
    narrow_ffn_(model, static)
    narrowed = dataclasses.replace(
        budgets,
        neuron_layers=per_request_off(config, budgets).neuron_layers,
        static_layers=tuple(static.layers),
        static_neurons=static.size,
    )
    return static, narrowed


def record(static: StaticNeurons) -> StaticNeuronsInfo:
    """The manifest's record of a baked set (the set itself goes to `FILE`)."""
    return StaticNeuronsInfo(
        layers=tuple(static.layers),
        neurons=static.size,
        intermediate_size=static.intermediate_size,
        prompts=static.prompts,
        calibration=static.calibration,
        file=FILE,
    )


def narrow_for(build_dir: Path, manifest: Manifest, model: Any) -> Any:
    """The model a build was validated with: narrowed to its baked set, if it has one. -> model"""
    if manifest.static_neurons is None:
        return model
    static = StaticNeurons.load(Path(build_dir) / manifest.static_neurons.file)
    return narrow_ffn_(model, static)
