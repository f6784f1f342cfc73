"""Train the embedded default model on the shapes dataset and write it as a llava-hf directory.

    python scripts/train_default_model.py --out models/default --force

About an hour on a 2-core CPU with the defaults. Writes the fp16 checkpoint to --out (through a
temporary directory renamed at the end: an interrupted run leaves the old model in place) and the
loss history and curve to --log-dir. --checkpoint-dir gets an fp32 snapshot every
--checkpoint-every steps, to evaluate a long run before it ends.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from models.presets import PresetError
from training.train import StepInfo, TrainConfig, TrainConfigError, plot_history, train, write_history

log = logging.getLogger("train_default_model")


MODEL_CARD = """\
# corematching-edge default model (`{preset}`)

The model that `python -m export build` uses when no `--model` is given: a complete llava-hf
checkpoint (config.json, fp16 safetensors, tokenizer, preprocessor and processor configs) that loads
with `transformers.LlavaForConditionalGeneration` / `AutoProcessor` or `models.load_llava`.

## Architecture

`LlavaForConditionalGeneration` at the LLaVA-1.5 token geometry: 336 px images, patch 14, 576 image
tokens (CLS dropped).

- Vision tower: CLIP ViT, {vl} layers, hidden {vh}, MLP {vi}, {vheads} heads; the projector reads its
  last layer (feature layer {vfl}).
- Projector: 2-layer MLP with GELU ({vh} -> {h} -> {h}), as LLaVA-1.5.
- Decoder: Llama, {layers} layers, hidden {h}, FFN {ffn} (SwiGLU), {heads} heads / {kv} KV heads.
- {params:,} parameters, stored in fp16 ({size:.1f} MB).
- Tokenizer: byte-level BPE, {vocab} tokens (`<unk>` `<s>` `</s>` `<pad>`, learned tokens, `<image>` =
  {image_id}); `<s>` is prepended like Llama's tokenizer.
- Prompt: `USER: <image>\\n{{question}} ASSISTANT:`; answers are one word followed by `</s>`.

## Data

The procedural shapes dataset (`vqadata/shapes.py`): one to four coloured shapes (circle, square, triangle,
star; red, green, blue, yellow, purple, white) of several sizes on textured backgrounds with clutter.
Questions: colour of a named shape, shape of a coloured object, count of a kind (zero to four),
presence of a coloured shape (yes/no, with hard negatives), relative position (left/right,
above/below). Train, validation and test are disjoint seeded streams.

## Training

{commands}

{start}: {steps} steps of {batch} images{crowding}, {precision} on the CPU, {minutes:.0f} minutes on a 2-core machine.
AdamW (lr {lr}, warm-up {warmup}, cosine to {min_lr}x, weight decay {wd}).

- Each image comes with up to {turns} questions packed into one row: the image prefix once, then each
  question and its answer, where every question sees only the image and itself, at the position ids
  of a single-turn prompt (an attention mask keeps the turns apart). The loss is on the answers.
- Auxiliary losses, training only (their heads are dropped; the checkpoint is a stock
  `LlavaForConditionalGeneration`):
  - per patch, on the vision tower: the colour and shape of the object covering it and whether it
    holds an object's centre (weight {aux});
  - per image token, on the projector's output: a linear read-out of the patch's row and column
    (squared error, weight {pweight}), so that where a patch is reaches the decoder in the values
    its heads read;
  - grounding, on the decoder: head 0 of layer {glayer}, at the token that predicts an answer, is taught to
    attend to the patches of the objects the answer depends on ({pairing}),
    and the answer is read out one layer later through the model's own norm and LM head (weight {gweight});
  - a penalty on activations whose RMS exceeds {max_rms}.
- The decoder, projector and LM head start from std 1/sqrt(fan-in), not transformers' fixed 0.02,
  which is tuned for widths of 1000s. With 0.02 at width 128 the model sat at the answer priors for
  1000s of steps: the runs before this recipe ended below 50% (`training/train.py` says what each
  change measured).
