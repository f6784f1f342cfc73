"""Answer a question about an image with the CoreMatching PyTorch reference.

    python scripts/reference_answer.py                       # the embedded default model and a shipped example
    python scripts/reference_answer.py --model DIR --image IMG --question TEXT [--token-budget 64] [--json]

Until `python -m export build` and `runtime/demo.py` land, this is the main job: it
runs the method end to end in PyTorch (vision, pruned prefill, neuron-sparse decode).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE = REPO / "examples" / "shapes_red_circle.png"
DEFAULT_QUESTION = "What colour is the circle?"


def main(argv: list[str] | None = None) -> int:
    from coreMatching.cli import add_config_arguments, config_from_args
    from coreMatching.errors import CoreMatchingError
    from models import ModelLoadError, default_model_dir, load_llava, num_image_tokens
    from models.answer import ImageError, answer, load_image
    from models.hub import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default=None,
        metavar="DIR|HUB_ID",
        help="a local llava-hf directory or a hub id in the local Hugging Face cache (owner/name[@revision], "
        "never downloaded; default: the embedded model)",
    )
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="the image (default: a shipped example)")
    parser.add_argument("--question", default=DEFAULT_QUESTION, help=f"the question (default {DEFAULT_QUESTION!r})")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit (default 32)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_config_arguments(parser)
    args = parser.parse_args(argv)

    try:
        # Settings and the image are checked before the (possibly large) model is loaded.
        config = None if args.dense else config_from_args(args)
        image = load_image(args.image)
        model, processor = load_llava(resolve_model(args.model) or default_model_dir())
        if config is None:
            config = config_from_args(args, num_image_tokens=num_image_tokens(model.config))
        stream = None if args.json else lambda text: print(text, end="", flush=True)
        result = answer(model, processor, image, args.question, config, args.max_new_tokens, on_text=stream)
    except (CoreMatchingError, ImageError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    decode = result.timings["decode"]
    if args.json:
        print(
            json.dumps(
                {
                    "answer": result.text,
                    "token_ids": result.token_ids,
                    "kept_image_tokens": result.kept_image_tokens,
                    "timings": result.timings,
                }
            )
        )
        return 0
    print()
    rate = f", decode {1 / statistics.median(decode):.1f} tokens/s" if decode else ""
    print(
        f"kept {len(result.kept_image_tokens)} of {result.num_image_tokens} image tokens "
        f"(prompt {result.prompt_tokens} tokens); vision {result.timings['vision'] * 1e3:.1f} ms, "
        f"prefill {result.timings['prefill'] * 1e3:.1f} ms{rate}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
