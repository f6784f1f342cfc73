"""Model presets, the embedded default model, and loading of local llava-hf checkpoints.

- `load_llava(path)` -> `(model, processor)` for a local llava-hf directory (safetensors only, offline).
- `default_model_dir()` -> the embedded default checkpoint (models/default).
- `from_name(name)` / `PRESETS` -> `ModelPreset` geometries (rows of `models.presets.PRESET_TABLE`);
  `build_random_model(preset)` instantiates one.

Importing this package does not import transformers; the functions that build or load models do.
"""

from models.loading import ModelLoadError, check_model_dir, default_model_dir, load_llava, num_image_tokens
from models.presets import (
    PRESETS,
    ModelPreset,
    PresetError,
    UnknownPresetError,
    build_random_model,
    from_name,
)

__all__ = [
    "PRESETS",
    "ModelLoadError",
    "ModelPreset",
    "PresetError",
    "UnknownPresetError",
    "build_random_model",
    "check_model_dir",
    "default_model_dir",
    "from_name",
    "load_llava",
    "num_image_tokens",
]
