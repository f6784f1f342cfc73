"""Load a local llava-hf checkpoint directory, refusing early and clearly when it is incomplete.

`transformers` reports a missing file deep inside a loader, often as a hub
lookup error (it treats an unknown path as a repository name). This module
checks the directory first, so a user gets one line that names the missing or
wrong file and how to fix it, and the network is never touched: models are
only ever read from disk (`local_files_only=True`), and only from safetensors,
since unpickling a `.bin` file can run arbitrary code.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from buildformat.geometry import image_token_count, patch_count
from coreMatching.backbones import UnsupportedBackboneError, backbone_for, supported_model_types

if TYPE_CHECKING:
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

logger = logging.getLogger(__name__)

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_CONVERT_HINT = (
    'convert them once with: python -c "from transformers import LlavaForConditionalGeneration as M; '
    "M.from_pretrained('{path}', use_safetensors=False).save_pretrained('{path}')\" "
    "(transformers 5 saves safetensors)"
)


class ModelLoadError(ValueError):
    """A model directory cannot be loaded; the message names the problem and the fix, on one line."""


def num_image_tokens(config: Any) -> int:
    """Tokens one image contributes to the prompt for a `LlavaConfig` (`buildformat.geometry.image_token_count`)."""
    vision = config.vision_config
    return image_token_count(vision.image_size, vision.patch_size, config.vision_feature_select_strategy)


def default_model_dir() -> Path:
    """The embedded default llava-hf directory (models/default inside this package)."""
    return Path(__file__).resolve().parent / "default"


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(
            f"{path} is not valid JSON (line {e.lineno}: {e.msg}); re-download or re-save the {what}"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object; re-download or re-save the {what}")
    return data


def _check_weights(path: Path) -> None:
    if (path / SAFETENSORS_FILE).is_file():
        return
    index_path = path / SAFETENSORS_INDEX
    if index_path.is_file():
        index = _read_json(index_path, "sharded checkpoint")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index_path} has no 'weight_map'; re-download or re-save the checkpoint")
        for shard in sorted(set(weight_map.values())):
            if not isinstance(shard, str) or not (path / shard).is_file():
                raise ModelLoadError(
                    f"{path} is missing weight shard {shard!r} listed in {SAFETENSORS_INDEX}; "
                    "download every shard of the checkpoint"
                )
        return
    pickled = sorted(p.name for p in path.glob("pytorch_model*.bin"))
    if pickled:
        raise ModelLoadError(
            f"{path} has only pickled PyTorch weights ({', '.join(pickled)}), which are not loaded "
            f"(unpickling can run arbitrary code); {_CONVERT_HINT.format(path=path)}"
        )
    raise ModelLoadError(
        f"{path} has no weights: expected {SAFETENSORS_FILE}, or {SAFETENSORS_INDEX} and the shards it lists"
    )


def _check_tokenizer(path: Path) -> None:
    if (path / "tokenizer.json").is_file():
        return
    if (path / "tokenizer.model").is_file():
        # transformers converts a SentencePiece model to a fast tokenizer with the sentencepiece package.
        if importlib.util.find_spec("sentencepiece") is None:
            raise ModelLoadError(
                f"{path} has only tokenizer.model, which needs the sentencepiece package; "
                "pip install sentencepiece, or add the checkpoint's tokenizer.json"
            )
        return
    raise ModelLoadError(
        f"{path} has no tokenizer (tokenizer.json or tokenizer.model); "
        "copy the tokenizer files of the checkpoint into the directory"
    )


def _check_preprocessor(path: Path) -> None:
    if (path / "preprocessor_config.json").is_file():
        return
    # transformers 5 may save the image processor inside processor_config.json instead.
    processor_config = path / "processor_config.json"
    if processor_config.is_file() and "image_processor" in _read_json(processor_config, "processor"):
        return
    raise ModelLoadError(
        f"{path} has no preprocessor_config.json (image size, crop and normalisation); "
        "copy it from the checkpoint the model was made from"
    )


def check_model_dir(path: str | Path) -> dict[str, Any]:
    """Check that `path` is a complete, supported llava-hf directory; returns its config.json.

    Raises `ModelLoadError` naming the first problem found. Nothing is loaded.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model directory {path} does not exist; pass a local llava-hf checkpoint directory "
            "(models are never downloaded)"
        )
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a directory; pass the checkpoint directory that holds config.json")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(
            f"{path} has no config.json, so it is not a Hugging Face checkpoint directory; "
            "pass a llava-hf directory (config.json, safetensors weights, tokenizer, preprocessor_config.json)"
        )
    config = _read_json(config_path, "checkpoint")
    model_type = config.get("model_type")
    if model_type != "llava":
        raise ModelLoadError(
            f"{config_path} has model_type {model_type!r}; only 'llava' checkpoints "
            "(LlavaForConditionalGeneration, e.g. llava-hf/llava-1.5-7b-hf) are supported"
        )
    text_config = config.get("text_config") or {}
    # LlavaConfig's default text model is Llama, so a missing model_type means "llama".
    text_type = text_config.get("model_type", "llama") if isinstance(text_config, dict) else None
    try:
        backbone_for(str(text_type))
    except UnsupportedBackboneError:
        raise ModelLoadError(
            f"{config_path}: text backbone {text_type!r} is not supported; "
            f"supported text_config.model_type: {', '.join(supported_model_types())}"
        ) from None
    _check_weights(path)
    _check_tokenizer(path)
    _check_preprocessor(path)
    return config


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    resolved = getattr(torch, aliases.get(dtype, dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a floating-point torch dtype (e.g. float32, float16)")
    return resolved


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _check_processor(processor: Any, model: LlavaForConditionalGeneration, path: Path) -> None:
    """The processor must make exactly the image tokens the model expects, with the model's image token id."""
    config = model.config
    vision = config.vision_config
    # Old checkpoints lack these processor fields; the model config knows them.
    if getattr(processor, "patch_size", None) is None:
        processor.patch_size = vision.patch_size
        logger.info("%s: processor has no patch_size; using the vision tower's (%d)", path, vision.patch_size)
    if getattr(processor, "vision_feature_select_strategy", None) is None:
        processor.vision_feature_select_strategy = config.vision_feature_select_strategy
    image_token_id = getattr(processor, "image_token_id", None)
    if image_token_id != config.image_token_id:
        raise ModelLoadError(
            f"{path}: the tokenizer's image token {getattr(processor, 'image_token', None)!r} has id "
            f"{image_token_id} but config.json says image_token_index {config.image_token_id}; "
            "use the tokenizer the model was trained with"
        )
    image_processor = processor.image_processor
    # Only a center crop fixes the pixel size; the vision tower's position embeddings need exactly image_size.
    crop = getattr(image_processor, "crop_size", None) if getattr(image_processor, "do_center_crop", False) else None
    height = crop.get("height") if crop is not None else None
    width = crop.get("width") if crop is not None else None
    if height is not None and (height, width) != (vision.image_size, vision.image_size):
        raise ModelLoadError(
            f"{path}: preprocessor_config.json crops images to {height}x{width} but the vision tower "
            f"takes {vision.image_size}x{vision.image_size}; fix crop_size in preprocessor_config.json"
        )
    expected = num_image_tokens(config)
    # What transformers' LlavaProcessor expands <image> to, from the processor's own fields (not the model's).
    made = patch_count(vision.image_size, processor.patch_size) + processor.num_additional_image_tokens
    made -= 1 if processor.vision_feature_select_strategy == "default" else 0
    if made != expected:
        raise ModelLoadError(
            f"{path}: the processor expands <image> to {made} tokens but the model makes {expected} image "
            "features; fix patch_size / vision_feature_select_strategy / num_additional_image_tokens "
            "in processor_config.json"
        )


def load_llava(
    path: str | Path, dtype: torch.dtype | str | None = None
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load `(model, processor)` from a local llava-hf directory; the model is in eval mode.

    dtype: the weights' dtype after loading (default torch.float32, whatever the checkpoint stores).
    Raises `ModelLoadError` for anything wrong with the directory or its files.
    """
    path = Path(path).expanduser().resolve()
    check_model_dir(path)
    torch_dtype = _resolve_dtype(dtype)

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    try:
        model, info = LlavaForConditionalGeneration.from_pretrained(
            str(path),
            dtype=torch_dtype,
            local_files_only=True,
            use_safetensors=True,
            attn_implementation="sdpa",
            trust_remote_code=False,
            output_loading_info=True,
        )
    except Exception as e:
        raise ModelLoadError(f"{path}: transformers could not load the model: {_first_line(e)}") from e
    # A tensor missing from the checkpoint would otherwise stay randomly initialised, silently.
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ModelLoadError(
            f"{path}: the weights lack {len(missing)} tensors (e.g. {missing[0]!r}); "
            "the checkpoint is incomplete or not a LLaVA model"
        )
    if info.get("unexpected_keys"):
        logger.warning("%s: ignored %d unexpected tensors", path, len(info["unexpected_keys"]))

    try:
        processor = AutoProcessor.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise ModelLoadError(f"{path}: transformers could not load the processor: {_first_line(e)}") from e
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise ModelLoadError(
            f"{path}: AutoProcessor gave a {type(processor).__name__}, not a LLaVA processor; "
            'add processor_config.json with "processor_class": "LlavaProcessor"'
        )
    _check_processor(processor, model, path)
    model.eval()
    logger.info("loaded %s (%s, text backbone %s)", path, torch_dtype, model.config.text_config.model_type)
    return model, processor
