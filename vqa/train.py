"""Train a small LLaVA on the shapes dataset (torch and transformers, on a CPU in about an hour).

The model is a stock `LlavaForConditionalGeneration` of a preset (CLIP vision tower, projector,
Llama decoder) with the project tokenizer. Each training sequence is one image and a multi-turn
conversation about it, LLaVA-1.5 style:

    <s>USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>...

so the 576 image tokens are paid once for several questions. The loss is on the answers and their
`</s>` only. The first turn is exactly the prompt the processor builds at inference time
("USER: <image>\\n{question} ASSISTANT:"), and validation asks single-turn questions.

A vision tower trained from scratch by the answer loss alone learns slowly: an object covers a few
of 576 patches, so at first its signal is averaged away by the background (a first run of 800
steps learned only the answer priors). An auxiliary loss fixes that, as CLIP pretraining does for
LLaVA: small linear heads on the tower's output predict, per patch, the colour and shape of the
object covering it and whether it holds an object's centre (`shapes.patch_labels`). The heads are
dropped after training; the saved model is a stock `LlavaForConditionalGeneration`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.default_model import IMAGE_TOKEN, build_processor, build_tokenizer
from models.presets import ModelPreset, build_random_model, from_name
from runtime.preprocess import ImageProcessor
from vqa import shapes

log = logging.getLogger(__name__)

IGNORE = -100  # label of tokens without loss


class TrainConfigError(ValueError):
    """A training setting out of range."""


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "default-small"
    steps: int = 2800
    batch_images: int = 6  # images per step; each brings up to `turns` questions
    turns: int = 12  # questions per image (as many different ones as the scene supports, up to this)
    lr: float = 2e-3
    min_lr_ratio: float = 0.05  # cosine decay to lr * this
    warmup_steps: int = 150
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    aux_weight: float = 1.0  # weight of the per-patch auxiliary loss on the vision tower (0: off)
    seed: int = 0
    eval_every: int = 250  # steps between validation accuracy checks (0: only at the end)
    eval_examples: int = 200
    threads: int | None = None  # torch intra-op threads (None: torch's default)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_images", "turns", "eval_examples"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.lr < 1:
            raise TrainConfigError(f"lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise TrainConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.aux_weight < 0:
            raise TrainConfigError(f"aux_weight must be >= 0, got {self.aux_weight}")
        if self.warmup_steps < 0 or self.eval_every < 0:
            raise TrainConfigError("warmup_steps and eval_every must be >= 0")
        from_name(self.preset)  # raises UnknownPresetError with the known names

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to lr * min_lr_ratio at the last step."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Encoder:
    """Token ids and pixel values of conversations, as the processor would build them."""

    def __init__(self, preset: ModelPreset) -> None:
        self.preset = preset
        self.tokenizer = build_tokenizer(preset.vocab_size)
        processor = build_processor(self.tokenizer, preset)
        self.pixels = ImageProcessor.from_config(processor.image_processor.to_dict())
        self.image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id

    def prompt(self, question: str) -> list[int]:
        """The first turn: <s>USER: <image>\\n{question} ASSISTANT: with <image> expanded."""
        ids = self.tokenizer(f"USER: {IMAGE_TOKEN}\n{question} ASSISTANT:")["input_ids"]
        at = ids.index(self.image_id)
        return ids[:at] + [self.image_id] * self.preset.num_image_tokens + ids[at + 1 :]

    def answer(self, text: str) -> list[int]:
        return self.tokenizer(f" {text}", add_special_tokens=False)["input_ids"] + [self.eos]

    def conversation(self, questions: list[shapes.Question]) -> tuple[list[int], list[int]]:
        """(input ids, labels) of a multi-turn conversation about one image."""
        ids: list[int] = []
        labels: list[int] = []
        for turn, q in enumerate(questions):
            asked = self.prompt(q.text) if turn == 0 else self.tokenizer(
                f"USER: {q.text} ASSISTANT:", add_special_tokens=False
            )["input_ids"]
            answered = self.answer(q.answer)
            ids += asked + answered
            labels += [IGNORE] * len(asked) + answered
        return ids, labels

    def pad_batch(self, rows: list[list[int]], fill: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([r + [fill] * (width - len(r)) for r in rows])

    def pixel_values(self, images: list[Any]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([self.pixels(im) for im in images]))  # [B, 3, 336, 336]


def training_batch(encoder: Encoder, step: int, config: TrainConfig) -> dict[str, torch.Tensor]:
    """The model's inputs, plus "patch_labels" [3, B, n_patches] (colour, shape, centre) for the aux loss."""
    images, ids, labels, aux = [], [], [], []
    for j in range(config.batch_images):
        scene, questions = shapes.training_sample(step * config.batch_images + j, config.turns)
        images.append(shapes.render(scene))
        i, lab = encoder.conversation(questions)
        ids.append(i)
        labels.append(lab)
        aux.append(np.stack(shapes.patch_labels(scene)))  # [3, 576]
    input_ids = encoder.pad_batch(ids, encoder.pad)  # [B, S]
    mask = encoder.pad_batch([[1] * len(r) for r in ids], 0)
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": encoder.pad_batch(labels, IGNORE),
        "pixel_values": encoder.pixel_values(images),
        "patch_labels": torch.from_numpy(np.stack(aux, axis=1)),
    }


