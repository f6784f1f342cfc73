"""Ask a build questions about an image: the streamed answer, then the timings (README: hardware).

    python runtime/demo.py --build builds/default --image examples/shapes_red_circle.png \\
        --question "What colour is the circle?"
    python runtime/demo.py --build builds/default            # asks for images and questions until an empty line

Needs no torch or transformers: numpy, onnxruntime (or TensorRT), tokenizers and Pillow.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from pathlib import Path

# Run as a script from a checkout: make the repository's packages importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime import USER_ERRORS, ImageError, Pipeline, PromptError, Sampling
from runtime.overlay import core_token_picture
from runtime.preprocess import load_image


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--build", type=Path, default=Path("builds/default"), help="build directory (default builds/default)"
    )
    parser.add_argument("--image", type=Path, help="the image (asked for when missing)")
    parser.add_argument("--question", help="the question (asked for when missing)")
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


def ask(pipeline: Pipeline, args: argparse.Namespace, image_path: Path, question: str) -> None:
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
        return
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


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    try:
        if args.core_tokens and args.core_tokens.exists() and not args.force:
            raise ImageError(f"{args.core_tokens} already exists; pass --force to overwrite it")
        Sampling(args.temperature, args.top_p, args.seed)  # settings are checked before loading
        pipeline = Pipeline.load(
            args.build, provider=args.provider, backend=args.backend, accuracy_level=args.accuracy_level
        )
        if args.image and args.question is not None:
            ask(pipeline, args, args.image, args.question)
            return 0
        # Interactive: ask for what is missing, until an empty line.
        while True:
            image = args.image or Path(input("image (empty to quit): ").strip() or "")
            if str(image) in ("", "."):
                return 0
            question = args.question if args.question is not None else input("question (empty to quit): ")
            if not question.strip():
                return 0
            try:
                ask(pipeline, args, image, question)
            except (ImageError, PromptError) as e:
                print(f"error: {e}", file=sys.stderr)
            if args.image and args.question is not None:
                return 0
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
