"""Draw the example images in examples/ and write examples/questions.json.

    python scripts/make_examples.py [--out examples]

The scenes are placed by hand (so the file names say what is in them) and drawn by the shapes
dataset's renderer (vqadata/shapes.py) with a background and clutter from a fixed seed; the questions
use the dataset's templates. Every scene stays inside the dataset's distribution (one to four
objects, radii in its range, inside the frame, no overlaps): the model has seen nothing else, so an
example outside it would measure extrapolation, not the model. The PNG files are the same on every
run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vqadata.shapes import COLOURS, Shape, layout_problem, render, sample_scene

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
            ("triangle", "green", 70, 80, 28),
            ("triangle", "green", 250, 90, 28),
            ("triangle", "green", 160, 200, 28),
            ("star", "purple", 260, 270, 30),
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
            ("triangle", "purple", 90, 80, 30),
            ("square", "white", 250, 80, 30),
            ("star", "blue", 250, 250, 32),
            ("square", "red", 170, 170, 26),
        ],
        [
            ("What colour is the triangle?", "purple"),
            ("Is the blue star above or below the white square?", "below"),
            ("How many squares are there?", "two"),
        ],
    ),
}


def placed_shapes(name: str, placed: list[tuple[str, str, int, int, int]]) -> tuple[Shape, ...]:
    """The hand-placed objects as dataset shapes; ValueError where the dataset could not draw them."""
    shapes = tuple(Shape(k, c, float(x), float(y), float(r), 0.0, COLOURS[c]) for k, c, x, y, r in placed)
    problem = layout_problem(shapes)
    if problem:
        raise ValueError(f"{name}: {problem}")
    return shapes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    questions = []
    for name, (seed, placed, asked) in SCENES.items():
        shapes = placed_shapes(name, placed)
        scene = sample_scene(np.random.default_rng(seed))  # background and clutter
        render(dataclasses.replace(scene, shapes=shapes)).save(args.out / name)
        questions += [{"image": name, "question": q, "answer": a} for q, a in asked]
    (args.out / "questions.json").write_text(json.dumps(questions, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(SCENES)} images and {len(questions)} questions to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
