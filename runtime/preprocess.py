"""Image loading and preprocessing for the torch-free runtime (Pillow and numpy only).

`ImageProcessor` reproduces the pixel values of transformers' Pillow-backed CLIP / LLaVA image
processor (`CLIPImageProcessorPil`, `LlavaImageProcessorPil`, transformers 5): the same resize output
size (shortest edge scaled with `int()` truncation), Pillow filter, center-crop offsets, float64
rescale then float32 normalize. `load_image` turns a file or a PIL image into the RGB image those
processors would see, with one-line errors for the files a user can actually pass.

Pixel modes (what transformers' `convert_to_rgb` does, and where this module differs):

- RGB, L, 1, P, CMYK, YCbCr, HSV, LAB: `Image.convert("RGB")`, as transformers.
- RGBA, LA, PA, and P / L / RGB with a `transparency` entry: composited onto white, as transformers.
- I;16 / I;16L / I;16B / I;16N (16-bit PNG and TIFF): scaled to 8 bits (`round(v / 257)`), then as L.
  transformers lets Pillow clip every value above 255, which turns a 16-bit photo nearly white.
- I (32-bit integer): as L when every value is in 0..255 (what transformers gets); otherwise treated as
  16-bit data (clipped to 0..65535 and scaled like I;16) instead of Pillow's clipping.
- F (32-bit float): values all in [0, 1] are scaled by 255; otherwise Pillow's conversion, as transformers.
- La / RGBa (premultiplied alpha): un-premultiplied to LA / RGBA and composited onto white; transformers
  fails on La and drops RGBa's alpha without compositing.
- EXIF orientation is applied (what a viewer shows); transformers ignores it.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from buildformat import Manifest

# Pillow's default limit (a warning above it, an error above twice it); any image over it is refused.
MAX_IMAGE_PIXELS = 89_478_485
PREPROCESSOR_FILE = "preprocessor_config.json"
# Processor classes whose Pillow pipeline this module reproduces (the "Fast" / "Pil" variants share configs).
_CLIP_TYPES = ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil")
_LLAVA_TYPES = ("LlavaImageProcessor", "LlavaImageProcessorFast", "LlavaImageProcessorPil")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageError(ValueError):
    """An image cannot be used; the one-line message names the file, the problem and the fix."""


class ImageTooLarge(ImageError):
    """An image over the pixel limit (a decompression bomb is refused before its pixels are decoded)."""


@contextmanager
def _pixel_limit(limit: int | None) -> Iterator[None]:
    # Pillow reads the limit from a module global at open time; set it for this call only and turn its
    # warning (between 1x and 2x the limit) into an error too. Not thread-safe, as Pillow's global is not.
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _too_large(name: str, detail: str, limit: int) -> ImageError:
    return ImageTooLarge(f"image {name} is too large ({detail}); downscale it below {limit:,} pixels")


def _claimed_size(path: Path) -> str:
    # Pillow's message names twice the limit above 2x; reread the header (no pixels) for the real size.
    try:
        with _pixel_limit(None), Image.open(path) as image:
            width, height = image.size
        return f"{width}x{height} = {width * height:,} pixels"
    except (OSError, SyntaxError, EOFError, ValueError):
        return "over the limit"


def _open(path: Path, limit: int) -> Image.Image:
    if not path.exists():
        raise ImageError(f"image {path} does not exist; check the path")
    if path.is_dir():
        raise ImageError(f"image {path} is a directory; pass an image file (PNG or JPEG)")
    try:
        empty = path.stat().st_size == 0
    except OSError as e:
        raise ImageError(f"cannot read image {path} ({e.strerror}); check the path and its permissions") from None
    if empty:
        raise ImageError(f"image {path} is empty (0 bytes); pass a complete PNG or JPEG file")
    return _decode(path, str(path), limit, lambda: _claimed_size(path))


def _decode(source: Path | io.BytesIO, name: str, limit: int, claimed: Callable[[], str]) -> Image.Image:
    """Open and fully decode an image file or an in-memory one, every failure an ImageError."""
    try:
        with _pixel_limit(limit):
            image = Image.open(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_large(name, claimed(), limit) from None
    except PermissionError as e:
        raise ImageError(f"cannot read image {name} ({e.strerror}); check its permissions") from None
    except (UnidentifiedImageError, SyntaxError, EOFError, ValueError) as e:
        detail = "unknown format" if isinstance(e, UnidentifiedImageError) and not isinstance(source, Path) else e
        raise ImageError(f"{name} is not an image Pillow can read ({detail}); pass a PNG or JPEG file") from None
    except OSError as e:
        raise ImageError(f"cannot read image {name} ({e}); check the file") from None
    try:
        # Pillow decodes lazily: load now, so that a truncated file fails here and not mid-pipeline.
        with image:
            image.load()
            return _exif_transpose(image)
    except (OSError, SyntaxError, EOFError, ValueError) as e:
        raise ImageError(f"image {name} is truncated or corrupt ({e}); re-download or re-export it") from None


def _claimed_size_of_bytes(data: bytes) -> str:
    try:
        with _pixel_limit(None), Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        return f"{width}x{height} = {width * height:,} pixels"
    except (OSError, SyntaxError, EOFError, ValueError):
        return "over the limit"


def _exif_transpose(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError):
        # Broken EXIF data: a viewer shows such an image unrotated, so do the same.
        return image.copy()


def _sixteen_to_l(values: np.ndarray) -> Image.Image:
    # round(v * 255 / 65535) in integer arithmetic: exact, and the same on every platform.
    wide = np.clip(values.astype(np.int64), 0, 65535)
    return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT:
        return _sixteen_to_l(np.asarray(image))
    values = np.asarray(image)
    if image.mode == "I":
        if values.size and (values.min() < 0 or values.max() > 255):
            return _sixteen_to_l(values)
        return image.convert("L")
    # Mode F: [0, 1] is the usual range of float images; anything else goes through Pillow (clipping).
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        return Image.fromarray(np.round(values.astype(np.float64) * 255.0).astype(np.uint8))
    return image.convert("L")


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    try:
        if image.mode in (*_SIXTEEN_BIT, "I", "F"):
            image = _high_depth_to_l(image)
        elif image.mode in ("La", "RGBa"):
            image = image.convert("LA" if image.mode == "La" else "RGBA")
        # From here exactly transformers' image_transforms.convert_to_rgb for PIL images.
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(
            f"image {name} has pixel mode {image.mode}, which cannot be converted to RGB ({e}); "
            "save it as an 8-bit RGB PNG or JPEG"
        ) from None


def load_image(source: str | Path | bytes | Image.Image, max_pixels: int | None = None) -> Image.Image:
    """The RGB image a viewer shows for a file path, an encoded file's bytes or a PIL image.

    Anything unusable is an ImageError naming the problem.

    max_pixels: refuse larger images (default MAX_IMAGE_PIXELS, read at call time).
    """
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(source, Image.Image):
        name = "(in-memory PIL image)"
        width, height = source.size
        if width * height > limit:
            raise _too_large(name, f"{width}x{height} = {width * height:,} pixels", limit)
        try:
            source.load()
        except (OSError, SyntaxError, EOFError, ValueError) as e:
            raise ImageError(f"image {name} is truncated or corrupt ({e}); re-download or re-export it") from None
        image = _exif_transpose(source)
    elif isinstance(source, (str, Path)):
        name = str(source)
        image = _open(Path(source), limit)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        # An encoded file in memory (an upload): the same checks as a file on disk.
        data = bytes(source)
        name = f"({len(data):,}-byte upload)"
        if not data:
            raise ImageError("the image is empty (0 bytes); send a complete PNG or JPEG file")
        image = _decode(io.BytesIO(data), name, limit, lambda: _claimed_size_of_bytes(data))
    else:
        raise ImageError(
            f"cannot use {type(source).__name__} as an image; pass a file path, the file's bytes or a PIL image"
        )
    return _to_rgb(image, name)


def _size_dict(value: Any, what: str) -> dict[str, int]:
    # transformers' get_size_dict for CLIP / LLaVA (default_to_square=False): an int is a shortest edge.
    if isinstance(value, int):
        return {"shortest_edge": value} if what == "size" else {"height": value, "width": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    if isinstance(value, dict):
        return {k: int(v) for k, v in value.items() if v is not None}
    raise ValueError(f"{what} {value!r} in {PREPROCESSOR_FILE} is not a size; rebuild the build directory")


@dataclass(frozen=True)
class ImageProcessor:
    """The build's image preprocessing: PIL image -> pixel_values [1, 3, H, W] float32."""

    do_resize: bool = True
    size: dict[str, int] | None = None
    resample: int = int(Image.Resampling.BICUBIC)
    do_center_crop: bool = True
    crop_size: dict[str, int] | None = None
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    pad_to_square: bool = False  # LLaVA's expand2square with the mean colour, before resizing
    pad_size: dict[str, int] | None = None  # CLIP's do_pad: zeros at the bottom / right, after normalizing

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ImageProcessor:
        kind = str(config.get("image_processor_type", "CLIPImageProcessor"))
        if kind not in _CLIP_TYPES + _LLAVA_TYPES:
            raise ValueError(
                f"image processor {kind} is not supported by the runtime (only CLIP / LLaVA-1.5 preprocessing); "
                "use a LLaVA-1.5 style checkpoint"
            )
        llava = kind in _LLAVA_TYPES
        # do_convert_rgb is not read: the vision graph takes 3 channels, so every image is made RGB
        # (with do_convert_rgb false transformers would pass RGBA / L arrays through and fail later).
        do_pad = bool(config.get("do_pad", False))
        size = _size_dict(config["size"], "size") if config.get("size") is not None else {"shortest_edge": 224}
        crop = config.get("crop_size")
        # CLIP's do_pad pads a batch to its largest image: a no-op for one image unless pad_size is set.
        pad_size = None
        if not llava and do_pad and config.get("pad_size"):
            pad_size = _size_dict(config["pad_size"], "pad_size")
        processor = cls(
            do_resize=bool(config.get("do_resize", True)),
            size=size,
            resample=int(config.get("resample", int(Image.Resampling.BICUBIC))),
            do_center_crop=bool(config.get("do_center_crop", True)),
            crop_size=_size_dict(crop, "crop_size") if crop is not None else {"height": 224, "width": 224},
            do_rescale=bool(config.get("do_rescale", True)),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            do_normalize=bool(config.get("do_normalize", True)),
            image_mean=tuple(float(x) for x in config.get("image_mean", cls.image_mean)),
            image_std=tuple(float(x) for x in config.get("image_std", cls.image_std)),
            pad_to_square=llava and do_pad,
            pad_size=pad_size,
        )
        processor._check()
        return processor

    @classmethod
    def from_build(cls, build_dir: str | Path, manifest: Manifest | None = None) -> ImageProcessor:
        """The processor of a build directory; with its manifest, the output size is checked against the model."""
        name = manifest.tokenizer.preprocessor if manifest is not None else PREPROCESSOR_FILE
        path = Path(build_dir) / name
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} is missing; the build is incomplete, rebuild it") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); rebuild the build directory") from None
        processor = cls.from_config(config)
        image_size = manifest.model.image_size if manifest is not None else None
        if image_size is not None and processor.output_size() not in (None, (image_size, image_size)):
            raise ValueError(
                f"{path} makes {processor.output_size()} images but the model takes {image_size}x{image_size}; "
                "rebuild the build directory"
            )
        return processor

    def _check(self) -> None:
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"{PREPROCESSOR_FILE}: image_mean and image_std need 3 values (RGB)")
        size = self.size or {}
        if self.do_resize and not ({"shortest_edge"} <= size.keys() or {"height", "width"} <= size.keys()):
            raise ValueError(f"{PREPROCESSOR_FILE}: size {size} is not supported (shortest_edge or height/width)")
        if self.do_center_crop and not {"height", "width"} <= (self.crop_size or {}).keys():
            raise ValueError(f"{PREPROCESSOR_FILE}: crop_size {self.crop_size} needs height and width")

    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output, or None where it depends on the image."""
        if self.pad_size:
            return self.pad_size["height"], self.pad_size["width"]
        if self.do_center_crop and self.crop_size:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and self.size and "height" in self.size and "shortest_edge" not in self.size:
            return self.size["height"], self.size["width"]
        return None

    def _resize_to(self, height: int, width: int) -> tuple[int, int]:
        size = self.size or {}
        short_target = size.get("shortest_edge")
        if short_target is None:
            return size["height"], size["width"]
        longest = size.get("longest_edge")
        if longest is not None:
            return _size_with_aspect_ratio(height, width, short_target, longest)
        # transformers' get_resize_output_image_size(default_to_square=False): truncation, not rounding.
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = short_target, int(short_target * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def __call__(self, image: str | Path | Image.Image) -> np.ndarray:
        """pixel_values [1, 3, H, W] float32 for an image file or PIL image (loaded with `load_image`)."""
        pixels = np.asarray(load_image(image))  # [H, W, 3] uint8; the steps below keep this layout
        if self.pad_to_square:
            pixels = _expand_to_square(pixels, tuple(int(m * 255) for m in self.image_mean))
        if self.do_resize:
            height, width = self._resize_to(*pixels.shape[:2])
            resized = Image.fromarray(pixels).resize((width, height), resample=self.resample)
            pixels = np.asarray(resized)
        if self.do_center_crop and self.crop_size:
            pixels = _center_crop(pixels, self.crop_size["height"], self.crop_size["width"])
        values: np.ndarray = pixels
        if self.do_rescale:
            # transformers multiplies in float64 and casts to float32 afterwards.
            values = (values.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            values = values.astype(np.float32, copy=False)
            mean = np.asarray(self.image_mean, dtype=np.float32)
            std = np.asarray(self.image_std, dtype=np.float32)
            values = (values - mean) / std  # float32 throughout, as transformers' normalize
        values = values.astype(np.float32, copy=False)
        if self.pad_size:
            values = _pad_bottom_right(values, self.pad_size["height"], self.pad_size["width"])
        return np.ascontiguousarray(values.transpose(2, 0, 1)[None])


def _size_with_aspect_ratio(height: int, width: int, size: int, max_size: int) -> tuple[int, int]:
    # transformers' image_transforms.get_size_with_aspect_ratio (shortest_edge with longest_edge).
    raw_size = None
    if max(height, width) / min(height, width) * size > max_size:
        raw_size = max_size * min(height, width) / max(height, width)
        size = round(raw_size)
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if width < height:
        return int((raw_size if raw_size is not None else size) * height / width), size
    return size, int((raw_size if raw_size is not None else size) * width / height)


def _expand_to_square(pixels: np.ndarray, color: Sequence[int]) -> np.ndarray:
    # LlavaImageProcessorPil.pad_to_square: centred with (max - side) // 2 before, the mean colour around.
    height, width = pixels.shape[:2]
    if height == width:
        return pixels
    side = max(height, width)
    result = np.empty((side, side, pixels.shape[2]), dtype=pixels.dtype)
    result[...] = np.asarray(color, dtype=pixels.dtype)
    if width > height:
        top = (side - height) // 2
        result[top : top + height] = pixels
    else:
        left = (side - width) // 2
        result[:, left : left + width] = pixels
    return result


def _center_crop(pixels: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    # transformers' image_transforms.center_crop: offsets (size - crop) // 2, zero padding when too small.
    height, width = pixels.shape[:2]
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + crop_height, left : left + crop_width]
    new_height, new_width = max(crop_height, height), max(crop_width, width)
    padded = np.zeros((new_height, new_width, pixels.shape[2]), dtype=pixels.dtype)
    top_pad, left_pad = math.ceil((new_height - height) / 2), math.ceil((new_width - width) / 2)
    padded[top_pad : top_pad + height, left_pad : left_pad + width] = pixels
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top) : min(new_height, top + crop_height), max(0, left) : min(new_width, left + crop_width)]


def _pad_bottom_right(values: np.ndarray, height: int, width: int) -> np.ndarray:
    extra_h, extra_w = height - values.shape[0], width - values.shape[1]
    if extra_h < 0 or extra_w < 0:
        raise ImageError(f"the processed image is {values.shape[0]}x{values.shape[1]}, larger than pad_size")
    return np.pad(values, ((0, extra_h), (0, extra_w), (0, 0)))
