"""`python -m export build | validate | engine`.

Thin entry points: parse the flags, build a config, call one library function,
print. User mistakes end in one `error:` line and exit code 2; a failed
validation in exit code 1. torch is imported only by `build` and `validate`:
`engine` runs on a Jetson without it. The commands that moved to their own
packages (`plan`, `bench`, `triton`) answer with a one-line pointer.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from coreMatching.cli import add_config_arguments, config_from_args
from coreMatching.config import DEFAULT_STATIC_WIDTH_RATIO

# Commands that moved out of the export: the old spelling names the new one.
MOVED = {"plan": "planner", "bench": "bench", "triton": "serving.triton"}
# coreMatching.static_neurons.CRITERIA's names, spelled out: that module imports torch, and `engine` shares this
# parser on boards without it (tests/test_static_neurons.py checks that the two agree, and the default).
STATIC_CRITERIA = ("frequency", "fluctuation")


def _build_parser(sub: Any) -> None:
    p = sub.add_parser(
        "build",
        help="trace the model into ONNX graphs with CoreMatching, validate, write a build",
        description="Trace a LLaVA model into ONNX graphs (vision; decoder stacks that serve prefill and "
        "decode, every weight in one graph) with in-graph core-token and core-neuron selection, validate them "
        "against PyTorch, and write a build directory.",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="DIR|HUB_ID",
        help="a local llava-hf directory or a hub id in the local Hugging Face cache (owner/name[@revision], "
        "never downloaded; default: the embedded model)",
    )
    p.add_argument("--out", type=Path, default=Path("builds/default"), help="build directory (default builds/default)")
    add_config_arguments(p)
    p.add_argument("--fp16", action="store_true", help="float16 weights and activations (GPU builds)")
    p.add_argument(
        "--weights",
        choices=("fp32", "fp16", "int8", "int4"),
        default=None,
        help="weight precision (default: the activations', fp32 or fp16 with --fp16); int8: per output "
        "channel, int4: blocks along the reduction axis (weight-only, round to nearest, docs/quantization.md)",
    )
    p.add_argument("--block-size", type=int, default=32, help="int4's block size: 16, 32, 64 or 128 (default 32)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18; 21 for int4 weights)")
    p.add_argument("--max-prompt-tokens", type=int, default=1024, help="longest prompt, image included (default 1024)")
    p.add_argument("--max-sequence", type=int, default=2048, help="longest prompt + answer (default 2048)")
    p.add_argument(
        "--neuron-chunks",
        type=int,
        default=1,
        help="select core neurons per chunk of the FFN (default 1; raised automatically where N "
        "is beyond TensorRT's TopK limit)",
    )
    p.add_argument(
        "--static-neurons",
        action="store_true",
        help="bake a static neuron set (counted over a calibration set) into narrower FFN weights "
        "instead of selecting core neurons per request: smaller weights, no per-request compaction",
    )
    p.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="JSONL of image and question lines for --static-neurons (default: the shapes validation split)",
    )
    p.add_argument("--calibration-count", type=int, default=64, help="calibration prompts counted (default 64)")
    p.add_argument(
        "--static-criterion",
        choices=STATIC_CRITERIA,
        default=None,
        help="how --static-neurons ranks each layer's neurons: frequency (most often among a prompt's core "
        "neurons) or fluctuation (largest Var(a_n) * ||W_down[:, n]||^2 over the calibration prefills) "
        "(default fluctuation)",
    )
    p.add_argument(
        "--static-width-ratio",
        type=float,
        default=None,
        help="neurons --static-neurons keeps per layer, as a multiple of the per-request N, in [1, 4] "
        f"(default {DEFAULT_STATIC_WIDTH_RATIO:g})",
    )
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--no-validate", action="store_true", help="skip the validation against PyTorch")
    p.add_argument("-v", "--verbose", action="store_true", help="log every step")


def _validate_parser(sub: Any) -> None:
    p = sub.add_parser("validate", help="check an existing build's files and validate it against PyTorch again")
    p.add_argument("build", type=Path, help="the build directory")
    p.add_argument(
        "--model",
        default=None,
        metavar="DIR|HUB_ID",
        help="the checkpoint the build was made from: a local llava-hf directory or a hub id in the local "
        "Hugging Face cache (default: the one its manifest names)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log every step")


def run_build(args: argparse.Namespace) -> int:
    from rich.console import Console

    from coreMatching.errors import CoreMatchingError
    from export.build import STAGES, BuildError, build
    from export.config import ExportConfig
    from export.manifest import PromptFormatError
    from export.static import static_recipe
    from export.summary import print_summary
    from export.validate import ValidationError
    from models import ModelLoadError
    from models.hub import resolve_model

    console = Console(stderr=True)
    try:
        corematching = None
        if not args.dense:
            corematching = config_from_args(args).with_(neuron_chunks=args.neuron_chunks)
        config = ExportConfig(
            out=args.out,
            model_dir=resolve_model(args.model),
            corematching=corematching,
            fp16=args.fp16,
            weights=args.weights,
            block_size=args.block_size,
            opset=args.opset,
            force=args.force,
            validate=not args.no_validate,
            max_prompt_tokens=args.max_prompt_tokens,
            max_sequence=args.max_sequence,
            static_neurons=args.static_neurons,
            calibration=args.calibration,
            calibration_count=args.calibration_count,
            static_recipe=static_recipe(args.static_criterion, args.static_width_ratio),
        )
        with console.status("building") as status:

            def on_stage(name: str) -> None:
                step = STAGES.index(name) + 1
                status.update(f"[{step}/{len(STAGES)}] {name}")
                logging.getLogger("export").info("stage %d/%d: %s", step, len(STAGES), name)

            result = build(config, on_stage)
    except ValidationError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        return 1
    except (CoreMatchingError, ModelLoadError, BuildError, PromptFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(result)
    return 0


def run_validate(args: argparse.Namespace) -> int:
    import buildformat
    from buildformat import ManifestError
    from coreMatching.errors import CoreMatchingError
    from export.summary import print_validation
    from models import ModelLoadError, default_model_dir, load_llava
    from models.hub import resolve_model

    try:
        manifest = buildformat.read(args.build)
        buildformat.verify(args.build, manifest)
        source = manifest.model.source
        # A build from the hub cache names its checkpoint owner/name@commit, which resolves to that snapshot.
        model_dir = resolve_model(args.model) or (
            default_model_dir() if source == "embedded default" else resolve_model(source)
        )
        model, processor = load_llava(model_dir)
        from export.validate_quant import revalidate

        report = revalidate(args.build, manifest, model, processor)
    except (ManifestError, ModelLoadError, CoreMatchingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_validation(report)
    return 0 if report.passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _build_parser(sub)
    _validate_parser(sub)
    from export.engine_cli import add_engine_parser, run_engine

    add_engine_parser(sub)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in MOVED:
        print(f"error: `python -m export {argv[0]}` is now `python -m {MOVED[argv[0]]}` (same flags)", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    handlers = {
        "build": run_build,
        "validate": run_validate,
        "engine": run_engine,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
