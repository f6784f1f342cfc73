"""A procedural visual question-answering dataset at the LLaVA-1.5 geometry (numpy and Pillow only).

Every image is 336 x 336 (patch 14: 576 image tokens): a textured background with low-saturation
clutter and one to four saturated shapes (circle, square, triangle, star) of several sizes. Each
question is about a few of those shapes, so its answer depends on a few regions of the image:

- colour:   "What colour is the star?"                          (the named shape is unique)
- shape:    "What shape is the purple object?"                  (the named colour is unique)
- count:    "How many circles are there?"                       (zero .. four)
- presence: "Is there a red square?"                            (yes / no, with hard negatives)
- position: "Is the red circle left or right of the blue star?" (or above / below)

Answers are one word, each a single token of the project tokenizer. Everything is deterministic:
example `i` of a split is drawn from `numpy.random.default_rng((split_key, i))`, and the split keys
differ, so train, validation and test are disjoint random streams (and the tests check that no image
is shared). The test split cycles through the question types, so every type has the same weight.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 336
PATCH_SIZE = 14
GRID = IMAGE_SIZE // PATCH_SIZE  # 24 x 24 = 576 patches

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 85, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
NUMBERS = ("zero", "one", "two", "three", "four", "five")
QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "count", "presence", "position")
SPLITS: dict[str, int] = {"train": 1001, "validation": 2002, "test": 3003}

MIN_OBJECTS, MAX_OBJECTS = 1, 4
MIN_RADIUS, MAX_RADIUS = 24, 44  # px: objects span about 3.5 to 6 patches
POSITION_MARGIN = 24  # px between two centres along the asked axis
FRAME_MARGIN = 4  # px between an object's circumscribed circle and the image border
OBJECT_GAP = 8  # px between two objects' circumscribed circles: every object is fully visible


class DatasetError(ValueError):
    """A split name or index that does not exist."""


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # one of COLOURS
    x: float  # centre, px
    y: float
    radius: float  # px: the circumscribed circle
    angle: float  # degrees: rotation of triangles and stars
    rgb: tuple[int, int, int]  # the drawn colour (the named colour with a little jitter)


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: tuple[tuple[int, int, int], tuple[int, int, int]]  # gradient from, to
    gradient_angle: float
    noise_seed: int
    clutter: tuple[tuple[str, tuple[float, ...], tuple[int, int, int]], ...]  # (kind, geometry, rgb)


@dataclass(frozen=True)
class Question:
    type: str  # one of QUESTION_TYPES
    text: str
    answer: str
    objects: tuple[int, ...]  # indices into scene.shapes the answer depends on


@dataclass(frozen=True)
class Example:
    """One test or validation item: an image, one question about it, its answer."""

    split: str
    index: int
    scene: Scene
    question: Question
    image_id: str = field(default="")

    @property
    def answers(self) -> tuple[str, ...]:
        return (self.question.answer,)

    def image(self) -> Image.Image:
        return render(self.scene)

    def relevant_patches(self) -> np.ndarray:
        """bool [576]: the patches covered by the objects the answer depends on."""
        return object_patches(self.scene, self.question.objects)


# ----------------------------------------------------------------------------- scenes


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)  # type: ignore[return-value]


def _muted(rng: np.random.Generator) -> tuple[int, int, int]:
    """A low-saturation, mid-to-dark colour: never confusable with the named colours."""
    value = rng.uniform(50, 150)
    tint = rng.uniform(-18, 18, size=3)
    return tuple(int(np.clip(value + t, 0, 255)) for t in tint)  # type: ignore[return-value]


def sample_scene(rng: np.random.Generator, crowded: bool = False) -> Scene:
    """A random scene. `crowded` (training only): three or four objects of two kinds, where counts of
    three and four, rare in the test distribution's scenes, are common."""
    if crowded:
        n = int(rng.integers(3, MAX_OBJECTS + 1))
        kinds = tuple(rng.choice(SHAPES, size=2, replace=False))
    else:
        n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
        # Half the scenes draw their shapes from two kinds only, so that counts above one are common.
        kinds = SHAPES if rng.random() < 0.5 else tuple(rng.choice(SHAPES, size=2, replace=False))
    shapes: list[Shape] = []
    attempts = 0
    while len(shapes) < n and attempts < 200:
        attempts += 1
        r = float(rng.uniform(MIN_RADIUS, MAX_RADIUS))
        x, y = (float(v) for v in rng.uniform(r + FRAME_MARGIN, IMAGE_SIZE - r - FRAME_MARGIN, size=2))
        if any(_too_close(x, y, r, s) for s in shapes):
            continue
        kind = str(rng.choice(kinds))
        colour = str(rng.choice(list(COLOURS)))
        shapes.append(Shape(kind, colour, x, y, r, float(rng.uniform(-25, 25)), _jitter(rng, COLOURS[colour], 18)))
    clutter = []
    for _ in range(int(rng.integers(8, 30))):
        rgb = _muted(rng)
        if rng.random() < 0.5:  # a short line
            x, y = rng.uniform(0, IMAGE_SIZE, size=2)
            length, theta = rng.uniform(6, 22), rng.uniform(0, math.pi)
            geometry = (x, y, x + length * math.cos(theta), y + length * math.sin(theta), float(rng.integers(1, 3)))
            clutter.append(("line", tuple(float(g) for g in geometry), rgb))
        else:  # a dot
            x, y = rng.uniform(0, IMAGE_SIZE, size=2)
            clutter.append(("dot", (float(x), float(y), float(rng.uniform(1, 3.5))), rgb))
    return Scene(
        shapes=tuple(shapes),
        background=(_muted(rng), _muted(rng)),
        gradient_angle=float(rng.uniform(0, 2 * math.pi)),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
        clutter=tuple(clutter),  # type: ignore[arg-type]
    )


