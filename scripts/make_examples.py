"""Draw the example images in examples/ and write examples/questions.json.

    python scripts/make_examples.py [--out examples]

The scenes are placed by hand (so the file names say what is in them) and drawn by the shapes
dataset's renderer (vqa/shapes.py) with a background and clutter from a fixed seed; the questions
use the dataset's templates. Every scene stays inside the dataset's distribution (one to four
objects, radii in its range, inside the frame, no overlaps): the model has seen nothing else, so an
example outside it would measure extrapolation, not the model. The PNG files are the same on every
run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vqa.shapes import (
    COLOURS,
    IMAGE_SIZE,
    MAX_OBJECTS,
    MAX_RADIUS,
    MIN_OBJECTS,
    MIN_RADIUS,
    Shape,
    render,
    sample_scene,
)

# name -> (seed of the background and clutter, [(kind, colour, x, y, radius)], [(question, answer)])
SCENES: dict[str, tuple[int, list[tuple[str, str, int, int, int]], list[tuple[str, str]]]] = {
    "shapes_red_circle.png": (
        11,
        [("circle", "red", 90, 120, 32), ("square", "blue", 240, 130, 34), ("star", "yellow", 170, 260, 30)],
        [
            ("What colour is the circle?", "red"),
            ("What shape is the blue object?", "square"),
            ("Is the red circle left or right of the blue square?", "left"),
        ],
    ),
    "shapes_three_triangles.png": (
        12,
        [
            ("triangle", "green", 70, 80, 28), ("triangle", "green", 250, 90, 28),
            ("triangle", "green", 160, 200, 28), ("star", "purple", 260, 270, 30),
        ],
        [
            ("How many triangles are there?", "three"),
            ("Is there a purple star?", "yes"),
            ("Is there a green circle?", "no"),
        ],
    ),
    "shapes_mixed.png": (
        13,
        [
            ("triangle", "purple", 90, 80, 30), ("square", "white", 250, 80, 30),
            ("star", "blue", 250, 250, 32), ("square", "red", 170, 170, 26),
        ],
        [
            ("What colour is the triangle?", "purple"),
            ("Is the blue star above or below the white square?", "below"),
            ("How many squares are there?", "two"),
        ],
    ),
}


def check_in_distribution(name: str, placed: list[tuple[str, str, int, int, int]]) -> None:
    """Raise ValueError where a hand-placed scene is one the dataset could not draw."""
    if not MIN_OBJECTS <= len(placed) <= MAX_OBJECTS:
        raise ValueError(f"{name}: {len(placed)} objects; the dataset has {MIN_OBJECTS} to {MAX_OBJECTS}")
    for i, (_, _, x, y, r) in enumerate(placed):
        if not MIN_RADIUS <= r <= MAX_RADIUS or not r + 4 <= min(x, y) <= max(x, y) <= IMAGE_SIZE - r - 4:
            raise ValueError(f"{name}: object {i} (radius {r} at {x}, {y}) is outside the dataset's sizes or frame")
        for j, (_, _, x2, y2, r2) in enumerate(placed[:i]):
            if math.hypot(x - x2, y - y2) < r + r2 + 8:
                raise ValueError(f"{name}: objects {j} and {i} overlap; the dataset keeps every object whole")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    questions = []
    for name, (seed, placed, asked) in SCENES.items():
        check_in_distribution(name, placed)
        scene = sample_scene(np.random.default_rng(seed))  # background and clutter
        shapes = tuple(Shape(k, c, float(x), float(y), float(r), 0.0, COLOURS[c]) for k, c, x, y, r in placed)
        render(dataclasses.replace(scene, shapes=shapes)).save(args.out / name)
        questions += [{"image": name, "question": q, "answer": a} for q, a in asked]
    (args.out / "questions.json").write_text(json.dumps(questions, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(SCENES)} images and {len(questions)} questions to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
