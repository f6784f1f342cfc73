"""The evaluation's static neuron sets: a narrowed copy of the model per setting, calibrated on validation data.

The rule is fixed before any test item is scored: the set keeps ceil(N * width ratio) neurons of each
narrowable layer, ranked by the recipe's criterion over `count` items of the shapes validation split from
item `export.calibration.CALIBRATION_START` (after the validation questions the recipe is chosen on), under
the setting's own token selection (`coreMatching.static_neurons`); nothing is tuned on the test split.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from coreMatching import CoreMatchingConfig, CoreMatchingLlava
from coreMatching.static_neurons import (
    DEFAULT_STATIC_RECIPE,
    StaticNeurons,
    StaticRecipe,
    calibrate,
    narrow_ffn_,
    per_request_off,
)
from export.calibration import calibration_items, calibration_prompts

log = logging.getLogger(__name__)


def static_reference(
    model: Any,
    processor: Any,
    config: CoreMatchingConfig,
    num_image_tokens: int,
    count: int,
    recipe: StaticRecipe = DEFAULT_STATIC_RECIPE,
) -> tuple[CoreMatchingLlava, StaticNeurons]:
    """A narrowed copy of `model` with the static set of `config` by `recipe` (calibrated on the validation
    split), and the reference that runs it without per-request neurons."""
    per_request = CoreMatchingLlava(model, config)
    budgets = per_request.budgets(num_image_tokens)
    # A build's default calibration prompts: validation items from CALIBRATION_START, after the questions the
    # selector and the recipe are chosen on.
    items, where = calibration_items(None, count)
    prompts = calibration_prompts(processor, model.dtype, items)
    size = budgets.static_width(ratio=recipe.width_ratio)
    static = calibrate(per_request, prompts, budgets.narrowable_layers, size, where, recipe.criterion)
    narrowed = narrow_ffn_(copy.deepcopy(model), static)
    log.info(
        "static set for %s (%s, %d neurons): coverage %s",
        config.token_selector,
        recipe.criterion,
        size,
        static.coverage(),
    )
    return CoreMatchingLlava(narrowed, per_request_off(config, budgets)), static