def _too_close(x: float, y: float, radius: float, other: Shape) -> bool:
    return math.hypot(x - other.x, y - other.y) < radius + other.radius + OBJECT_GAP


def layout_problem(shapes: tuple[Shape, ...]) -> str | None:
    """Why `sample_scene` could never place these objects (count, size, frame, overlap), or None."""
    if not MIN_OBJECTS <= len(shapes) <= MAX_OBJECTS:
        return f"{len(shapes)} objects; the dataset has {MIN_OBJECTS} to {MAX_OBJECTS}"
    for i, s in enumerate(shapes):
        low, high = s.radius + FRAME_MARGIN, IMAGE_SIZE - s.radius - FRAME_MARGIN
        if not MIN_RADIUS <= s.radius <= MAX_RADIUS or not low <= min(s.x, s.y) <= max(s.x, s.y) <= high:
            return f"object {i} (radius {s.radius:g} at {s.x:g}, {s.y:g}) is outside the dataset's sizes or frame"
        if any(_too_close(s.x, s.y, s.radius, other) for other in shapes[:i]):
            return f"object {i} overlaps an earlier one; the dataset keeps every object whole"
    return None


def _polygon(shape: Shape) -> list[tuple[float, float]]:
    x, y, r = shape.x, shape.y, shape.radius
    a = math.radians(shape.angle)
    if shape.kind == "square":
        half = r / math.sqrt(2)  # axis-aligned: a rotated square would read as a diamond
        return [(x - half, y - half), (x + half, y - half), (x + half, y + half), (x - half, y + half)]
    if shape.kind == "triangle":
        return [(x + r * math.sin(a + t), y - r * math.cos(a + t)) for t in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    if shape.kind == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.42
            t = a + i * math.pi / 5
            points.append((x + radius * math.sin(t), y - radius * math.cos(t)))
        return points
    raise AssertionError(shape.kind)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, fill: int | tuple[int, int, int]) -> None:
    if shape.kind == "circle":
        # 0.85 r: a circle's area otherwise dwarfs the other kinds of the same radius
        r = shape.radius * 0.85
        draw.ellipse((shape.x - r, shape.y - r, shape.x + r, shape.y + r), fill=fill)
    else:
        draw.polygon(_polygon(shape), fill=fill)


