"""Ask a build questions about an image: the streamed answer, then the timings (README: hardware).

    python runtime/demo.py --build builds/default --image examples/shapes_red_circle.png \\
        --question "What colour is the circle?"
    python runtime/demo.py --build builds/default            # a conversation: asks for an image, then questions

Interactive, a follow-up question continues the conversation about the same image (the earlier
questions and answers go with it); an image's path starts a new conversation (LLaVA-1.5 takes one
image per conversation), `/new` starts over with the same image, an empty line quits.

Needs no torch or transformers: numpy, onnxruntime (or TensorRT), tokenizers, Jinja and Pillow.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# Run as a script from a checkout: make the repository's packages importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime import (
    USER_ERRORS,
    Answer,
    AnswerTooLong,
    ConversationError,
    ImageError,
    Pipeline,
    PromptError,
    PromptTooLong,
    Sampling,
)
from runtime.chat import Conversation, Message
from runtime.overlay import core_token_picture
from runtime.preprocess import load_image

HELP = (
    "a question continues the conversation about the image; /new starts over with the same image; "
    "an image's path starts a new conversation; an empty line quits"
)
# Suffixes that make a line an image's path even before the file is checked (a mistyped path is
# reported as one, not asked to the model as a question).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Errors a conversation's growth causes: the remedy is to start over, which the demo offers.
GROWTH_ERRORS = (PromptTooLong, AnswerTooLong)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--build", type=Path, default=Path("builds/default"), help="build directory (default builds/default)"
    )
    parser.add_argument("--image", type=Path, help="the image (asked for when missing)")
    parser.add_argument("--question", help="the question (asked for when missing)")
    parser.add_argument("--system", help="a system prompt before the conversation (default none)")
    parser.add_argument(
        "--provider",
        default="auto",
        choices=["auto", "tensorrt", "cuda", "cpu"],
        help="ONNX Runtime execution provider (default auto: TensorRT, CUDA, then CPU)",
    )
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "onnxruntime", "tensorrt"],
        help="auto uses the build's TensorRT engines when they run here",
    )
    parser.add_argument(
        "--accuracy-level",
        type=int,
        choices=(1, 4),
        default=1,
        help="quantized builds on ONNX Runtime: 1 multiplies in fp32, as validated (default); 4 quantizes the "
        "activations to int8 (faster; the build's validation record gives its logit difference)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--json", action="store_true", help="print one JSON object per answer, no streaming")
    parser.add_argument("--core-tokens", type=Path, help="save the image with the kept patches highlighted (PNG)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --core-tokens file")
    return parser.parse_args(argv)


@dataclass
class Chat:
    """One conversation about one image: the system prompt and the turns answered so far."""

    system: str | None = None
    turns: list[tuple[str, str]] = field(default_factory=list)  # (question, answer)

    def prompt(self, question: str) -> Conversation:
        """The whole conversation with the new question (a first turn without a system prompt is the
        one-turn prompt: it encodes as the bare question does)."""
        messages = [Message("system", self.system)] if self.system is not None else []
        for i, (asked, answered) in enumerate(self.turns):
            messages += [Message("user", asked, image=i == 0), Message("assistant", answered)]
        messages.append(Message("user", question, image=not self.turns))
        return Conversation(tuple(messages))

    def record(self, question: str, answer: str) -> None:
        self.turns.append((question, answer))

    def reset(self) -> None:
        self.turns.clear()


def _start_over(chat: Chat) -> str:
    chat.reset()
    return "(a new conversation about the same image)"


# The interactive commands: each acts on the conversation and says what it did.
COMMANDS: dict[str, Callable[[Chat], str]] = {"/new": _start_over, "/reset": _start_over, "/help": lambda chat: HELP}


def ask(pipeline: Pipeline, args: argparse.Namespace, image_path: Path, question: str | Conversation) -> Answer:
    sampling = Sampling(args.temperature, args.top_p, args.seed)
    stream = None if args.json else (lambda text: print(text, end="", flush=True))
    answer = pipeline.answer(image_path, question, args.max_new_tokens, sampling, on_text=stream)
    if args.core_tokens:
        model = pipeline.manifest.model
        picture = core_token_picture(
            load_image(image_path), answer.kept_image_tokens, model.image_size, model.patch_size, model.num_image_tokens
        )
        picture.save(args.core_tokens)
    if args.json:
        print(json.dumps(answer.to_json()))
        return answer
    t = answer.timings
    kept = answer.num_image_tokens if answer.kept_image_tokens is None else len(answer.kept_image_tokens)
    rate = ""
    if t.decode:
        rate = f", decode {1 / statistics.median(t.decode):.1f} tokens/s ({len(answer.token_ids)} tokens)"
    print()
    print(
        f"kept {kept} of {answer.num_image_tokens} image tokens; vision {t.vision * 1e3:.1f} ms, "
        f"prefill {t.prefill * 1e3:.1f} ms{rate} [{answer.backend}]"
    )
    if args.core_tokens:
        print(f"core tokens: {args.core_tokens}")
    return answer


def is_image_path(line: str) -> bool:
    """Whether a line typed at the question prompt names an image (a new conversation) rather than asks."""
    if Path(line).expanduser().is_file():
        return True
    return not any(c.isspace() for c in line) and line.lower().endswith(IMAGE_SUFFIXES)


def open_image(line: str) -> Path | None:
    """The typed image's path once it decodes (reported before any question is asked about it)."""
    path = Path(line).expanduser()
    try:
        load_image(path)
    except ImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    return path


