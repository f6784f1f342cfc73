"""runtime.preprocess and runtime.text against the transformers LlavaProcessor of the default model."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_manifests import MODEL, TOKENIZER, manifest_json, write_manifest
from PIL import Image, ImageOps
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tokenizer_models

import runtime.preprocess
from buildformat import Manifest
from models import default_model_dir, load_llava
from models.answer import build_prompt
from runtime.chat import Conversation
from runtime.preprocess import ImageError, ImageProcessor, load_image
from runtime.text import PromptError, PromptTokenizer, TextStream

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.png"))
MAX_PROMPT_TOKENS = 1024  # the default --max-prompt-tokens
TOLERANCE = 1e-6
QUESTIONS = (
    "What colour is the circle?",
    "¿Qué color tiene el círculo? 日本語の質問 🐱🚀 naïve café",
    "What is {x}, {question} and {} here? {{0}}",
    "   leading and trailing spaces, and a tab\t   ",
    "Describe every shape in the picture, its colour, its size and where it is, " * 12,
)


@pytest.fixture(scope="module")
def processor() -> Any:
    return load_llava(default_model_dir())[1]


@pytest.fixture(scope="module")
def build(processor: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    """A build directory with only what preprocessing and tokenization read (no graphs)."""
    out = tmp_path_factory.mktemp("build")
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja"):
        shutil.copy2(default_model_dir() / name, out / name)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "{question}"}]}]
    crop = processor.image_processor.crop_size
    grid = (crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size)
    model = MODEL | {
        "num_image_tokens": grid,
        "image_size": crop["height"],
        "patch_size": processor.patch_size,
        "image_token_id": processor.image_token_id,
        "bos_token_id": processor.tokenizer.bos_token_id,
        "eos_token_id": processor.tokenizer.eos_token_id,
        "pad_token_id": processor.tokenizer.pad_token_id,
    }
    tokenizer = TOKENIZER | {
        "prompt": processor.apply_chat_template(conversation, add_generation_prompt=True),
        "image_token": processor.image_token,
    }
    dims = {"S": {"min": 577, "opt": 616, "max": MAX_PROMPT_TOKENS}}
    manifest = write_manifest(out, manifest_json(model=model, dims=dims, tokenizer=tokenizer))
    return out, manifest


@pytest.fixture(scope="module")
def image_processor(build: tuple[Path, Manifest]) -> ImageProcessor:
    return ImageProcessor.from_build(*build)


@pytest.fixture(scope="module")
def tokenizer(build: tuple[Path, Manifest]) -> PromptTokenizer:
    return PromptTokenizer.from_build(*build)


def reference_pixels(processor: Any, image: Image.Image) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation notes
        inputs = processor(images=image, text=build_prompt(processor, "What is it?"), return_tensors="np")
    return inputs["pixel_values"]


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Photo-like: smooth colour fields (upsampled coarse noise) plus fine grain."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BILINEAR)
    grain = rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(coarse) + grain, 0, 255).astype(np.uint8))


def save(image: Image.Image, path: Path, **kwargs: Any) -> Path:
    image.save(path, **kwargs)
    return path


def make_images(tmp: Path) -> dict[str, tuple[Path, Image.Image]]:
    """name -> (file for the runtime, the image transformers gets)."""
    base = photo(640, 480)
    rng = np.random.default_rng(1)
    rgba = np.dstack([np.asarray(base), rng.integers(0, 256, (480, 640), dtype=np.uint8)])
    rgba[:100, :100, 3] = 0  # fully transparent and fully opaque corners too
    rgba[-100:, -100:, 3] = 255
    files = {
        "photo_640x480.png": base,
        "photo_300x500.png": photo(300, 500, seed=2),
        "photo_1000x337.jpg": photo(1000, 337, seed=3),
        "rgba.png": Image.fromarray(rgba),
        "la.png": Image.fromarray(rgba).convert("LA"),
        "palette.png": base.convert("P"),
        "palette_transparent.png": base.convert("P"),
        "gray.png": base.convert("L"),
        "cmyk.jpg": base.convert("CMYK"),
    }
    images = {}
    for name, image in files.items():
        kwargs = {"transparency": 7} if name == "palette_transparent.png" else {}
        path = save(image, tmp / name, **kwargs)
        images[name] = (path, Image.open(path))
    for path in EXAMPLES:
        images[path.name] = (path, Image.open(path))
    return images


def test_pixels_equal_transformers(processor: Any, image_processor: ImageProcessor, tmp_path: Path) -> None:
    images = make_images(tmp_path)
    assert images["palette_transparent.png"][1].info.get("transparency") is not None
    assert images["cmyk.jpg"][1].mode == "CMYK"
    for name, (path, reference_image) in images.items():
        expected = reference_pixels(processor, reference_image)
        for source in (path, Image.open(path)):
            got = image_processor(source)
            assert got.shape == expected.shape == (1, 3, 336, 336), name
            assert got.dtype == np.float32, name
            assert np.abs(got - expected).max() <= TOLERANCE, name


def test_exif_orientation_is_applied(processor: Any, image_processor: ImageProcessor, tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = save(photo(640, 480), tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert load_image(path).size == (480, 640)
    expected = reference_pixels(processor, ImageOps.exif_transpose(Image.open(path)))
    assert np.abs(image_processor(path) - expected).max() <= TOLERANCE
    assert np.abs(image_processor(path) - reference_pixels(processor, Image.open(path))).max() > 0.1


def test_sixteen_bit_is_scaled_not_clipped(processor: Any, image_processor: ImageProcessor, tmp_path: Path) -> None:
    values = np.asarray(photo(400, 300).convert("L")).astype(np.uint16) * 257 + 100
    path = save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode == "I;16"
    # Documented deviation: transformers lets Pillow clip at 255 (a near-white image); the runtime scales.
    eight_bit = Image.fromarray(np.round(values / 257).astype(np.uint8))
    assert np.abs(image_processor(path) - reference_pixels(processor, eight_bit)).max() <= TOLERANCE
    assert np.abs(image_processor(path) - reference_pixels(processor, Image.open(path))).max() > 1.0


@pytest.mark.parametrize("mode", ["La", "RGBa", "F"])
def test_other_modes_convert_sensibly(mode: str, processor: Any, image_processor: ImageProcessor) -> None:
    base = photo(320, 240)
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, 320).astype(np.uint8), (240, 1)))
    if mode == "F":
        image = Image.fromarray(np.asarray(base.convert("L")).astype(np.float32) / 255)
        expected = reference_pixels(processor, base.convert("L"))
    else:
        straight = Image.merge("RGBA", (*base.split(), alpha)).convert("LA" if mode == "La" else "RGBA")
        image = straight.convert(mode)  # premultiplied
        expected = reference_pixels(processor, image.convert(straight.mode))
    assert np.abs(image_processor(image) - expected).max() <= TOLERANCE


def test_token_ids_equal_transformers(processor: Any, tokenizer: PromptTokenizer) -> None:
    image = Image.open(EXAMPLES[0])
    for question in QUESTIONS:
        expected = processor(images=image, text=build_prompt(processor, question), return_tensors="np")["input_ids"]
        encoded = tokenizer.encode(question)
        got = encoded.input_ids
        assert got.dtype == np.int64 and got.shape == expected.shape, question
        assert (got == expected).all(), question
        assert encoded.image_start == int(np.flatnonzero(expected[0] == processor.image_token_id)[0])
        assert (got[0] == processor.image_token_id).sum() == 576
    assert "{x}" in tokenizer.decode(tokenizer.encode(QUESTIONS[2]).input_ids)
    assert tokenizer.encode(QUESTIONS[4]).prompt_tokens < MAX_PROMPT_TOKENS
    assert tokenizer.eos_token_ids == (processor.tokenizer.eos_token_id,)


def assert_stream_equals_decode(stream: TextStream, ids: list[int], expected: str, clean: bool) -> None:
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == expected
    if clean:  # the text has no replacement character, so no piece may show one
        assert not any("\ufffd" in piece for piece in pieces)


def test_text_stream_equals_decode(tokenizer: PromptTokenizer) -> None:
    text = " The answer: ¿rojo? 日本語 🐱🚀 naïve café, {x} and\nnew lines. " * 3
    ids = tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
    # Byte-level BPE splits multi-byte characters across tokens: the stream has to hold them back.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    ids = [*ids[:5], 2, *ids[5:], 2]  # special tokens (eos) are skipped
    assert_stream_equals_decode(tokenizer.stream(), ids, tokenizer.decode(ids), clean=True)
    rng = np.random.default_rng(0)
    for _ in range(5):  # random ids: invalid UTF-8 included
        ids = rng.integers(0, tokenizer.tokenizer.get_vocab_size(), 80).tolist()
        assert_stream_equals_decode(tokenizer.stream(), ids, tokenizer.decode(ids), clean=False)


def test_text_stream_sentencepiece_byte_fallback() -> None:
    """Llama's tokenizer: byte-fallback pieces and a decoder that strips the first leading space."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for char in "▁abcdefghijklmnopqrstuvwxyzTH,.?":
        vocab[char] = len(vocab)
    spm = Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    spm.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    spm.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    spm.add_special_tokens(["<unk>", "<s>", "</s>"])
    ids = spm.encode("The café is near, ünder the 🌉 bridge?", add_special_tokens=False).ids
    assert vocab["<0xF0>"] in ids

    def decode(ids: list[int]) -> str:
        return spm.decode(ids, skip_special_tokens=True)

    assert decode(ids) == "The café is near, ünder the 🌉 bridge?"
    assert_stream_equals_decode(TextStream(decode), ids, decode(ids), clean=True)


