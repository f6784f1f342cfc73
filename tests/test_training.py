"""Training inputs are what inference sees, and a few training steps run and change the model."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from models.presets import ModelPreset, build_random_model, from_name
from training.objective import IGNORE, GroundingLoss, PatchHeads, activation_penalty
from training.train import (
    Encoder,
    Objective,
    TrainConfig,
    TrainConfigError,
    init_for_width,
    train,
    training_batch,
    turn_mask,
)
from vqadata import shapes


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


def test_turns_are_single_turn_prompts_and_answers(encoder: Encoder) -> None:
    _, questions = shapes.training_sample(5)
    row = encoder.turns(questions)
    assert len(row.ids) == len(row.labels) == len(row.positions) == len(row.segments)
    assert row.ids.count(encoder.image_id) == 576  # one image, expanded once
    answered = [t for t in row.labels if t != IGNORE]
    expected = [t for q in questions for t in encoder.answer(q.answer)]
    assert answered == expected
    # Labels sit on the answer positions themselves (transformers shifts them).
    positions = [i for i, t in enumerate(row.labels) if t != IGNORE]
    assert [row.ids[i] for i in positions] == expected
    assert encoder.tokenizer.decode(answered) == "".join(f" {q.answer}</s>" for q in questions)
    # Each turn, read with its prefix at its position ids, is the inference prompt plus the answer.
    for turn, (q, at) in enumerate(zip(questions, row.queries, strict=True), start=1):
        mine = [i for i, s in enumerate(row.segments) if s in (0, turn)]
        assert [row.ids[i] for i in mine] == encoder.prompt(q.text) + encoder.answer(q.answer)
        assert [row.positions[i] for i in mine] == list(range(len(mine)))
        assert row.ids[at + 1] == encoder.answer(q.answer)[0] and row.labels[at + 1] != IGNORE


def test_turn_mask_keeps_turns_apart() -> None:
    segments = torch.tensor([[0, 0, 1, 1, 2, 2, -1]])
    allowed = turn_mask(segments)[0, 0] == 0  # [S, S]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],
            [1, 1, 0, 0, 1, 0, 0],  # turn 2 sees the prefix and itself, not turn 1
            [1, 1, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 0, 1],  # padding sees itself only
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)


@pytest.fixture(scope="module")
def tiny() -> tuple[ModelPreset, Encoder, torch.nn.Module]:
    preset = from_name("tiny-llama-gqa").replace(name="tiny-1024", vocab_size=1024, image_token_id=1023, pad_token_id=3)
    return preset, Encoder(preset), build_random_model(preset, seed=3).eval()


def test_packed_turns_compute_what_single_prompts_compute(tiny: tuple[ModelPreset, Encoder, torch.nn.Module]) -> None:
    """The answer logits of every packed turn equal those of its question asked alone."""
    preset, enc, model = tiny
    _, questions = shapes.training_sample(3, 4)
    row = enc.turns(questions)
    pixels = torch.randn(1, 3, preset.image_size, preset.image_size)
    with torch.no_grad():
        packed = model(
            input_ids=torch.tensor([row.ids]),
            position_ids=torch.tensor([row.positions]),
            attention_mask=turn_mask(torch.tensor([row.segments])),
            pixel_values=pixels,
        ).logits[0]
        for q, at in zip(questions, row.queries, strict=True):
            alone = model(input_ids=torch.tensor([enc.prompt(q.text)]), pixel_values=pixels).logits[0, -1]
            torch.testing.assert_close(packed[at], alone, atol=1e-5, rtol=1e-5)
    # Without the turn mask the later turns would read the earlier ones: the check above can fail.
    with torch.no_grad():
        leaky = model(input_ids=torch.tensor([row.ids]), pixel_values=pixels).logits[0]
    assert not torch.allclose(leaky[row.queries[-1]], packed[row.queries[-1]], atol=1e-3)


Tiny = tuple[ModelPreset, Encoder, torch.nn.Module]


def test_grounding_loss_is_the_attention_mass_on_the_objects(tiny: Tiny) -> None:
    """Per head, the mean -log of the eager attention probability on its relevant patches; summed over
    heads; a turn without relevant patches for a head is left out of that head's mean."""
    preset, enc, model = tiny
    rows = [enc.turns(shapes.training_sample(i, 3)[1]) for i in range(2)]
    ids = enc.pad_batch([r.ids for r in rows], enc.pad)
    mask = turn_mask(enc.pad_batch([r.segments for r in rows], -1))
    queries = enc.pad_batch([r.queries for r in rows], -1)  # [B, T]
    draw = torch.rand(2, *queries.shape, preset.num_image_tokens, generator=torch.Generator().manual_seed(0))
    relevant = draw < 0.3  # [H, B, T, P]
    relevant[..., 0] = True  # every turn has a relevant patch, unless set otherwise below (the tiny grid is small)
    relevant[0, 0, 0] = False  # a turn about nothing (count zero) is left out
    relevant[1, :, 1:] = False  # head 1 grounded on the first turns only (as for position questions)
    grounding = GroundingLoss(model, layer=1)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(
                input_ids=ids,
                position_ids=enc.pad_batch([r.positions for r in rows], 0),
                attention_mask=mask,
                pixel_values=torch.randn(2, 3, preset.image_size, preset.image_size),
                output_attentions=True,
            )
            both = grounding.loss(queries, relevant, rows[0].image_start)
            nothing = torch.zeros_like(relevant[0])
            alone = [
                grounding.loss(queries, torch.stack([relevant[0], nothing]), rows[0].image_start),
                grounding.loss(queries, torch.stack([nothing, relevant[1]]), rows[0].image_start),
            ]
    finally:
        grounding.remove()
        model.set_attn_implementation("sdpa")
    start, n = rows[0].image_start, preset.num_image_tokens
    expected = []
    for head in range(2):
        probs = out.attentions[1][:, head]  # [B, S, S]
        terms = [
            -torch.log(probs[b, queries[b, t], start : start + n][relevant[head, b, t]].sum())
            for b in range(2)
            for t in range(queries.shape[1])
            if queries[b, t] >= 0 and relevant[head, b, t].any()
        ]
        assert len(terms) == (2 * 3 - 1 if head == 0 else 2)
        expected.append(torch.stack(terms).mean())
    for got, want in zip(alone, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both, expected[0] + expected[1], atol=1e-5, rtol=1e-5)


