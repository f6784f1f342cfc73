"""A picture of which image patches CoreMatching kept (for `demo.py --core-tokens`)."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageOps

from buildformat.geometry import patch_count


def core_token_picture(
    image: Image.Image, kept: list[int] | None, image_size: int, patch_size: int, num_image_tokens: int
) -> Image.Image:
    """The model's view of the image (resized, center-cropped) with pruned patches dimmed, kept ones outlined.

    kept: indices into the image's tokens (None: every token was kept). With the "full" select
    strategy the first image token is the CLS token, which has no patch.
    """
    view = ImageOps.fit(image.convert("RGB"), (image_size, image_size), Image.Resampling.BICUBIC)
    grid = image_size // patch_size
    cls_offset = num_image_tokens - patch_count(image_size, patch_size)  # 1: the CLS token is an image token
    keep = set(range(num_image_tokens) if kept is None else kept)
    dim = Image.new("RGB", view.size, (0, 0, 0))
    mask = Image.new("L", view.size, 0)
    draw_mask = ImageDraw.Draw(mask)
    boxes: list[tuple[int, int, int, int]] = []
    for patch in range(grid * grid):
        row, col = divmod(patch, grid)
        box = (col * patch_size, row * patch_size, (col + 1) * patch_size - 1, (row + 1) * patch_size - 1)
        if patch + cls_offset in keep:
            boxes.append(box)
        else:
            draw_mask.rectangle(box, fill=170)  # dim what was pruned
    out = Image.composite(dim, view, mask)
    draw = ImageDraw.Draw(out)
    for box in boxes:
        draw.rectangle(box, outline=(255, 200, 0))
    return out