def render(scene: Scene) -> Image.Image:
    """The RGB image of a scene (336 x 336), identical on every run."""
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) / IMAGE_SIZE  # [H, W]
    t = 0.5 + 0.5 * (np.cos(scene.gradient_angle) * (xs - 0.5) + np.sin(scene.gradient_angle) * (ys - 0.5)) * 1.4
    t = np.clip(t, 0, 1)[..., None]  # [H, W, 1]
    start, stop = (np.array(c, dtype=np.float32) for c in scene.background)
    pixels = start * (1 - t) + stop * t  # [H, W, 3]
    noise = np.random.default_rng(scene.noise_seed).normal(0, 7, size=pixels.shape).astype(np.float32)
    image = Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for kind, geometry, rgb in scene.clutter:
        if kind == "line":
            x0, y0, x1, y1, width = geometry
            draw.line((x0, y0, x1, y1), fill=rgb, width=int(width))
        else:
            x, y, r = geometry
            draw.ellipse((x - r, y - r, x + r, y + r), fill=rgb)
    for shape in scene.shapes:
        _draw_shape(draw, shape, shape.rgb)
    return image


def _coverage(shapes: list[Shape]) -> np.ndarray:
    """float [576]: the share of each patch (row-major, as CLIP) that the given shapes cover."""
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    for shape in shapes:
        _draw_shape(draw, shape, 255)
    pixels = np.asarray(mask, dtype=np.float32).reshape(GRID, PATCH_SIZE, GRID, PATCH_SIZE)
    return (pixels.mean(axis=(1, 3)) / 255).reshape(-1)


def object_patches(scene: Scene, objects: tuple[int, ...], min_cover: float = 0.1) -> np.ndarray:
    """bool [576]: patches at least `min_cover` covered by any of the given shapes."""
    return _coverage([scene.shapes[i] for i in objects]) >= min_cover