def test_training_batch_is_padded_and_masked(encoder: Encoder) -> None:
    config = TrainConfig(batch_images=3, steps=1)
    batch = training_batch(encoder, 0, config)
    b, s = batch["input_ids"].shape
    assert b == 3 and batch["labels"].shape == (b, s) and batch["pixel_values"].shape == (3, 3, 336, 336)
    assert batch["attention_mask"].shape == (b, 1, s, s) and batch["position_ids"].shape == (b, s)
    pad = batch["input_ids"] == encoder.pad
    assert (batch["labels"][pad] == IGNORE).all()
    assert batch["patch_labels"].shape == (3, 3, 576)
    turns = batch["queries"].shape[1]
    assert batch["relevant"].shape == (2, 3, turns, 576)
    # Every query is the token just before its answer. Head 0 grounds on the question's objects, except
    # that a position question gives head 0 its first object and head 1 its second.
    paired = 0
    for j in range(3):
        scene, questions = shapes.training_sample(j, config.turns)
        for t, q in enumerate(questions):
            at = int(batch["queries"][j, t])
            assert int(batch["labels"][j, at + 1]) == encoder.answer(q.answer)[0]
            first, second = batch["relevant"][0, j, t].numpy(), batch["relevant"][1, j, t].numpy()
            if q.type == "position":
                paired += 1
                assert np.array_equal(first, shapes.object_patches(scene, q.objects[:1]))
                assert np.array_equal(second, shapes.object_patches(scene, q.objects[1:]))
                assert second.any() and not np.array_equal(first, second)
            else:
                assert np.array_equal(first, shapes.object_patches(scene, q.objects)) and not second.any()
    assert paired > 0
    unpaired = training_batch(encoder, 0, TrainConfig(batch_images=3, steps=1, pair_grounding=False))
    assert not unpaired["relevant"][1].any()


