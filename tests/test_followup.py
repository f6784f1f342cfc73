"""The follow-up measurement: pairs about different objects, the two-turn prompt, and a small run's report."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from coreMatching.errors import ConfigError
from evaluation.followup import (
    FollowupConfig,
    ImposedSelection,
    answer_pairs,
    build_pairs,
    is_other_object,
    render_conversation,
    write_report,
)
from vqadata import shapes
from vqadata.shapes import QUESTION_TYPES, DatasetError, Question

TINY_BUDGET = 8


@pytest.fixture(scope="module")
def tiny_576(checkpoint):
    """A tiny random-weight llava-hf model at the dataset's geometry (336 px, 576 image tokens)."""
    from models import load_llava

    return load_llava(checkpoint("llama", image_size=336, max_position_embeddings=1024))


def test_pairs_are_about_other_objects_of_the_same_image() -> None:
    pairs = build_pairs("test", 60, seed=0)
    assert len(pairs) == 60
    for pair in pairs:
        first, second = pair.first, pair.second
        assert first == shapes.example("test", pair.example.index).question  # Q1 is the item's own question
        assert first.objects and second.objects and not set(first.objects) & set(second.objects)
        assert len(pair.example.scene.shapes) >= 2 and max(second.objects) < len(pair.example.scene.shapes)
        # The objects are apart in the image too: no object of Q2 has its centre on a patch of Q1's objects.
        first_patches = pair.patches(first)
        for i in second.objects:
            s = pair.example.scene.shapes[i]
            assert not first_patches[int(s.y // shapes.PATCH_SIZE) * shapes.GRID + int(s.x // shapes.PATCH_SIZE)]
    assert {p.second.type for p in pairs} == set(QUESTION_TYPES)  # every type asked as a follow-up
    assert [p.second for p in build_pairs("test", 60, seed=0)] == [p.second for p in pairs]  # seeded
    assert [p.second for p in build_pairs("test", 60, seed=1)] != [p.second for p in pairs]


def test_other_object_is_strict() -> None:
    star = Question("colour", "What colour is the star?", "red", (0,))
    assert is_other_object(star, Question("colour", "What colour is the circle?", "blue", (1,)))
    assert not is_other_object(star, Question("count", "How many stars are there?", "one", (0,)))
    assert not is_other_object(star, Question("position", "Is the red star left of ...?", "left", (0, 1)))
    assert not is_other_object(star, Question("count", "How many squares are there?", "zero", ()))


def test_bad_input_is_a_typed_error() -> None:
    with pytest.raises(ConfigError, match="count"):
        FollowupConfig(count=0)
    with pytest.raises(ConfigError, match="split"):
        FollowupConfig(split="dev")
    with pytest.raises(ConfigError, match="budget"):
        FollowupConfig(budget=0)
    with pytest.raises(DatasetError, match="split"):
        build_pairs("dev", 3)


def test_conversation_has_the_image_in_the_first_turn(tiny_576) -> None:
    model, processor = tiny_576
    pair = build_pairs("test", 1)[0]
    prompt = render_conversation(processor, pair.first.text, "red", pair.second.text)
    image_at, first_at = prompt.index(processor.image_token), prompt.index(pair.first.text)
    answer_at, second_at = prompt.index("red", first_at), prompt.index(pair.second.text)
    assert prompt.count(processor.image_token) == 1
    assert prompt.index("USER:") < image_at < first_at < answer_at < second_at
    assert prompt.count("USER:") == 2 and prompt.rstrip().endswith("ASSISTANT:")
    ids = processor(images=pair.example.image(), text=prompt, return_tensors="pt")["input_ids"][0]  # [S]
    where = (ids == model.config.image_token_id).nonzero().flatten()
    assert where.numel() == 576 and int(where[-1] - where[0]) == 575  # one contiguous image, 576 tokens
    question_ids = processor.tokenizer(pair.second.text, add_special_tokens=False)["input_ids"]
    assert len(ids) - int(where[-1]) > len(question_ids)  # both questions come after the image


def test_imposed_selection_keeps_the_given_tokens(tiny_576) -> None:
    model, processor = tiny_576
    pair = build_pairs("test", 1)[0]
    config = FollowupConfig(budget=TINY_BUDGET)
    cm = config.corematching(config.pruned, 576)
    prompt = render_conversation(processor, pair.first.text, "red", pair.second.text)
    inputs = processor(images=pair.example.image(), text=prompt, return_tensors="pt")
    kept = [500, 3, 77, 10, 200, 300, 401, 575]
    state = ImposedSelection(model, cm, kept).prefill(inputs["input_ids"], inputs["pixel_values"])
    assert state.kept_image_tokens.tolist() == sorted(kept)
    assert state.kv[-1].length == inputs["input_ids"].shape[1] - 576 + TINY_BUDGET


def test_small_run_report_adds_up(tiny_576, tmp_path: Path) -> None:
    model, processor = tiny_576
    config = FollowupConfig(count=2, budget=TINY_BUDGET, max_new_tokens=2)
    pairs = build_pairs("test", 2)
    with torch.inference_mode():
        report = answer_pairs(model, processor, pairs, config, model_name="tiny")
    assert len(report.records) == 2 and [s.setting for s in report.settings] == ["dense", config.pruned.label]
    for summary in report.settings:
        rates = summary.overall
        for rate in (rates.first, rates.followup, rates.alone, rates.followup_on_type):
            assert rate.total == 2 and 0 <= rate.correct <= 2
        assert sum(r.followup.total for r in summary.by_type.values()) == 2
        assert sum(r.followup.correct for r in summary.by_type.values()) == rates.followup.correct
        assert (rates.stale is None) == (summary.setting == "dense")
    for record in report.records:
        assert [a.setting for a in record.answers] == ["dense", config.pruned.label]
        assert record.answers[0].stale is None and record.answers[1].stale is not None
    assert sum(report.first_types.values()) == sum(report.second_types.values()) == 2
    assert sum(report.type_pairs.values()) == 2
    assert Counter(r.second.type for r in report.records) == Counter(report.second_types)
    assert report.coverage is not None and report.coverage.pairs == 2
    assert report.coverage.chance == TINY_BUDGET / 576
    for value in vars(report.coverage.mean).values():
        assert 0.0 <= value <= 1.0

    json_path, md_path = write_report(report, tmp_path, "python scripts/followup.py --count 2")
    data = json.loads(json_path.read_text())
    assert len(data["records"]) == 2 and data["config"]["count"] == 2
    assert data["settings"][1]["overall"]["followup"]["total"] == 2
    text = md_path.read_text()
    assert text.splitlines()[4] == "    python scripts/followup.py --count 2"  # the command at the top
    assert f"| {config.pruned.label} with Q1's kept tokens |" in text and "| dense | " in text
    assert "## Object patches among the 8 kept tokens (%)" in text
