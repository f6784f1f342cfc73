"""The shapes dataset (determinism, disjoint splits, answers true to the scene) and the JSONL reader."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vqadata import shapes
from vqadata.data import DataError, is_correct, jsonl_items, normalise, shapes_items, write_jsonl


def test_examples_are_deterministic() -> None:
    for i in (0, 7, 123):
        a, b = shapes.example("test", i), shapes.example("test", i)
        assert a == b
        assert shapes.image_digest(a.image()) == shapes.image_digest(b.image())
    scene_a, qs_a = shapes.training_sample(42)
    scene_b, qs_b = shapes.training_sample(42)
    assert scene_a == scene_b and qs_a == qs_b


def test_crowded_training_scenes_have_three_or_four_objects_of_two_kinds() -> None:
    # At 0 the stream is the one drawn without the option: the shipped first stage's data is unchanged.
    assert [shapes.training_sample(i, 6, 0.0) for i in range(5)] == [shapes.training_sample(i, 6) for i in range(5)]
    crowded = [shapes.training_sample(i, 18, 1.0) for i in range(40)]
    plain = [shapes.example("test", i).scene for i in range(40)]
    assert all(shapes.layout_problem(scene.shapes) is None for scene in plain + [c for c, _ in crowded])
    for scene, questions in crowded:
        assert 3 <= len(scene.shapes) <= shapes.MAX_OBJECTS
        assert len({s.kind for s in scene.shapes}) <= 2
        for q in questions:  # the questions stay true to the scene
            if q.type == "count":
                kind = next(k for k, plural in shapes.PLURALS.items() if plural in q.text)
                assert q.answer == shapes.NUMBERS[sum(s.kind == kind for s in scene.shapes)]
    answers = [q.answer for _, qs in crowded for q in qs if q.type == "count"]
    assert answers.count("three") >= 10
    some = [len(shapes.training_sample(i, 6, 0.5)[0].shapes) for i in range(60)]
    assert min(some) < 3 <= max(some)  # a mix
    with pytest.raises(shapes.DatasetError, match="crowded"):
        shapes.training_sample(0, 6, 1.5)


def test_splits_are_disjoint() -> None:
    digests = {
        split: {shapes.image_digest(e.image()) for e in shapes.examples(split, 60)} for split in ("validation", "test")
    }
    digests["train"] = {shapes.image_digest(shapes.render(shapes.training_sample(i)[0])) for i in range(60)}
    for split, found in digests.items():
        assert len(found) == 60, f"{split} repeats an image"
    assert not digests["train"] & digests["validation"]
    assert not digests["train"] & digests["test"]
    assert not digests["validation"] & digests["test"]


def test_test_split_cycles_question_types_and_answers_vary() -> None:
    items = list(shapes.examples("test", 100))
    assert [e.question.type for e in items] == [shapes.QUESTION_TYPES[i % 5] for i in range(100)]
    for qtype in shapes.QUESTION_TYPES:
        answers = {e.question.answer for e in items if e.question.type == qtype}
        assert len(answers) >= 2, f"{qtype}: one answer only ({answers})"


def _facts(scene: shapes.Scene) -> list[tuple[str, str, float, float]]:
    return [(s.kind, s.colour, s.x, s.y) for s in scene.shapes]


def test_answers_follow_from_the_scene() -> None:
    """Recomputes every answer from the scene's objects, independently of `ask`."""
    for e in shapes.examples("test", 150):
        facts, q = _facts(e.scene), e.question
        words = q.text.rstrip("?").split()
        if q.type == "colour":
            kind = words[-1]
            [match] = [f for f in facts if f[0] == kind]  # the named shape is unique
            assert q.answer == match[1]
        elif q.type == "shape":
            colour = words[-2]
            [match] = [f for f in facts if f[1] == colour]
            assert q.answer == match[0]
        elif q.type == "count":
            kind = next(k for k, p in shapes.PLURALS.items() if p == words[2])
            assert q.answer == shapes.NUMBERS[sum(f[0] == kind for f in facts)]
        elif q.type == "presence":
            colour, kind = words[-2], words[-1]
            assert q.answer == ("yes" if any(f[:2] == (kind, colour) for f in facts) else "no")
        else:
            a = next(f for f in facts if (f[1], f[0]) == (words[2], words[3]))
            b = next(f for f in facts if (f[1], f[0]) == (words[-2], words[-1]))
            if "left" in words:
                assert q.answer == ("left" if a[2] < b[2] else "right")
            else:
                assert q.answer == ("above" if a[3] < b[3] else "below")


