"""Evaluation items: the shapes test split, or a JSONL file of real data (POPE, GQA, ...).

A JSONL line is one question:

    {"image": "val2014/COCO_val2014_000000000042.jpg", "question": "Is there a dog in the image?",
     "answers": ["yes"], "type": "adversarial"}

- image: a path, relative to the JSONL file's folder (or absolute);
- question: the text asked, as the model should see it (add a suffix such as "Answer the question
  using a single word or phrase." here if the benchmark's protocol wants one);
- answers: the accepted answers (a string is one answer); a prediction is correct when it equals
  one of them after normalisation (lower case, no surrounding punctuation or articles);
- type: optional category, reported separately (POPE's split, GQA's question type...).
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vqadata import shapes


class DataError(ValueError):
    """An evaluation file that cannot be read; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class Item:
    id: str
    question: str
    answers: tuple[str, ...]
    type: str
    load_image: Callable[[], Any]  # -> PIL image (or a path the image loader accepts)
    relevant_patches: Callable[[], np.ndarray] | None = None  # bool [n_patches]: where the answer is


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise(text: str) -> str:
    """Lower case, articles and punctuation removed, whitespace collapsed: 'The Red.' -> 'red'."""
    text = text.lower().strip()
    text = text.translate(str.maketrans("", "", string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def is_correct(prediction: str, answers: tuple[str, ...]) -> bool:
    got = normalise(prediction)
    return any(got == normalise(a) for a in answers)


def shapes_items(split: str = "test", count: int = 1000, start: int = 0) -> Iterator[Item]:
    for ex in shapes.examples(split, count, start):
        yield Item(
            id=ex.image_id,
            question=ex.question.text,
            answers=ex.answers,
            type=ex.question.type,
            load_image=ex.image,
            relevant_patches=ex.relevant_patches,
        )


def jsonl_items(path: str | Path, count: int | None = None, require_answers: bool = True) -> list[Item]:
    """The items of a JSONL file (every line checked before any is evaluated). require_answers: False for
    a calibration set, whose lines need only image and question."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; pass a JSONL file with image, question and answers") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({e})") from e
    items: list[Item] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg}); write one JSON object per line") from e
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object with image, question and answers")
        missing = [k for k in ("image", "question") if not isinstance(record.get(k), str) or not record[k].strip()]
        if missing:
            raise DataError(f"{where}: missing or empty {' and '.join(missing)} (strings)")
        answers = record.get("answers", record.get("answer"))
        if isinstance(answers, str):
            answers = [answers]
        if answers is None and not require_answers:
            answers = []  # a calibration line: nothing is scored
        elif not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{where}: 'answers' must be a non-empty list of strings (or 'answer': a string)")
        image = Path(record["image"])
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise DataError(f"{where}: image {image} does not exist (paths are relative to the JSONL file)")
        items.append(
            Item(
                id=str(record.get("id", f"{path.stem}-{number}")),
                question=record["question"],
                answers=tuple(answers),
                type=str(record.get("type", "all")),
                load_image=lambda image=image: image,
            )
        )
        if count is not None and len(items) == count:
            break
    if not items:
        raise DataError(f"{path}: no questions in the file")
    return items


def write_jsonl(items: list[shapes.Example], folder: Path) -> Path:
    """A shapes split as PNG files and questions.jsonl (the format `jsonl_items` reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for ex in items:
        name = f"{ex.image_id}.png"
        ex.image().save(folder / name)
        rows.append(
            {
                "id": ex.image_id,
                "image": name,
                "question": ex.question.text,
                "answers": list(ex.answers),
                "type": ex.question.type,
            }
        )
    out = folder / "questions.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out
