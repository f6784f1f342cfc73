"""models/: presets, random tiny models, the embedded default model and load_llava's checks."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image

import models
from buildformat.geometry import Geometry, image_token_count
from models import (
    PRESETS,
    ModelLoadError,
    ModelPreset,
    PresetError,
    UnknownPresetError,
    build_random_model,
    default_model_dir,
    from_name,
    load_llava,
    presets,
)

TINY = ("tiny-llama", "tiny-llama-gqa", "tiny-mistral", "tiny-llama-full")
REPO = Path(__file__).resolve().parent.parent
# Everything of the default directory except the weights: copied next to other weights in the tests.
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "processor_config.json",
    "preprocessor_config.json",
)


def tiny_prompt(preset: ModelPreset, text: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    ids = [preset.bos_token_id, *[preset.image_token_id] * preset.num_image_tokens]
    ids += torch.randint(3, preset.image_token_id, (text,), generator=gen).tolist()
    pixels = torch.randn(1, 3, preset.image_size, preset.image_size, generator=gen)
    return torch.tensor([ids]), pixels


# ---------------------------------------------------------------- presets


def test_preset_names() -> None:
    assert set(PRESETS) >= {"llava-1.5-7b", "llava-1.5-13b", "default-small", *TINY}
    assert all(from_name(n) is p and p.name == n for n, p in PRESETS.items())


def test_real_llava_geometry() -> None:
    p7, p13 = from_name("llava-1.5-7b"), from_name("llava-1.5-13b")
    for p in (p7, p13):
        assert (p.image_size, p.patch_size, p.num_image_tokens) == (336, 14, 576)
        assert (p.vision_hidden_size, p.vision_intermediate_size, p.vision_num_layers) == (1024, 4096, 24)
        assert (p.vision_feature_layer, p.vision_feature_select_strategy) == (-2, "default")
        assert (p.vocab_size, p.image_token_id, p.text_model_type) == (32064, 32000, "llama")
    assert (p7.hidden_size, p7.intermediate_size, p7.num_hidden_layers, p7.num_key_value_heads) == (4096, 11008, 32, 32)
    assert (p13.hidden_size, p13.intermediate_size, p13.num_hidden_layers, p13.num_attention_heads) == (
        5120,
        13824,
        40,
        40,
    )
    cfg = p7.hf_config()  # a config only: never instantiated
    assert cfg.image_token_id == 32000 and cfg.text_config.vocab_size == 32064
    assert cfg.vision_config.image_size == 336 and cfg.image_seq_length == 576


def test_tiny_geometry() -> None:
    assert [from_name(n).num_image_tokens for n in TINY] == [16, 16, 16, 17]
    assert from_name("tiny-llama").num_key_value_heads == 4
    assert from_name("tiny-llama-gqa").num_key_value_heads == 2
    mistral = from_name("tiny-mistral")
    assert mistral.text_model_type == "mistral" and mistral.sliding_window is not None
    assert mistral.sliding_window < mistral.num_image_tokens + 10  # the window really cuts a prompt
    full = from_name("tiny-llama-full")
    assert (full.vision_feature_select_strategy, full.vision_feature_layer) == ("full", -1)
    cfg = mistral.hf_config()
    assert cfg.text_config.model_type == "mistral" and cfg.text_config.sliding_window == mistral.sliding_window
    assert from_name("default-small").num_image_tokens == 576


def test_table_rows_derive_what_follows() -> None:
    # A row states a derived field only to differ from it: Vicuna's FFN widths and multi-head attention follow.
    assert [presets.llama_ffn_width(d) for d in (4096, 5120)] == [11008, 13824]
    assert "intermediate_size" not in presets.PRESET_TABLE["llava-1.5-7b"]
    assert "num_key_value_heads" not in presets.PRESET_TABLE["tiny-llama"]
    shape = from_name("llava-7b-shape")
    assert (shape.vision_intermediate_size, shape.num_key_value_heads) == (4 * 256, 12)
    assert list(PRESETS) == list(presets.PRESET_TABLE)


@pytest.mark.parametrize("name", list(PRESETS))
def test_image_tokens_counted_once(name: str) -> None:
    """The preset, its LlavaConfig, `models.num_image_tokens` and the Geometry all agree (image_token_count)."""
    preset = from_name(name)
    cfg = preset.hf_config()
    expected = image_token_count(preset.image_size, preset.patch_size, preset.vision_feature_select_strategy)
    assert preset.num_image_tokens == cfg.image_seq_length == models.num_image_tokens(cfg) == expected
    assert Geometry.from_hf_config(cfg).num_image_tokens == Geometry.from_preset(preset).num_image_tokens == expected


def test_image_token_count() -> None:
    assert (image_token_count(336, 14), image_token_count(336, 14, "full"), image_token_count(56, 14)) == (576, 577, 16)
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        image_token_count(336, 14, "cls")


def test_unknown_preset_lists_names() -> None:
    with pytest.raises(UnknownPresetError) as err:
        from_name("llava-42b")
    assert isinstance(err.value, ValueError)
    assert "llava-42b" in str(err.value)
    assert all(name in str(err.value) for name in PRESETS)


def test_preset_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        from_name("tiny-llama").hidden_size = 8  # type: ignore[misc]


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"image_size": 50}, "multiple of patch_size"),
        ({"hidden_size": 0}, "positive int"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": 66}, "head_dim"),
        ({"vision_feature_layer": 5}, "vision_feature_layer"),
        ({"vision_feature_select_strategy": "cls"}, "vision_feature_select_strategy"),
        ({"text_model_type": "gpt2"}, "supported: llama, mistral"),
        ({"sliding_window": 8}, "sliding_window"),
        ({"image_token_id": 256}, "outside the vocabulary"),
        ({"image_token_id": 2}, "collides"),
    ],
)
def test_preset_validation(changes: dict[str, object], fragment: str) -> None:
    with pytest.raises(PresetError, match=fragment):
        from_name("tiny-llama").replace(**changes)


# ---------------------------------------------------------------- random tiny models


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_is_deterministic(name: str) -> None:
    preset = from_name(name)
    ids, pixels = tiny_prompt(preset)
    before = torch.random.get_rng_state()
    a, b, c = build_random_model(name, seed=0), build_random_model(preset, seed=0), build_random_model(name, 1)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG stream is untouched
    assert not a.training and a.dtype == torch.float32
    assert a.config.text_config._attn_implementation == "sdpa"
    with torch.no_grad():
        la, lb, lc = (m(input_ids=ids, pixel_values=pixels).logits for m in (a, b, c))
    assert la.shape == (1, ids.shape[1], preset.vocab_size)
    assert torch.isfinite(la).all()
    assert torch.equal(la, lb)
    assert not torch.allclose(la, lc)


def test_mistral_window_is_applied() -> None:
    preset = from_name("tiny-mistral")
    ids, pixels = tiny_prompt(preset)
    windowed = build_random_model(preset)
    unwindowed = build_random_model(preset.replace(sliding_window=4096))
    with torch.no_grad():
        diff = (
            (
                windowed(input_ids=ids, pixel_values=pixels).logits
                - unwindowed(input_ids=ids, pixel_values=pixels).logits
            )
            .abs()
            .amax(-1)[0]
        )
    window = preset.sliding_window
    assert diff[:window].max() == 0  # positions that see fewer than `window` tokens are unaffected
    assert diff[window:].min() > 0


# ---------------------------------------------------------------- the embedded default model


@pytest.fixture(scope="module")
def default_loaded():
    # Loading must work with no network at all: any connection attempt fails the load.
    with pytest.MonkeyPatch.context() as mp:

        def refuse(*args: object, **kwargs: object) -> None:
            raise OSError("network access in a test")

        mp.setattr(socket.socket, "connect", refuse)
        return load_llava(default_model_dir())


def test_default_dir_is_complete() -> None:
    d = default_model_dir()
    assert d == REPO / "models" / "default"
    for name in ("config.json", "model.safetensors", "README.md", "generation_config.json", *PROCESSOR_FILES):
        assert (d / name).is_file(), name
    assert sum(f.stat().st_size for f in d.iterdir()) < 20_000_000  # issue 5: 20 MB at most
    assert models.check_model_dir(d)["model_type"] == "llava"


def test_default_model_loads(default_loaded) -> None:
    model, processor = default_loaded
    preset = from_name("default-small")
    assert not model.training and model.dtype == torch.float32
    cfg = model.config
    assert cfg.image_token_id == preset.image_token_id == processor.image_token_id
    assert cfg.text_config.vocab_size == preset.vocab_size == len(processor.tokenizer)
    text, vision = cfg.text_config, cfg.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (
        preset.hidden_size,
        preset.intermediate_size,
        preset.num_hidden_layers,
    )
    heads = (text.num_attention_heads, text.num_key_value_heads)
    assert heads == (preset.num_attention_heads, preset.num_key_value_heads)
    assert (vision.hidden_size, vision.num_hidden_layers) == (preset.vision_hidden_size, preset.vision_num_layers)
    assert (vision.image_size, vision.patch_size, cfg.vision_feature_layer) == (336, 14, preset.vision_feature_layer)


def test_default_processor_prompt(default_loaded) -> None:
    model, processor = default_loaded
    tok = processor.tokenizer
    question = {"type": "text", "text": "What colour is the circle?"}
    messages = [{"role": "user", "content": [{"type": "image"}, question]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "USER: <image>\nWhat colour is the circle? ASSISTANT:"
    image = Image.open(REPO / "examples" / "shapes_red_circle.png")
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    ids = inputs["input_ids"][0]
    assert inputs["pixel_values"].shape == (1, 3, 336, 336)
    assert int((ids == model.config.image_token_id).sum()) == 576
    assert int(ids[0]) == tok.bos_token_id  # <s> prepended like Llama
    # The text around the image decodes back to the prompt: the tokenizer is lossless.
    assert tok.decode(ids[ids != model.config.image_token_id], skip_special_tokens=True) == (
        "USER: \nWhat colour is the circle? ASSISTANT:"
    )
    assert len(tok("What colour is the circle?")["input_ids"]) <= 8  # learned words, not bytes
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, ids.shape[0], len(tok)) and torch.isfinite(logits).all()


def test_default_tokenizer_json_alone(default_loaded) -> None:
    """The torch-free runtime reads tokenizer.json with `tokenizers` only: it must give the same ids."""
    from tokenizers import Tokenizer

    _, processor = default_loaded
    prompt = "USER: <image>\nHow many squares are there? ASSISTANT:"
    raw = Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))
    assert raw.encode(prompt).ids == processor.tokenizer(prompt)["input_ids"]
    assert raw.token_to_id("<image>") == from_name("default-small").image_token_id


def test_examples_questions() -> None:
    questions = json.loads((REPO / "examples" / "questions.json").read_text())
    assert len(questions) >= 3
    for q in questions:
        assert q["question"].endswith("?")
        assert Image.open(REPO / "examples" / q["image"]).size == (336, 336)


# ---------------------------------------------------------------- load_llava round trip and errors


def tiny_for_default_tokenizer() -> ModelPreset:
    """tiny-llama with the default tokenizer's vocabulary, so that the default processor files fit it."""
    d = from_name("default-small")
    return from_name("tiny-llama").replace(
        name="tiny-1024", vocab_size=d.vocab_size, image_token_id=d.image_token_id, pad_token_id=d.pad_token_id
    )