- Note for the token-selection results: the grounding loss teaches one head of layer {glayer} (after the
  prune layer 2) where to look; neither selector's own layer (2) is trained directly.

Final training loss {loss:.4f}; first-token accuracy on {val_n} validation questions {val:.1%}.
Loss curve: `docs/training/loss.png`.

## Accuracy

Measured with `python scripts/evaluate.py` (1000 test questions, dense and with CoreMatching, FastV
and random token selection at several budgets, on the reference and on ONNX builds):
`docs/evaluation/accuracy.md`.
"""


COMMAND_PREFIX = "    python scripts/train_default_model.py"


def _earlier_commands(init_from: Path | None) -> list[str]:
    """The training commands recorded in the card of the model a run continues from."""
    card = init_from / "README.md" if init_from is not None else None
    if card is None or not card.is_file():
        return []
    return [line for line in card.read_text(encoding="utf-8").splitlines() if line.startswith(COMMAND_PREFIX)]


def write_card(
    out: Path,
    command: str,
    config: TrainConfig,
    history: list[dict[str, float]],
    model: object,
    init_from: Path | None = None,
) -> None:
    from models.presets import from_name

    p = from_name(config.preset)
    final = history[-1]
    size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e6
    commands = "\n".join([*_earlier_commands(init_from), f"    {command}"])
    start = f"From random weights (seed {config.seed})" if init_from is None else "Continued from the model above"
    (out / "README.md").write_text(
        MODEL_CARD.format(
            preset=p.name,
            vl=p.vision_num_layers,
            vh=p.vision_hidden_size,
            vi=p.vision_intermediate_size,
            vheads=p.vision_num_heads,
            vfl=p.vision_feature_layer,
            h=p.hidden_size,
            layers=p.num_hidden_layers,
            ffn=p.intermediate_size,
            heads=p.num_attention_heads,
            kv=p.num_key_value_heads,
            params=sum(t.numel() for t in model.parameters()),
            size=size,
            vocab=p.vocab_size,  # type: ignore[attr-defined]
            image_id=p.image_token_id,
            commands=commands,
            start=start,
            steps=config.steps,
            batch=config.batch_images,
            precision="bf16 autocast" if config.bf16 else "fp32",
            crowding=(
                f" ({config.crowded:.0%} of them crowded: three or four objects of two kinds, so that counts of"
                " three and four are common)"
                if config.crowded
                else ""
            ),
            turns=config.turns,
            max_rms=config.max_rms,
            aux=config.aux_weight,
            glayer=config.grounding_layer,
            gweight=config.grounding_weight,
            pweight=config.position_weight,
            pairing=(
                "for a position question, head 0 the first named object and head 1 the second"
                if config.pair_grounding
                else "both objects of a position question on head 0"
            ),
            lr=config.lr,
            warmup=config.warmup_steps,
            min_lr=config.min_lr_ratio,
            wd=config.weight_decay,
            minutes=final["seconds"] / 60,
            loss=final["loss"],
            val_n=config.eval_examples,
            val=final.get("val_accuracy", float("nan")),
        ),
        encoding="utf-8",
    )


def main(argv: list[str] | None = None) -> int:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/default"), help="model directory to write")
    parser.add_argument("--log-dir", type=Path, default=Path("docs/training"), help="history.json and loss.png")
    parser.add_argument("--preset", default=defaults.preset)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-images", type=int, default=defaults.batch_images)
    parser.add_argument("--turns", type=int, default=defaults.turns, help="questions per image (at most)")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--init-from", type=Path, default=None, help="continue from this llava-hf model directory")
    parser.add_argument(
        "--first-example",
        type=int,
        default=defaults.first_example,
        help="index of the first training image (to continue past the images a run has seen)",
    )
    parser.add_argument(
        "--position-weight",
        type=float,
        default=defaults.position_weight,
        help="weight of the linear row/column read-out on the projector's image tokens (0: off)",
    )
    parser.add_argument(
        "--no-pair-grounding",
        dest="pair_grounding",
        action="store_false",
        help="ground both objects of a position question on one head (the recipe before position training)",
    )
    parser.add_argument(
        "--crowded",
        type=float,
        default=defaults.crowded,
        help="share of training images with three or four objects of two kinds (counts of three and four are common)",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="matmuls and attention in bfloat16 under CPU autocast (faster on CPUs with AVX512-BF16)",
    )
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--eval-examples", type=int, default=defaults.eval_examples)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="fp32 snapshots during training")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.out.exists() and not args.force:
        print(f"error: {args.out} exists; pass --force to replace it", file=sys.stderr)
        return 2
    try:
        config = TrainConfig(
            preset=args.preset,
            steps=args.steps,
            batch_images=args.batch_images,
            lr=args.lr,
            seed=args.seed,
            eval_every=args.eval_every,
            threads=args.threads,
            warmup_steps=args.warmup_steps,
            first_example=args.first_example,
            position_weight=args.position_weight,
            pair_grounding=args.pair_grounding,
            eval_examples=args.eval_examples,
            bf16=args.bf16,
            turns=args.turns,
            crowded=args.crowded,
        )
    except (TrainConfigError, PresetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import torch
    from transformers.utils import logging as hf_logging

    from export.build import replace_dir
    from models.default_model import save_checkpoint
    from models.presets import from_name

    hf_logging.disable_progress_bar()
    preset = from_name(config.preset)

    def snapshot(model: object, step: int) -> None:
        save_checkpoint(model, preset, args.checkpoint_dir)
        log.info("step %d: snapshot in %s", step, args.checkpoint_dir)

    columns = (
        TextColumn("[bold]train"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}  val {task.fields[val]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as progress:
        task = progress.add_task("train", total=config.steps, loss=float("nan"), val="-")
        ema: list[float] = []

        def on_step(info: StepInfo) -> None:
            ema.append(info.loss if not ema else 0.98 * ema[-1] + 0.02 * info.loss)
            val = f"{info.val_accuracy:.3f}" if info.val_accuracy is not None else progress.tasks[0].fields["val"]
            progress.update(task, completed=info.step, loss=ema[-1], val=val)
            if not progress.console.is_terminal and info.step % 50 == 0:  # a log file gets a line now and then
                log.info(
                    "step %d/%d: loss %.4f, patch loss %.3f, position loss %.3f, grounding loss %.3f (%.0f s)",
                    info.step,
                    info.steps,
                    ema[-1],
                    info.aux_loss,
                    info.position_loss,
                    info.grounding_loss,
                    info.seconds,
                )

        try:
            model, history = train(
                config,
                on_step=on_step,
                checkpoint=snapshot if args.checkpoint_dir else None,
                checkpoint_every=args.checkpoint_every,
                init_from=args.init_from,
            )
        except TrainConfigError as e:  # a bad --init-from: raised before the first step
            progress.stop()
            print(f"error: {e}", file=sys.stderr)
            return 2

    args.log_dir.mkdir(parents=True, exist_ok=True)
    write_history(history, config, args.log_dir / "history.json")
    plot_history(history, args.log_dir / "loss.png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent))
    try:
        save_checkpoint(model, preset, tmp, dtype=torch.float16)
        command = "python scripts/train_default_model.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        write_card(tmp, command.strip(), config, history, model, args.init_from)
        tmp.chmod(0o755)  # mkdtemp is private; the model is package data every user must read
        for f in tmp.iterdir():
            f.chmod(0o644)
        replace_dir(tmp, args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = history[-1]
    print(
        f"wrote {args.out}: {config.steps} steps in {final['seconds'] / 60:.1f} min, "
        f"final loss {final['loss']:.4f}, validation first-token accuracy {final.get('val_accuracy', float('nan')):.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
