"""Draw the example images in examples/ and write examples/questions.json.

    python scripts/make_examples.py [--out examples]

Plain Pillow drawing with fixed coordinates and no anti-aliasing, so the PNG
files are the same on every run. Each scene has a known answer per question,
which the (later) trained default model can be checked against.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from PIL import Image, ImageDraw

logger = logging.getLogger("make_examples")

SIZE = 336  # LLaVA-1.5's input resolution: the processor then only normalises

Shape = tuple[str, str, tuple[int, int, int, int]]  # kind, colour, bounding box

# name -> (background, shapes, [(question, answer), ...])
SCENES: dict[str, tuple[str, list[Shape], list[tuple[str, str]]]] = {
    "shapes_red_circle.png": (
        "white",
        [("circle", "red", (40, 118, 140, 218)), ("square", "blue", (196, 118, 296, 218))],
        [
            ("What colour is the circle?", "red"),
            ("What colour is the square?", "blue"),
            ("Is the circle on the left or on the right?", "left"),
        ],
    ),
    "shapes_three_triangles.png": (
        "lightgray",
        [
            ("triangle", "green", (30, 60, 120, 150)),
            ("triangle", "green", (200, 40, 290, 130)),
            ("triangle", "green", (110, 200, 200, 290)),
        ],
        [
            ("How many triangles are there?", "three"),
            ("What colour are the triangles?", "green"),
            ("Is there a circle in the image?", "no"),
        ],
    ),
    "shapes_mixed.png": (
        "navy",
        [
            ("circle", "yellow", (128, 20, 208, 100)),
            ("rectangle", "orange", (40, 150, 296, 200)),
            ("square", "white", (138, 236, 198, 296)),
        ],
        [
            ("What colour is the circle?", "yellow"),
            ("What shape is at the bottom?", "square"),
            ("What colour is the rectangle?", "orange"),
        ],
    ),
}


def draw_scene(background: str, shapes: list[Shape]) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), background)
    draw = ImageDraw.Draw(image)
    for kind, colour, (x0, y0, x1, y1) in shapes:
        if kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind in ("square", "rectangle"):
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif kind == "triangle":
            draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)
        else:
            raise ValueError(f"unknown shape kind {kind!r}")
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples"), help="output directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    args.out.mkdir(parents=True, exist_ok=True)
    questions = []
    for name, (background, shapes, qa) in SCENES.items():
        draw_scene(background, shapes).save(args.out / name, format="PNG", optimize=False)
        questions += [{"image": name, "question": q, "answer": a} for q, a in qa]
    (args.out / "questions.json").write_text(json.dumps(questions, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %d images and %d questions to %s", len(SCENES), len(questions), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