class PatchHeads(torch.nn.Module):
    """Per-patch colour / shape / centre classifiers on the vision tower's features (training only)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        sizes = (1 + len(shapes.COLOURS), 1 + len(shapes.SHAPES), 2)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(width, n) for n in sizes)

    def loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # features: [B, P, w] patch tokens (CLS dropped); targets: [3, B, P]
        losses = []
        for head, target in zip(self.heads, targets, strict=True):
            each = torch.nn.functional.cross_entropy(head(features).flatten(0, 1), target.flatten(), reduction="none")
            # Objects cover a few percent of the patches: their patches and the rest weigh half each.
            on = target.flatten() > 0
            parts = [each[on].mean(), each[~on].mean()] if on.any() and (~on).any() else [each.mean()]
            losses.append(torch.stack(parts).mean())
        return torch.stack(losses).mean()


class _VisionFeatures:
    """Keeps the vision tower's output of the layer the projector reads, from a forward hook."""

    def __init__(self, model: Any) -> None:
        self.layer = model.config.vision_feature_layer
        self.value: torch.Tensor | None = None
        self.handle = model.model.vision_tower.register_forward_hook(self._keep)

    def _keep(self, _module: Any, _inputs: Any, output: Any) -> None:
        self.value = output.hidden_states[self.layer][:, 1:]  # [B, P, w]: CLS dropped, as "default" selects


@torch.no_grad()
def first_token_accuracy(model: Any, encoder: Encoder, examples: list[shapes.Example], batch: int = 20) -> float:
    """Share of single-turn questions whose greedy first answer token is the answer's first token."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(examples), batch):
        chunk = examples[start : start + batch]
        prompts = [encoder.prompt(e.question.text) for e in chunk]
        lengths = torch.tensor([len(p) for p in prompts])
        out = model(
            input_ids=encoder.pad_batch(prompts, encoder.pad),
            attention_mask=encoder.pad_batch([[1] * len(p) for p in prompts], 0),
            pixel_values=encoder.pixel_values([e.image() for e in chunk]),
        )
        predicted = out.logits[torch.arange(len(chunk)), lengths - 1].argmax(-1)  # [B]
        wanted = torch.tensor([encoder.answer(e.question.answer)[0] for e in chunk])
        correct += int((predicted == wanted).sum())
    model.train(was_training)
    return correct / len(examples)


@dataclass
class StepInfo:
    step: int  # 1-based: steps done
    steps: int
    loss: float
    lr: float
    seconds: float  # since the start
    aux_loss: float = 0.0  # the per-patch auxiliary loss
    val_accuracy: float | None = None


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on norms, biases, embeddings and position tables: only on matrices that mix features.
    decay, rest = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed" not in name else rest).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-8)


def train(
    config: TrainConfig,
    on_step: Callable[[StepInfo], None] | None = None,
    checkpoint: Callable[[Any, int], None] | None = None,
    checkpoint_every: int = 0,
    preset: ModelPreset | None = None,
) -> tuple[Any, list[dict[str, float]]]:
    """Trains from random weights; returns (the fp32 model in eval mode, the per-step history).

    on_step: called after every step (progress display). checkpoint(model, step): called every
    `checkpoint_every` steps (0: never) so a long run can be inspected before it ends.
    preset: overrides `config.preset` (tests train an unregistered tiny geometry).
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    preset = preset or from_name(config.preset)
    encoder = Encoder(preset)
    model = build_random_model(preset, seed=config.seed).train()
    heads = PatchHeads(preset.vision_hidden_size)
    # The labels are on the dataset's 24 x 24 grid: a tower with another grid (the tiny test presets) trains without.
    use_aux = config.aux_weight > 0 and preset.num_patches == shapes.GRID**2
    vision = _VisionFeatures(model)
    optimizer = _optimizer(torch.nn.ModuleList([model, heads]), config)
    validation = list(shapes.examples("validation", config.eval_examples))
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    log.info("training %s: %d steps of %d images", preset.name, config.steps, config.batch_images)
    for step in range(config.steps):
        lr = config.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = training_batch(encoder, step, config)
        targets = batch.pop("patch_labels")
        loss = model(**batch).loss  # the answers' cross-entropy
        aux = heads.loss(vision.value, targets) if use_aux and vision.value is not None else torch.zeros(())
        optimizer.zero_grad(set_to_none=True)
        (loss + config.aux_weight * aux).backward()
        torch.nn.utils.clip_grad_norm_([*model.parameters(), *heads.parameters()], config.grad_clip)
        optimizer.step()

        done = step + 1
        info = StepInfo(done, config.steps, float(loss.detach()), lr, time.perf_counter() - start, float(aux.detach()))
        if (config.eval_every and done % config.eval_every == 0) or done == config.steps:
            info.val_accuracy = first_token_accuracy(model, encoder, validation)
            log.info("step %d: loss %.4f, validation first-token accuracy %.3f", done, info.loss, info.val_accuracy)
        history.append({k: v for k, v in asdict(info).items() if v is not None})
        if on_step is not None:
            on_step(info)
        if checkpoint is not None and checkpoint_every and done % checkpoint_every == 0 and done < config.steps:
            checkpoint(model, done)
    vision.handle.remove()
    return model.eval(), history


def plot_history(history: list[dict[str, float]], path: Path) -> None:
    """Training loss (raw and smoothed) and validation accuracy against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([h["step"] for h in history])
    loss = np.array([h["loss"] for h in history])
    window = max(1, len(loss) // 50)
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, color="0.8", lw=0.6, label="loss (per step)")
    ax.plot(steps[window - 1 :], smooth, color="C0", label=f"loss (mean of {window})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy on answers")
    evals = [(h["step"], h["val_accuracy"]) for h in history if "val_accuracy" in h]
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals, strict=True), "o-", color="C1", label="validation accuracy")
        ax2.set_ylim(0, 1.02)
        ax2.set_ylabel("validation first-token accuracy")
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title("default-small on the shapes dataset")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_history(history: list[dict[str, float]], config: TrainConfig, path: Path) -> None:
    path.write_text(json.dumps({"config": asdict(config), "history": history}, indent=1) + "\n", encoding="utf-8")
