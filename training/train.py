"""Train a small LLaVA on the shapes dataset (torch and transformers, on a CPU in about an hour).

The model is a stock `LlavaForConditionalGeneration` of a preset (CLIP vision tower, projector,
Llama decoder) with the project tokenizer. Each training row is one image and several questions
about it, packed (`Encoder.turns`):

    <s>USER: <image>  \n{q1} ASSISTANT: {a1}</s>  \n{q2} ASSISTANT: {a2}</s>  ...

so the 576 image tokens are paid once for several questions. An attention mask and position ids
make every turn see only the image prefix and itself, at the positions of the single-turn prompt
the processor builds at inference ("USER: <image>\n{question} ASSISTANT:"): each turn computes
exactly what inference computes, and no answer leaks into another turn. The loss is on the
answers and their `</s>`.

What each part of the recipe is for, and what was measured on the way to it:
`docs/training/log.md`.

The auxiliary heads are dropped after training; the saved model is a stock
`LlavaForConditionalGeneration`.
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

from models.answer import build_prompt
from models.default_model import IMAGE_TOKEN, build_processor, build_tokenizer
from models.presets import ModelPreset, build_random_model, from_name
from runtime.preprocess import ImageProcessor
from training.objective import IGNORE, GroundingLoss, PatchHeads, VisionFeatures, activation_penalty
from vqadata import shapes

log = logging.getLogger(__name__)


def init_for_width(model: Any, seed: int) -> None:
    """Re-draws the decoder's, projector's and LM head's weights with std 1/sqrt(fan-in).

    transformers draws every matrix with std `initializer_range` (0.02), a width-independent value
    tuned for hidden sizes of 1000s. At width 128 that is 4x too small: the chain the answer must
    take from an image token (value, output, LM head) starts 4^3 = 64x weaker, and training sits at
    the answer priors for 1000s of steps before the image is read (the first runs: 1500 steps).
    """
    generator = torch.Generator().manual_seed(seed + 1)
    parts = (model.model.language_model, model.model.multi_modal_projector, model.lm_head)
    with torch.no_grad():
        for part in parts:
            for module in part.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.normal_(0.0, module.in_features**-0.5, generator=generator)
                    if module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, torch.nn.Embedding):
                    module.weight.normal_(0.0, module.embedding_dim**-0.5, generator=generator)


class TrainConfigError(ValueError):
    """A training setting out of range."""


def _load_start(path: Path, preset: ModelPreset) -> Any:
    """The fp32 model of a llava-hf directory to continue training from; it must have the preset's geometry."""
    from models.loading import ModelLoadError, load_llava

    try:
        model, _ = load_llava(path)
    except ModelLoadError as e:
        raise TrainConfigError(f"--init-from: {e}") from e
    text, vision = model.config.text_config, model.config.vision_config
    ours = (preset.hidden_size, preset.num_hidden_layers, preset.vocab_size, preset.vision_hidden_size)
    theirs = (text.hidden_size, text.num_hidden_layers, text.vocab_size, vision.hidden_size)
    if ours != theirs:
        raise TrainConfigError(f"--init-from {path}: its geometry {theirs} is not preset {preset.name}'s {ours}")
    return model.train()


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "default-small"
    steps: int = 3000
    batch_images: int = 6  # images per step; each brings up to `turns` questions
    # Questions per image (as many different ones as the scene supports, up to this): 18 rather than 12
    # took validation from 82.5% to 91% at the end of the first stage, for about the same time per step
    # (the image's 576 tokens dominate a row).
    turns: int = 18
    lr: float = 2e-3
    min_lr_ratio: float = 0.05  # cosine decay to lr * this
    warmup_steps: int = 150
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    aux_weight: float = 1.0  # weight of the per-patch auxiliary loss on the vision tower (0: off)
    # Grounding loss: one attention head of one decoder layer, at the token that predicts an answer,
    # is taught to attend to the patches of the objects the answer depends on (0: off).
    grounding_weight: float = 0.5
    grounding_layer: int = 4
    # Activation scale: the projector's image tokens and the decoder's residual stream after every layer
    # are held to this RMS at most (a penalty on the excess). Unchecked, the first layer writes a large
    # image-independent vector into every token (RMS 20 to 40), and what a head reads from the image
    # must then grow as large before it moves the logits.
    max_rms: float = 4.0
    # A linear read-out of each image token's row and column from the projector's output (0: off).
    # Without it the tower drops where a patch is (a linear probe on the trained model's image tokens
    # read a patch's column no better than its mean), and "left or right of" cannot be answered from
    # the values the decoder's heads read.
    position_weight: float = 1.0
    # Position questions: head 0 grounds on the first named object only and head 1 on the second, so
    # that the answer token reads the two positions apart instead of their average (False: head 0 on both).
    pair_grounding: bool = True
    seed: int = 0
    # Share of training images drawn as crowded scenes (three or four objects of two kinds), where
    # counts of three and four are common; the test distribution's scenes rarely have them.
    crowded: float = 0.0
    first_example: int = 0  # index of the first training image (a continued run starts past the images seen)
    eval_every: int = 250  # steps between validation accuracy checks (0: only at the end)
    eval_examples: int = 200
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    # Matmuls and attention in bfloat16 under CPU autocast; weights, optimizer state, norms and losses stay
    # fp32. 1.15x faster steps where the CPU has AVX512-BF16 (slower where it must emulate bfloat16).
    bf16: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.crowded <= 1:
            raise TrainConfigError(f"crowded must be a share in [0, 1], got {self.crowded}")
        if self.first_example < 0:
            raise TrainConfigError(f"first_example must be >= 0, got {self.first_example}")
        for name in ("steps", "batch_images", "turns", "eval_examples"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.lr < 1:
            raise TrainConfigError(f"lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise TrainConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if min(self.aux_weight, self.grounding_weight, self.position_weight) < 0:
            raise TrainConfigError("aux_weight, grounding_weight and position_weight must be >= 0")
        if self.max_rms <= 0:
            raise TrainConfigError(f"max_rms must be > 0, got {self.max_rms}")
        if self.grounding_layer < 0:
            raise TrainConfigError(f"grounding_layer must be >= 0, got {self.grounding_layer}")
        if self.warmup_steps < 0 or self.eval_every < 0:
            raise TrainConfigError("warmup_steps and eval_every must be >= 0")
        from_name(self.preset)  # raises UnknownPresetError with the known names

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to lr * min_lr_ratio at the last step."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class Packed:
    """A training row: one image prefix and several turns (see `Encoder.turns`)."""

    ids: list[int]
    labels: list[int]  # IGNORE except on the answers and their </s>
    positions: list[int]  # position ids: every turn continues right after the prefix
    segments: list[int]  # 0: the prefix; t: turn t
    queries: list[int]  # per turn, the index of the token that predicts its answer
    image_start: int  # index of the first image token


class Encoder:
    """Token ids and pixel values of conversations, as the processor would build them."""

    def __init__(self, preset: ModelPreset) -> None:
        self.preset = preset
        self.tokenizer = build_tokenizer(preset.vocab_size)
        self.processor = build_processor(self.tokenizer, preset)
        self.pixels = ImageProcessor.from_config(self.processor.image_processor.to_dict())
        self.image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id

    def prompt(self, question: str) -> list[int]:
        """The inference prompt (the chat template: "USER: <image>\\n{question} ASSISTANT:"), <image> expanded."""
        ids = self.tokenizer(build_prompt(self.processor, question))["input_ids"]
        at = ids.index(self.image_id)
        return ids[:at] + [self.image_id] * self.preset.num_image_tokens + ids[at + 1 :]

    def answer(self, text: str) -> list[int]:
        return self.tokenizer(f" {text}", add_special_tokens=False)["input_ids"] + [self.eos]

    def turns(self, questions: list[shapes.Question]) -> Packed:
        """One image and several single-turn questions about it, packed into one training row.

        The row is the image prefix "<s>USER: <image>" (576 image tokens) once, then for each question
        the rest of its single-turn prompt ("\n{question} ASSISTANT:") and its answer. Each turn sees
        the prefix and itself only, at the positions the single-turn prompt has (`Packed.positions`,
        `Packed.segments`): every turn is exactly the computation of an inference prompt, and no turn can
        read an answer from another one.
        """
        prompts = [self.prompt(q.text) for q in questions]
        at = len(prompts[0]) - 1 - prompts[0][::-1].index(self.image_id)  # the last image token
        prefix = prompts[0][: at + 1]
        ids, labels = list(prefix), [IGNORE] * len(prefix)
        positions, segments = list(range(len(prefix))), [0] * len(prefix)
        queries = []
        for turn, (q, prompt) in enumerate(zip(questions, prompts, strict=True), start=1):
            assert prompt[: at + 1] == prefix, "the prompt's text after the image must not merge into its prefix"
            asked, answered = prompt[at + 1 :], self.answer(q.answer)
            queries.append(len(ids) + len(asked) - 1)  # the last prompt token: it predicts the answer
            ids += asked + answered
            labels += [IGNORE] * len(asked) + answered
            positions += range(len(prefix), len(prefix) + len(asked) + len(answered))
            segments += [turn] * (len(asked) + len(answered))
        return Packed(ids, labels, positions, segments, queries, prefix.index(self.image_id))

    def pad_batch(self, rows: list[list[int]], fill: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([r + [fill] * (width - len(r)) for r in rows])

    def pixel_values(self, images: list[Any]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([self.pixels(im) for im in images]))  # [B, 3, 336, 336]


def training_batch(encoder: Encoder, step: int, config: TrainConfig) -> dict[str, torch.Tensor]:
    """The model's inputs (a 4-D attention mask and position ids that keep the turns apart), plus, for
    the training losses only: "patch_labels" [3, B, n_patches] (colour, shape, centre), "queries" [B, T]
    (the index of the token that predicts each turn's answer; -1 past the last turn) and "relevant"
    [2, B, T, n_patches] (per grounded head, the patches it should attend to: `grounding_targets`).
    """
    images, rows, aux, relevant = [], [], [], []
    for j in range(config.batch_images):
        scene, questions = shapes.training_sample(
            config.first_example + step * config.batch_images + j, config.turns, config.crowded
        )
        images.append(shapes.render(scene))
        rows.append(encoder.turns(questions))
        aux.append(np.stack(shapes.patch_labels(scene)))  # [3, 576]
        relevant.append([grounding_targets(scene, q, config.pair_grounding) for q in questions])  # [2, 576] each
    turns = max(len(r.queries) for r in rows)
    queries = torch.full((len(rows), turns), -1)
    wanted = torch.zeros(2, len(rows), turns, shapes.GRID**2, dtype=torch.bool)
    for b, (row, rel) in enumerate(zip(rows, relevant, strict=True)):
        queries[b, : len(row.queries)] = torch.tensor(row.queries)
        wanted[:, b, : len(rel)] = torch.from_numpy(np.stack(rel, axis=1))
    return {
        "input_ids": encoder.pad_batch([r.ids for r in rows], encoder.pad),  # [B, S]
        "labels": encoder.pad_batch([r.labels for r in rows], IGNORE),
        "position_ids": encoder.pad_batch([r.positions for r in rows], 0),
        "attention_mask": turn_mask(encoder.pad_batch([r.segments for r in rows], -1)),  # [B, 1, S, S]
        "pixel_values": encoder.pixel_values(images),
        "patch_labels": torch.from_numpy(np.stack(aux, axis=1)),
        "queries": queries,
        "relevant": wanted,
    }


def grounding_targets(scene: shapes.Scene, question: shapes.Question, pair: bool) -> np.ndarray:
    """bool [2, 576]: the patches grounded heads 0 and 1 should attend to for this question.

    Head 0: the objects the answer depends on; head 1: none (not grounded). With `pair`, a position
    question splits its two objects: head 0 the first named, head 1 the second.
    """
    none = np.zeros(shapes.GRID**2, dtype=bool)
    if pair and question.type == "position":
        first, second = question.objects
        return np.stack([shapes.object_patches(scene, (first,)), shapes.object_patches(scene, (second,))])
    return np.stack([shapes.object_patches(scene, question.objects), none])


def turn_mask(segments: torch.Tensor) -> torch.Tensor:
    """Additive attention mask [B, 1, S, S] of packed rows: a token sees the earlier tokens of its own
    turn and of the prefix (segment 0); padding (segment -1) sees itself only.

    segments: [B, S] int
    """
    s = segments.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).tril()  # [S, S]
    query, key = segments[:, :, None], segments[:, None, :]  # [B, S, 1], [B, 1, S]
    allowed = causal & ((key == 0) | (key == query)) & (key >= 0) & (query >= 0)
    allowed |= torch.eye(s, dtype=torch.bool)  # padding rows: no all-masked softmax
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return mask[:, None]


class Objective:
    """Every loss of a training step, and the hooks they read the model through.

    The answers' cross-entropy, plus, where the preset has the dataset's 24 x 24 grid (the tiny test
    presets train without them): the per-patch loss on the vision tower (`PatchHeads`), the
    grounding and read-out losses (`GroundingLoss`); and the activation-scale penalty.
    """

    def __init__(self, model: Any, preset: ModelPreset, config: TrainConfig) -> None:
        self.config = config
        on_grid = preset.num_patches == shapes.GRID**2
        self.heads = None
        if (config.aux_weight > 0 or config.position_weight > 0) and on_grid:
            self.heads = PatchHeads(preset.vision_hidden_size, preset.hidden_size)
        self.grounding = None
        if config.grounding_weight > 0 and on_grid:
            if config.grounding_layer >= preset.num_hidden_layers:
                last = preset.num_hidden_layers - 1
                raise TrainConfigError(f"grounding_layer {config.grounding_layer} is past the last layer ({last})")
            self.grounding = GroundingLoss(model, config.grounding_layer)
        self.vision = VisionFeatures(model)
        self.image_id = model.config.image_token_id

    def parameters(self) -> list[torch.nn.Parameter]:
        """The auxiliary heads' parameters (trained with the model, dropped after)."""
        return list(self.heads.parameters()) if self.heads is not None else []

    def __call__(self, model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The losses of one batch of `training_batch`: "answer", "patch", "position", "grounding", "scale",
        "total"."""
        batch = dict(batch)
        targets = batch.pop("patch_labels")
        queries, relevant = batch.pop("queries"), batch.pop("relevant")
        out = model(**batch, output_hidden_states=True)
        image_start = int((batch["input_ids"][0] == self.image_id).nonzero()[0])  # every row has the same prefix
        zero = torch.zeros(())
        patch = position = zero
        if self.heads is not None:
            if self.config.aux_weight > 0:
                patch = self.heads.loss(self.vision.value, targets)
            if self.config.position_weight > 0:
                position = self.heads.position_loss(self.vision.projected, targets[0] > 0)
        ground = zero
        if self.grounding is not None:
            # relevant: [2, B, T, P], the targets of heads 0 and 1 (head 1's are empty unless paired)
            ground = self.grounding.loss(queries, relevant, image_start)
            ground = ground + self.grounding.readout_loss(queries, batch["labels"])
        # the projected image tokens [B, P, d] and the residual stream after every decoder layer [B, S, d]
        scale = activation_penalty([self.vision.projected, *out.hidden_states[1:]], self.config.max_rms)
        total = out.loss + self.config.aux_weight * patch + self.config.position_weight * position
        total = total + self.config.grounding_weight * ground + scale
        return {
            "answer": out.loss,
            "patch": patch,
            "position": position,
            "grounding": ground,
            "scale": scale,
            "total": total,
        }

    def remove(self) -> None:
        self.vision.remove()
        if self.grounding is not None:
            self.grounding.remove()


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
    position_loss: float = 0.0  # the row / column read-out's squared error
    grounding_loss: float = 0.0  # -log of the grounded heads' attention on their objects, plus the read-out
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
    init_from: Path | None = None,
) -> tuple[Any, list[dict[str, float]]]:
    """Trains from random weights; returns (the fp32 model in eval mode, the per-step history).

    on_step: called after every step (progress display). checkpoint(model, step): called every
    `checkpoint_every` steps (0: never) so a long run can be inspected before it ends.
    preset: overrides `config.preset` (tests train an unregistered tiny geometry).
    init_from: a llava-hf directory of this preset to continue from, instead of random weights.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    preset = preset or from_name(config.preset)
    encoder = Encoder(preset)
    if init_from is not None:
        model = _load_start(Path(init_from), preset)
    else:
        model = build_random_model(preset, seed=config.seed).train()
        init_for_width(model, config.seed)
    objective = Objective(model, preset, config)
    optimizer = _optimizer(torch.nn.ModuleList([model, *([objective.heads] if objective.heads else [])]), config)
    validation = list(shapes.examples("validation", config.eval_examples))
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    log.info("training %s: %d steps of %d images", preset.name, config.steps, config.batch_images)
    for step in range(config.steps):
        lr = config.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = training_batch(encoder, step, config)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            losses = objective(model, batch)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_([*model.parameters(), *objective.parameters()], config.grad_clip)
        optimizer.step()

        done = step + 1
        info = StepInfo(
            done,
            config.steps,
            float(losses["answer"].detach()),
            lr,
            time.perf_counter() - start,
            float(losses["patch"].detach()),
            float(losses["position"].detach()),
            float(losses["grounding"].detach()),
        )
        if (config.eval_every and done % config.eval_every == 0) or done == config.steps:
            info.val_accuracy = first_token_accuracy(model, encoder, validation)
            log.info("step %d: loss %.4f, validation first-token accuracy %.3f", done, info.loss, info.val_accuracy)
        history.append({k: v for k, v in asdict(info).items() if v is not None})
        if on_step is not None:
            on_step(info)
        if checkpoint is not None and checkpoint_every and done % checkpoint_every == 0 and done < config.steps:
            checkpoint(model, done)
    objective.remove()
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
