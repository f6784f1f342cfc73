"""CoreMatching: core neurons of the prompt select the core image tokens (docs/method.md).

The PyTorch reference that every exported graph and runtime answer is checked
against. Depends on torch only; models are `transformers` LLaVA instances read
by attribute.

The configuration, the CLI flags and the backbone registry import no torch, so
torch-free tools (the TensorRT engine builder, the runtime) can use them; the
reference itself (`CoreMatchingLlava`, ...) is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from coreMatching.backbones import BACKBONES, Backbone, UnsupportedBackboneError, backbone_for, register
from coreMatching.config import PRESETS, Budgets, CoreMatchingConfig
from coreMatching.errors import ConfigError, CoreMatchingError, InputError

# name -> module, for the parts that need torch
_LAZY = {
    "CoreMatchingLlava": "coreMatching.llava",
    "GenerationResult": "coreMatching.llava",
    "PrefillState": "coreMatching.llava",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'coreMatching' has no attribute {name!r}")


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
