"""Accuracy of every token selector, with and without a merge, on the reference and on ONNX builds.

    python scripts/evaluate.py                       # embedded model, 1000 shapes test questions
    python scripts/evaluate.py --model ~/llava-1.5-7b-hf --data pope.jsonl --onnx none --out-dir pope-eval

Writes results.json, answers.jsonl (every answer), accuracy.md, accuracy.png and core_tokens.png to
--out-dir (docs/evaluation by default). --data takes a JSONL file of real data: one
{"image", "question", "answers", "type"} object per line (see vqadata/data.py).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from coreMatching.errors import ConfigError
from coreMatching.static_neurons import CRITERIA
from evaluation.evaluate import EvalConfig
from evaluation.job import OUTPUTS, EvalJob, default_onnx_settings, parse_setting
from models.hub import resolve_model

log = logging.getLogger("evaluate")


def _budget(text: str) -> int | str:
    return text if text == "auto" else int(text)


def main(argv: list[str] | None = None) -> int:
    defaults = EvalConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default=None,
        metavar="DIR|HUB_ID",
        help="a local llava-hf directory or a hub id in the local Hugging Face cache (owner/name[@revision], "
        "never downloaded; default: the embedded model)",
    )
    parser.add_argument("--data", type=Path, default=None, help="JSONL file of real data (default: shapes test split)")
    parser.add_argument("--split", default="test", help="shapes split: test or validation")
    parser.add_argument("--count", type=int, default=1000, help="questions to evaluate")
    parser.add_argument("--budgets", default=",".join(str(b) for b in defaults.budgets))
    parser.add_argument("--methods", default=",".join(defaults.methods), help="token selectors (default: all)")
    parser.add_argument("--merges", default=",".join(defaults.merges), help="merges to run each selector with")
    parser.add_argument("--prune-layer", type=int, default=defaults.prune_layer)
    parser.add_argument("--neuron-ratio", type=float, default=defaults.neuron_ratio)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument(
        "--onnx",
        default=default_onnx_settings(),
        help="settings to build as ONNX and answer with the runtime: dense or SELECTOR[+MERGE]@K, "
        "comma-separated ('none' to skip; default: every selector at 64)",
    )
    parser.add_argument("--onnx-count", type=int, default=None, help="questions for the ONNX runs (default: all)")
    parser.add_argument("--grid", type=int, default=5, help="rows of the core-token picture")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes for the reference answers, each with a copy of the model (default 1)",
    )
    parser.add_argument(
        "--fidelity-count",
        type=int,
        default=100,
        help="questions for the teacher-forced decode fidelity (0 to skip; default 100)",
    )
    parser.add_argument(
        "--weights",
        choices=("fp32", "int8", "int4"),
        default="fp32",
        help="the reference on weights quantized as a build of that precision stores them (default fp32)",
    )
    parser.add_argument("--block-size", type=int, default=32, help="int4's block size (default 32)")
    parser.add_argument(
        "--static-calibration",
        type=int,
        default=0,
        help="also run every pruning setting with a static neuron set counted over this many validation "
        "items (0: per-request neurons only; default 0)",
    )
    parser.add_argument(
        "--static-criterion",
        choices=tuple(CRITERIA),
        default=defaults.static_criterion,
        help="how those static sets rank each layer's neurons: "
        + "; ".join(f"{c.name}: {c.help}" for c in CRITERIA.values())
        + f" (default {defaults.static_criterion})",
    )
    parser.add_argument(
        "--static-width-ratio",
        type=float,
        default=defaults.static_width_ratio,
        help="their neurons per layer, as a multiple of the per-request N, in [1, 4] "
        f"(default {defaults.static_width_ratio:g})",
    )
    parser.add_argument("--out-dir", type=Path, default=Path("docs/evaluation"))
    parser.add_argument("--force", action="store_true", help="replace existing outputs in --out-dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    existing = [args.out_dir / name for name in OUTPUTS if (args.out_dir / name).exists()]
    if existing and not args.force:
        print(f"error: {existing[0]} exists; pass --force to replace the outputs in {args.out_dir}", file=sys.stderr)
        return 2
    try:
        config = EvalConfig(
            budgets=tuple(_budget(b) for b in args.budgets.split(",")),  # type: ignore[arg-type]
            methods=tuple(args.methods.split(",")),
            merges=tuple(args.merges.split(",")),
            prune_layer=args.prune_layer,
            neuron_ratio=args.neuron_ratio,
            max_new_tokens=args.max_new_tokens,
            static_calibration=args.static_calibration,
            static_criterion=args.static_criterion,
            static_width_ratio=args.static_width_ratio,
        )
        onnx = () if args.onnx == "none" else tuple(parse_setting(s) for s in args.onnx.split(","))
        job = EvalJob(
            model_dir=resolve_model(args.model),
            data=args.data,
            split=args.split,
            count=args.count,
            config=config,
            onnx=onnx,
            onnx_count=args.onnx_count,
            grid=args.grid,
            fidelity_count=args.fidelity_count,
            workers=args.workers,
            weights=args.weights,
            block_size=args.block_size,
        )
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from transformers.utils import logging as hf_logging

    from evaluation.job import run_job, write_outputs
    from models import ModelLoadError
    from vqadata.data import DataError

    hf_logging.disable_progress_bar()  # one bar per stage is ours
    columns = (TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        try:
            result, items = run_job(job, progress)
        except (ModelLoadError, DataError, ConfigError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    command = "python scripts/evaluate.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    paths = write_outputs(result, items, args.out_dir, command.strip(), args.grid)
    for s in result.summaries:
        kept = f"{s.mean_kept:6.1f}"
        print(f"{s.setting.label:<28} accuracy {100 * s.accuracy:5.1f}%  kept {kept}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
