"""The evaluation's static neuron sets: a narrowed copy of the model per setting, calibrated on validation data.

The rule is fixed before any test item is scored: the set keeps the per-request N neurons of each
narrowable layer, counted over the first `count` items of the shapes validation split under the
setting's own token selection (`coreMatching.static_neurons`); nothing is tuned on the test split.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from coreMatching import CoreMatchingConfig, CoreMatchingLlava
from coreMatching.static_neurons import StaticNeurons, calibrate, narrow_ffn_, per_request_off
from export.calibration import CALIBRATION_SPLIT, calibration_prompts
from vqadata.data import shapes_items

log = logging.getLogger(__name__)


def static_reference(
    model: Any, processor: Any, config: CoreMatchingConfig, num_image_tokens: int, count: int
) -> tuple[CoreMatchingLlava, StaticNeurons]:
    """A narrowed copy of `model` with the static set of `config` (calibrated on the validation split), and
    the reference that runs it without per-request neurons."""
    per_request = CoreMatchingLlava(model, config)
    budgets = per_request.budgets(num_image_tokens)
    items = list(shapes_items(CALIBRATION_SPLIT, count))
    where = f"shapes {CALIBRATION_SPLIT} split, first {len(items)}"
    prompts = calibration_prompts(processor, model.dtype, items)
    static = calibrate(per_request, prompts, budgets.narrowable_layers, budgets.static_width(), where)
    narrowed = narrow_ffn_(copy.deepcopy(model), static)
    log.info("static set for %s: coverage %s", config.token_selector, static.coverage())
    return CoreMatchingLlava(narrowed, per_request_off(config, budgets)), static