def test_bad_questions(tokenizer: PromptTokenizer) -> None:
    with pytest.raises(PromptError, match="the question is empty"):
        tokenizer.encode("  \n ")
    with pytest.raises(PromptError, match="image token"):
        tokenizer.encode("What is <image>?")
    question = "Tell me about the shapes. " * 200
    with pytest.raises(PromptError, match="--max-prompt-tokens") as error:
        tokenizer.encode(question)
    image = tokenizer.image_token
    prompt = tokenizer.template.render(Conversation.question(question)).replace(
        image, image * tokenizer.num_image_tokens
    )
    length = len(tokenizer.tokenizer.encode(prompt).ids)
    assert length > MAX_PROMPT_TOKENS
    assert f"{length} tokens" in str(error.value) and f"maximum of {MAX_PROMPT_TOKENS}" in str(error.value)
    assert "shorter question" in str(error.value)


def png_header(width: int, height: int) -> bytes:
    """A small PNG whose header claims the given size (a few bytes of pixel data, far from enough)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_bad_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(source: Any, match: str) -> str:
        with pytest.raises(ImageError, match=match) as error:
            load_image(source)
        assert "\n" not in str(error.value)
        return str(error.value)

    assert str(tmp_path / "missing.png") in refused(tmp_path / "missing.png", "does not exist")
    (tmp_path / "empty.png").write_bytes(b"")
    assert "empty.png" in refused(tmp_path / "empty.png", "empty")
    refused(tmp_path, "directory")
    for fmt, suffix in (("PNG", "png"), ("JPEG", "jpg")):
        data = io.BytesIO()
        photo(200, 150).save(data, fmt)
        path = tmp_path / f"cut.{suffix}"
        path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
        assert path.name in refused(path, "truncated")
    (tmp_path / "notes.txt").write_text("not an image\n")
    assert "notes.txt" in refused(tmp_path / "notes.txt", "not an image")
    (tmp_path / "bomb.png").write_bytes(png_header(100_000, 100_000))
    limit = Image.MAX_IMAGE_PIXELS
    refused(tmp_path / "bomb.png", "too large")
    assert limit == Image.MAX_IMAGE_PIXELS  # Pillow's global is restored
    # Between 1x and 2x the limit Pillow only warns: refused as well.
    path = save(photo(200, 150), tmp_path / "small.png")
    monkeypatch.setattr(runtime.preprocess, "MAX_IMAGE_PIXELS", 200 * 150 - 1)
    refused(path, "too large")
    refused(Image.open(path), "too large")
    monkeypatch.setattr(runtime.preprocess, "MAX_IMAGE_PIXELS", 200 * 150 // 3)
    refused(path, "too large")
    assert limit == Image.MAX_IMAGE_PIXELS


def test_runtime_imports_no_torch_or_transformers() -> None:
    code = (
        "import sys, runtime.preprocess, runtime.text\n"
        "loaded = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