def test_position_read_out_follows_row_major_patches() -> None:
    """The row / column targets follow CLIP's row-major patch order, scaled to [-1, 1]: tokens that
    hold (row, column) and a read-out that copies them give a loss of 0, transposed ones do not, and
    object patches and the rest weigh half each."""
    heads = PatchHeads(8, 4)
    p, half = shapes.GRID**2, (shapes.GRID - 1) / 2
    rows, cols = torch.arange(p) // shapes.GRID, torch.arange(p) % shapes.GRID
    where = (torch.stack([rows, cols], -1).float() - half) / half  # [P, 2]
    tokens = torch.cat([where, torch.zeros(p, 2)], -1)[None].repeat(2, 1, 1)  # [2, P, 4]
    objects = torch.zeros(2, p, dtype=torch.bool)
    objects[:, :10] = True
    with torch.no_grad():
        heads.where.weight.copy_(torch.eye(2, 4))
        heads.where.bias.zero_()
        assert heads.position_loss(tokens, objects) < 1e-10
        assert heads.position_loss(tokens.flip(-1).roll(2, -1), objects) > 0.1  # columns read as rows
        heads.where.weight.zero_()
        expected = (where[:10].pow(2).mean() + where[10:].pow(2).mean()) / 2
        torch.testing.assert_close(heads.position_loss(tokens, objects), expected)
        torch.testing.assert_close(heads.position_loss(tokens, torch.zeros_like(objects)), where.pow(2).mean())


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
    with pytest.raises(TrainConfigError, match="grounding_weight"):
        TrainConfig(grounding_weight=-1)
    with pytest.raises(TrainConfigError, match="crowded"):
        TrainConfig(crowded=1.2)


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


def test_bf16_autocast_trains_fp32_weights() -> None:
    """Under bf16 autocast the losses stay finite, the weights stay fp32, and the first step's losses are
    those of fp32 within bfloat16 rounding."""
    preset = from_name("tiny-llama").replace(name="tiny-1024", vocab_size=1024, image_token_id=1023, pad_token_id=3)
    run = {"steps": 1, "batch_images": 2, "warmup_steps": 1, "eval_every": 0, "eval_examples": 2}
    model, history = train(TrainConfig(bf16=True, **run), preset=preset)
    _, exact = train(TrainConfig(**run), preset=preset)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert np.isfinite(history[0]["loss"])
    assert history[0]["loss"] != exact[0]["loss"]  # bfloat16 did run
    assert history[0]["loss"] == pytest.approx(exact[0]["loss"], rel=0.02)


def test_readout_loss_reads_the_answer_one_layer_after_the_grounded_head(tiny: Tiny) -> None:
    preset, enc, model = tiny
    rows = [enc.turns(shapes.training_sample(i, 3)[1]) for i in range(2)]
    ids = enc.pad_batch([r.ids for r in rows], enc.pad)
    labels = enc.pad_batch([r.labels for r in rows], IGNORE)
    queries = enc.pad_batch([r.queries for r in rows], -1)  # [B, T]
    grounding = GroundingLoss(model, layer=1)
    try:
        with torch.no_grad():
            out = model(
                input_ids=ids,
                position_ids=enc.pad_batch([r.positions for r in rows], 0),
                attention_mask=turn_mask(enc.pad_batch([r.segments for r in rows], -1)),
                pixel_values=torch.randn(2, 3, preset.image_size, preset.image_size),
                output_hidden_states=True,
            )
            loss = grounding.readout_loss(queries, labels)
    finally:
        grounding.remove()
    after = out.hidden_states[3]  # after layer 2 = one layer after the grounded layer 1
    logits = [model.lm_head(model.model.language_model.norm(after[b, q])) for b in range(2) for q in rows[b].queries]
    wanted = torch.tensor([labels[b, q + 1] for b in range(2) for q in rows[b].queries])
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(torch.stack(logits), wanted))


def test_width_init_and_activation_penalty() -> None:
    preset = from_name("tiny-llama").replace(name="tiny-1024", vocab_size=1024, image_token_id=1023, pad_token_id=3)
    model = build_random_model(preset, seed=0)
    init_for_width(model, seed=0)
    for module in model.model.language_model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.numel() > 4000:
            assert module.weight.std().item() == pytest.approx(module.in_features**-0.5, rel=0.1)
    h = torch.tensor([[3.0, 4.0], [0.0, 0.0]], requires_grad=True)  # RMS 3.54 and 0
    penalty = activation_penalty([h], max_rms=1.0)
    assert penalty.item() == pytest.approx((12.5**0.5 - 1) / 2, rel=1e-4)
    penalty.backward()
    assert torch.isfinite(h.grad).all() and (h.grad[1] == 0).all()
    assert activation_penalty([h], max_rms=4.0).item() == 0.0