def write_tiny_dir(out: Path, preset: ModelPreset, shard: str | None = "150KB") -> torch.nn.Module:
    """A tiny checkpoint with the default tokenizer and a preprocessor resized to the tiny image size."""
    model = build_random_model(preset, seed=3)
    model.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    for name in PROCESSOR_FILES:
        shutil.copy(default_model_dir() / name, out / name)
    pre = json.loads((out / "preprocessor_config.json").read_text())
    pre["size"] = {"shortest_edge": preset.image_size}
    pre["crop_size"] = {"height": preset.image_size, "width": preset.image_size}
    (out / "preprocessor_config.json").write_text(json.dumps(pre))
    return model


def test_sharded_round_trip(tmp_path: Path) -> None:
    preset = tiny_for_default_tokenizer()
    original = write_tiny_dir(tmp_path, preset)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "model.safetensors").exists()

    model, processor = load_llava(tmp_path)
    reference = original.state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)

    prompt = "USER: <image>\nHow many triangles are there? ASSISTANT:"
    inputs = processor(
        images=Image.open(REPO / "examples" / "shapes_three_triangles.png"), text=prompt, return_tensors="pt"
    )
    assert inputs["pixel_values"].shape == (1, 3, 56, 56)
    assert int((inputs["input_ids"] == preset.image_token_id).sum()) == preset.num_image_tokens
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, original(**inputs).logits)

    half, _ = load_llava(tmp_path, dtype=torch.float16)
    assert half.dtype == torch.float16


