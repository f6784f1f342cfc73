"""CoreMatching: core neurons of the prompt select the core image tokens (SPEC §1).

The PyTorch reference that every exported graph and runtime answer is checked
against. Depends on torch only; models are `transformers` LLaVA instances read
by attribute.
"""

from coreMatching.backbones import BACKBONES, Backbone, UnsupportedBackboneError, backbone_for, register
from coreMatching.config import PRESETS, Budgets, CoreMatchingConfig
from coreMatching.errors import ConfigError, CoreMatchingError, InputError
from coreMatching.llava import CoreMatchingLlava, GenerationResult, PrefillState

__all__ = [
    "BACKBONES",
    "PRESETS",
    "Backbone",
    "Budgets",
    "ConfigError",
    "CoreMatchingConfig",
    "CoreMatchingError",
    "CoreMatchingLlava",
    "GenerationResult",
    "InputError",
    "PrefillState",
    "UnsupportedBackboneError",
    "backbone_for",
    "register",
]