def test_scenes_have_no_overlaps_and_fit_the_image() -> None:
    for e in shapes.examples("validation", 100):
        objects = e.scene.shapes
        assert shapes.MIN_OBJECTS <= len(objects) <= shapes.MAX_OBJECTS
        for i, s in enumerate(objects):
            assert s.radius <= s.x <= shapes.IMAGE_SIZE - s.radius and s.radius <= s.y <= shapes.IMAGE_SIZE - s.radius
            for t in objects[i + 1 :]:
                assert math.hypot(s.x - t.x, s.y - t.y) > s.radius + t.radius


def test_relevant_patches_cover_the_objects() -> None:
    e = next(e for e in shapes.examples("test", 20) if e.question.type == "colour")
    patches = e.relevant_patches()
    assert patches.shape == (576,) and patches.dtype == bool
    obj = e.scene.shapes[e.question.objects[0]]
    centre = int(obj.y // 14) * 24 + int(obj.x // 14)
    assert patches[centre]
    # An object of radius r covers at most (2r / 14 + 2)^2 patches.
    assert 1 <= patches.sum() <= (2 * obj.radius / 14 + 2) ** 2


def test_every_answer_is_one_token() -> None:
    """Answers are single words of the project tokenizer, so a one-token answer is the whole answer."""
    from tokenizers import Tokenizer

    from models import default_model_dir

    tok = Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))
    words = [*shapes.COLOURS, *shapes.SHAPES, *shapes.NUMBERS, "yes", "no", "left", "right", "above", "below"]
    for word in words:
        assert len(tok.encode(f" {word}", add_special_tokens=False).ids) == 1, word


def test_unknown_split_is_a_clear_error() -> None:
    with pytest.raises(shapes.DatasetError, match="unknown split 'tset'"):
        shapes.example("tset", 0)


def test_normalise_and_match() -> None:
    assert normalise("  The Red. ") == "red"
    assert is_correct("Yes!", ("yes",))
    assert not is_correct("yes no", ("yes",))
    assert is_correct("a circle", ("circle", "ring"))


def test_jsonl_round_trip(tmp_path: Path) -> None:
    examples = list(shapes.examples("validation", 4))
    path = write_jsonl(examples, tmp_path / "data")
    items = jsonl_items(path)
    assert [i.question for i in items] == [e.question.text for e in examples]
    assert [i.answers for i in items] == [e.answers for e in examples]
    assert [i.type for i in items] == [e.question.type for e in examples]
    reference = list(shapes_items("validation", 4))
    for item, ref in zip(items, reference, strict=True):
        assert np.array_equal(np.asarray(Image.open(item.load_image()).convert("RGB")), np.asarray(ref.load_image()))
    assert len(jsonl_items(path, count=2)) == 2


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["a"]', "expected a JSON object"),
        ('{"image": "x.png", "answers": ["yes"]}', "missing or empty question"),
        ('{"image": "a.png", "question": "Is it?", "answers": []}', "'answers' must be a non-empty list"),
        ('{"image": "missing.png", "question": "Is it?", "answer": "yes"}', "does not exist"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    shapes.example("test", 0).image().save(tmp_path / "a.png")
    good = json.dumps({"image": "a.png", "question": "Is it?", "answer": "yes"})
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: .*{message}"):
        jsonl_items(path)


def test_jsonl_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        jsonl_items(tmp_path / "nope.jsonl")