@pytest.fixture(scope="module")
def skeleton_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A llava directory that passes every file check; its weights file is a placeholder."""
    src = tmp_path_factory.mktemp("skeleton")
    shutil.copy(default_model_dir() / "config.json", src / "config.json")
    for name in PROCESSOR_FILES:
        shutil.copy(default_model_dir() / name, src / name)
    (src / "model.safetensors").write_bytes(b"")
    return src


@pytest.fixture
def skeleton(skeleton_src: Path, tmp_path: Path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(skeleton_src, d)
    assert models.check_model_dir(d)["model_type"] == "llava"
    return d


def edit_config(d: Path, **changes: object) -> None:
    cfg = json.loads((d / "config.json").read_text())
    for key, value in changes.items():
        if key == "text_model_type":
            cfg["text_config"]["model_type"] = value
        else:
            cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))


def break_dir(d: Path, case: str) -> Path:
    """Damage a complete skeleton `d` in one way; returns the path to pass to load_llava."""
    if case == "missing dir":
        return d / "nope"
    if case == "not a dir":
        return d / "config.json"
    if case == "missing config":
        (d / "config.json").unlink()
    elif case == "invalid config":
        (d / "config.json").write_text("{not json")
    elif case == "not llava":
        edit_config(d, model_type="llava_next")
    elif case == "gpt2 backbone":
        edit_config(d, text_model_type="gpt2")
    elif case == "bin only":
        (d / "model.safetensors").unlink()
        (d / "pytorch_model.bin").write_bytes(b"")
    elif case == "no weights":
        (d / "model.safetensors").unlink()
    elif case == "missing shard":
        (d / "model.safetensors").unlink()
        shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        index = {"metadata": {}, "weight_map": {"a": shards[0], "b": shards[1]}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        (d / shards[0]).write_bytes(b"")
    elif case == "missing tokenizer":
        (d / "tokenizer.json").unlink()
    elif case == "missing preprocessor":
        (d / "preprocessor_config.json").unlink()
    else:
        raise AssertionError(case)
    return d


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("missing dir", ["does not exist"]),
        ("not a dir", ["not a directory"]),
        ("missing config", ["no config.json"]),
        ("invalid config", ["config.json is not valid JSON"]),
        ("not llava", ["'llava_next'", "only 'llava'"]),
        ("gpt2 backbone", ["'gpt2'", "llama", "mistral"]),
        ("bin only", ["pytorch_model.bin", "not loaded", "save_pretrained"]),
        ("no weights", ["no weights", "model.safetensors"]),
        ("missing shard", ["model-00002-of-00002.safetensors", "model.safetensors.index.json"]),
        ("missing tokenizer", ["no tokenizer", "tokenizer.json"]),
        ("missing preprocessor", ["preprocessor_config.json"]),
    ],
)
def test_load_errors(skeleton: Path, case: str, fragments: list[str]) -> None:
    path = break_dir(skeleton, case)
    with pytest.raises(ModelLoadError) as err:
        load_llava(path)
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_loader_failure_is_wrapped(skeleton: Path) -> None:
    (skeleton / "model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(ModelLoadError, match="could not load the model") as err:
        load_llava(skeleton)
    assert err.value.__cause__ is not None


def test_image_token_mismatch(tmp_path: Path) -> None:
    # tiny-llama's <image> is id 255; the default tokenizer's is 1023.
    write_tiny_dir(tmp_path, from_name("tiny-llama"), shard=None)
    with pytest.raises(ModelLoadError, match="image token"):
        load_llava(tmp_path)