def patch_labels(scene: Scene, min_cover: float = 0.3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-patch targets (int64 [576] each): colour and shape of the object covering the patch most
    (0: none; else 1 + index in COLOURS / SHAPES) and 1 where the patch holds an object's centre.

    Training only: an auxiliary loss on the vision tower (training/train.py); the model never sees them.
    """
    colour = np.zeros(GRID * GRID, dtype=np.int64)
    kind = np.zeros(GRID * GRID, dtype=np.int64)
    centre = np.zeros(GRID * GRID, dtype=np.int64)
    best = np.full(GRID * GRID, min_cover, dtype=np.float32)
    names = list(COLOURS)
    for shape in scene.shapes:
        cover = _coverage([shape])
        wins = cover >= best
        colour[wins] = 1 + names.index(shape.colour)
        kind[wins] = 1 + SHAPES.index(shape.kind)
        best = np.maximum(best, cover)
        centre[int(shape.y // PATCH_SIZE) * GRID + int(shape.x // PATCH_SIZE)] = 1
    return colour, kind, centre


# ----------------------------------------------------------------------------- questions


def _unique(values: list[str]) -> list[str]:
    return sorted(v for v in set(values) if values.count(v) == 1)


def ask(scene: Scene, qtype: str, rng: np.random.Generator) -> Question | None:
    """A question of `qtype` about the scene, or None where the scene cannot support one."""
    shapes = scene.shapes
    kinds = [s.kind for s in shapes]
    colours = [s.colour for s in shapes]
    if qtype in ("colour", "shape"):
        # Name the object by its other attribute, which must be unique in the scene.
        names, answers = (kinds, colours) if qtype == "colour" else (colours, kinds)
        unique = _unique(names)
        if not unique:
            return None
        name = str(rng.choice(unique))
        i = names.index(name)
        text = f"What colour is the {name}?" if qtype == "colour" else f"What shape is the {name} object?"
        return Question(qtype, text, answers[i], (i,))
    if qtype == "count":
        present = sorted(set(kinds))
        kind = str(rng.choice(present)) if rng.random() < 0.8 else str(rng.choice(SHAPES))
        which = tuple(i for i, k in enumerate(kinds) if k == kind)
        return Question("count", f"How many {PLURALS[kind]} are there?", NUMBERS[len(which)], which)
    if qtype == "presence":
        pairs = {(s.colour, s.kind) for s in shapes}
        if rng.random() < 0.5:
            i = int(rng.integers(len(shapes)))
            colour, kind, answer = shapes[i].colour, shapes[i].kind, "yes"
            which: tuple[int, ...] = tuple(j for j, s in enumerate(shapes) if (s.colour, s.kind) == (colour, kind))
        else:
            # Hard negatives: the colour or the shape is in the image, just not together.
            near = [(c, k) for c in COLOURS for k in SHAPES if (c, k) not in pairs and (c in colours or k in kinds)]
            far = [(c, k) for c in COLOURS for k in SHAPES if (c, k) not in pairs]
            colour, kind = near[int(rng.integers(len(near)))] if near else far[int(rng.integers(len(far)))]
            answer = "no"
            which = tuple(j for j, s in enumerate(shapes) if s.colour == colour or s.kind == kind)
        return Question("presence", f"Is there a {colour} {kind}?", answer, which)
    if qtype == "position":
        pairs = [(s.colour, s.kind) for s in shapes]
        named = [i for i, p in enumerate(pairs) if pairs.count(p) == 1]
        axis = "x" if rng.random() < 0.5 else "y"
        options = [
            (a, b)
            for a in named
            for b in named
            if a != b and abs(getattr(shapes[a], axis) - getattr(shapes[b], axis)) >= POSITION_MARGIN
        ]
        if not options:
            return None
        a, b = options[int(rng.integers(len(options)))]
        sa, sb = shapes[a], shapes[b]
        if axis == "x":
            text = f"Is the {sa.colour} {sa.kind} left or right of the {sb.colour} {sb.kind}?"
            answer = "left" if sa.x < sb.x else "right"
        else:
            text = f"Is the {sa.colour} {sa.kind} above or below the {sb.colour} {sb.kind}?"
            answer = "above" if sa.y < sb.y else "below"
        return Question("position", text, answer, (a, b))
    raise DatasetError(f"unknown question type {qtype!r}; known: {', '.join(QUESTION_TYPES)}")


def _rng(split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if index < 0:
        raise DatasetError(f"example index must be >= 0, got {index}")
    return np.random.default_rng((SPLITS[split], index))


def example(split: str, index: int) -> Example:
    """Example `index` of a validation or test split: question type `QUESTION_TYPES[index % 5]`."""
    rng = _rng(split, index)
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    while True:  # redraw the scene until it supports the question type (a few tries at most)
        scene = sample_scene(rng)
        question = ask(scene, qtype, rng)
        if question is not None:
            return Example(split, index, scene, question, image_id=f"{split}-{index:06d}")


def examples(split: str, count: int, start: int = 0) -> Iterator[Example]:
    for i in range(start, start + count):
        yield example(split, i)


def training_sample(index: int, turns: int = 12, crowded: float = 0.0) -> tuple[Scene, list[Question]]:
    """A training image with up to `turns` different questions about it, the types taken in turn, shuffled.

    Many questions per image: each costs a dozen tokens next to the image's 576, so a step learns
    from several times more answers for nearly the same compute. A share `crowded` of the images are
    crowded scenes (see `sample_scene`); at 0 the stream is the one drawn without the option.
    """
    if not 0.0 <= crowded <= 1.0:
        raise DatasetError(f"crowded must be a share in [0, 1], got {crowded}")
    rng = _rng("train", index)
    scene = sample_scene(rng, crowded=crowded > 0 and bool(rng.random() < crowded))
    questions: dict[str, Question] = {}
    for attempt in range(4 * turns):
        q = ask(scene, QUESTION_TYPES[attempt % len(QUESTION_TYPES)], rng)
        if q is not None:
            questions.setdefault(q.text, q)
        if len(questions) == turns:
            break
    found = list(questions.values())
    return scene, [found[i] for i in rng.permutation(len(found))]


def image_digest(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()
