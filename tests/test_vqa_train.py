"""Training inputs are what inference sees, and a few training steps run and change the model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from models.presets import from_name
from vqa import shapes
from vqa.train import IGNORE, Encoder, TrainConfig, TrainConfigError, train, training_batch


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder(from_name("default-small"))


def test_first_turn_and_pixels_match_the_processor(encoder: Encoder) -> None:
    """The first turn is the prompt the processor builds at inference; pixel values are identical."""
    from models.answer import build_prompt
    from models.default_model import build_processor

    processor = build_processor(encoder.tokenizer, encoder.preset)
    e = shapes.example("validation", 3)
    inputs = processor(images=e.image(), text=build_prompt(processor, e.question.text), return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == encoder.prompt(e.question.text)
    assert torch.equal(inputs["pixel_values"], encoder.pixel_values([e.image()]))


def test_conversation_labels_are_the_answers(encoder: Encoder) -> None:
    _, questions = shapes.training_sample(5)
    ids, labels = encoder.conversation(questions)
    assert len(ids) == len(labels)
    assert ids.count(encoder.image_id) == 576  # one image, expanded once
    answered = [t for t in labels if t != IGNORE]
    expected = [t for q in questions for t in encoder.answer(q.answer)]
    assert answered == expected
    # Labels sit on the answer positions themselves (transformers shifts them).
    positions = [i for i, t in enumerate(labels) if t != IGNORE]
    assert [ids[i] for i in positions] == expected
    assert encoder.tokenizer.decode(answered) == "".join(f" {q.answer}</s>" for q in questions)


def test_training_batch_is_padded_and_masked(encoder: Encoder) -> None:
    config = TrainConfig(batch_images=3, steps=1)
    batch = training_batch(encoder, 0, config)
    b, s = batch["input_ids"].shape
    assert b == 3 and batch["labels"].shape == (b, s) and batch["pixel_values"].shape == (3, 3, 336, 336)
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == IGNORE).all() and (batch["input_ids"][pad] == encoder.pad).all()
    assert batch["patch_labels"].shape == (3, 3, 576)


def test_patch_labels_mark_the_objects() -> None:
    scene, _ = shapes.training_sample(11)
    colour, kind, centre = shapes.patch_labels(scene)
    assert centre.sum() == len(scene.shapes)
    for s in scene.shapes:
        at = int(s.y // 14) * 24 + int(s.x // 14)
        assert centre[at] == 1
        assert colour[at] == 1 + list(shapes.COLOURS).index(s.colour) and kind[at] == 1 + shapes.SHAPES.index(s.kind)
    # Only object patches are labelled: the labelled area is about the objects' area.
    assert ((colour > 0) == (kind > 0)).all()
    assert (colour > 0).sum() <= sum((2 * s.radius / 14 + 2) ** 2 for s in scene.shapes)


def test_config_validation_and_schedule() -> None:
    config = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert config.lr_at(0) == pytest.approx(1e-4)
    assert config.lr_at(9) == pytest.approx(1e-3)
    assert config.lr_at(99) == pytest.approx(1e-4, rel=0.01)
    lrs = [config.lr_at(s) for s in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))
    with pytest.raises(TrainConfigError, match="steps must be at least 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="unknown model preset"):
        TrainConfig(preset="nope")


def test_a_few_steps_train_a_tiny_model() -> None:
    preset = from_name("tiny-llama").replace(name="tiny-1024", vocab_size=1024, image_token_id=1023, pad_token_id=3)
    config = TrainConfig(steps=4, batch_images=2, warmup_steps=1, eval_every=2, eval_examples=4, lr=3e-3)
    seen = []
    model, history = train(config, on_step=seen.append, preset=preset)
    assert [h["step"] for h in history] == [1, 2, 3, 4] and len(seen) == 4
    assert all(np.isfinite(h["loss"]) for h in history)
    assert [h["step"] for h in history if "val_accuracy" in h] == [2, 4]
    assert not model.training
    # Trained weights differ from the random initialisation of the same seed.
    from models.presets import build_random_model

    start = build_random_model(preset, seed=config.seed).state_dict()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, start[k])]
    assert len(changed) > len(start) // 2