def test_objective_on_the_default_geometry_has_every_loss(encoder: Encoder) -> None:
    """On the 24 x 24 grid every auxiliary loss is on, finite, and reaches the model's parameters."""
    preset = from_name("default-small")
    model = build_random_model(preset, seed=0).train()
    config = TrainConfig(batch_images=1, turns=3)
    objective = Objective(model, preset, config)
    try:
        losses = objective(model, training_batch(encoder, 0, config))
        assert set(losses) == {"answer", "patch", "position", "grounding", "scale", "total"}
        assert all(torch.isfinite(v) for v in losses.values())
        assert losses["patch"] > 0 and losses["position"] > 0 and losses["grounding"] > 0
        losses["total"].backward()
        attn = model.model.language_model.layers[config.grounding_layer].self_attn
        assert attn.q_proj.weight.grad.abs().sum() > 0 and objective.parameters()[0].grad is not None
    finally:
        objective.remove()
    with pytest.raises(TrainConfigError, match="past the last layer"):
        Objective(model, preset, TrainConfig(grounding_layer=8))


def test_a_run_continues_from_a_saved_model(tmp_path) -> None:
    from models.default_model import save_checkpoint

    preset = from_name("tiny-llama").replace(name="tiny-1024", vocab_size=1024, image_token_id=1023, pad_token_id=3)
    config = TrainConfig(steps=2, batch_images=2, warmup_steps=1, eval_every=0, eval_examples=2)
    first, _ = train(config, preset=preset)
    save_checkpoint(first, preset, tmp_path / "stage1")
    # A near-zero learning rate: the continued model must start from the saved weights, not random ones.
    again = TrainConfig(
        steps=1, batch_images=2, warmup_steps=0, eval_every=0, eval_examples=2, lr=1e-12, first_example=4
    )
    continued, history = train(again, preset=preset, init_from=tmp_path / "stage1")
    assert len(history) == 1
    saved = first.state_dict()
    for name, value in continued.state_dict().items():
        torch.testing.assert_close(value, saved[name], atol=1e-6, rtol=0)
    with pytest.raises(TrainConfigError, match="geometry"):
        train(again, preset=from_name("default-small"), init_from=tmp_path / "stage1")
    with pytest.raises(TrainConfigError, match=r"no config\.json"):
        train(again, preset=preset, init_from=tmp_path)


def test_the_training_script_writes_a_loadable_model_with_its_card(tmp_path, capsys) -> None:
    """One step of the real script on the default geometry: a llava-hf directory that loads, a card that
    records the command and the recipe, the loss history; an existing --out is kept without --force."""
    import importlib.util
    from pathlib import Path

    from models.loading import load_llava

    path = Path(__file__).resolve().parent.parent / "scripts" / "train_default_model.py"
    spec = importlib.util.spec_from_file_location("train_default_model", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out, logs = tmp_path / "model", tmp_path / "logs"
    args = ["--out", str(out), "--log-dir", str(logs), "--steps", "1", "--batch-images", "1", "--warmup-steps", "0"]
    assert script.main([*args, "--eval-examples", "2", "--bf16", "--turns", "3", "--crowded", "0.5"]) == 0
    model, _ = load_llava(out)
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", framework="pt") as stored:  # fp16, whatever the training precision
        names = list(stored.keys())  # safe_open is not iterable
        assert {stored.get_slice(k).get_dtype() for k in names} == {"F16"}
    assert model.config.text_config.hidden_size == from_name("default-small").hidden_size
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "    python scripts/train_default_model.py --out" in card
    assert "head 1 the second" in card and "row and column" in card
    assert "bf16 autocast on the CPU" in card and "50% of them crowded" in card
    assert (logs / "history.json").is_file() and (logs / "loss.png").is_file()
    recorded = json.loads((logs / "history.json").read_text(encoding="utf-8"))["config"]
    assert recorded["bf16"] is True and recorded["turns"] == 3 and recorded["crowded"] == 0.5
    before = sorted(p.name for p in out.iterdir())
    assert script.main([*args, "--eval-examples", "2", "--no-pair-grounding"]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