def converse(pipeline: Pipeline, args: argparse.Namespace, chat: Chat) -> int:
    """Interactive: asks for what is missing, keeps the conversation, until an empty line."""
    image = args.image
    if args.question is None:
        print(HELP)
    while True:
        if image is None:
            line = input("image (empty to quit): ").strip()
            if not line:
                return 0
            image = open_image(line)
            chat.reset()
            continue
        if args.question is not None:
            # One fixed question: each image is its own one-turn conversation.
            ask(pipeline, args, image, chat.prompt(args.question))
            image = None
            continue
        follow_up = "follow-up, /new or an image's path (empty to quit): "
        line = input(follow_up if chat.turns else "question (empty to quit): ").strip()
        if not line:
            return 0
        if line.startswith("/") and line.split()[0] in COMMANDS:
            print(COMMANDS[line.split()[0]](chat))
            continue
        if is_image_path(line):
            opened = open_image(line)
            if opened is not None:  # a new image, a new conversation; a bad one keeps the current
                image = opened
                chat.reset()
            continue
        try:
            answer = ask(pipeline, args, image, chat.prompt(line))
        except (ImageError, PromptError, ConversationError, AnswerTooLong) as e:
            if isinstance(e, AnswerTooLong) and not chat.turns:
                raise  # a first turn: --max-new-tokens itself is beyond the cache
            grown = chat.turns and isinstance(e, GROWTH_ERRORS)
            print(f"error: {e}" + ("; or type /new to start over with this image" if grown else ""), file=sys.stderr)
            continue
        chat.record(line, answer.text)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    try:
        if args.core_tokens and args.core_tokens.exists() and not args.force:
            raise ImageError(f"{args.core_tokens} already exists; pass --force to overwrite it")
        if args.system is not None and not args.system.strip():
            raise ConversationError("--system is empty; give the system prompt's text or leave the flag out")
        Sampling(args.temperature, args.top_p, args.seed)  # settings are checked before loading
        pipeline = Pipeline.load(
            args.build, provider=args.provider, backend=args.backend, accuracy_level=args.accuracy_level
        )
        chat = Chat(args.system)
        if args.image and args.question is not None:
            ask(pipeline, args, args.image, chat.prompt(args.question))
            return 0
        return converse(pipeline, args, chat)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (EOFError, KeyboardInterrupt):
        print()
        return 0
    except BrokenPipeError:
        # The reader went away (`demo.py ... | head`): stop quietly, as command-line tools do.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stdout must stay open for the interpreter's exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
