"""`python -m export engine BUILD`: the command line of the TensorRT engine builder (torch-free).

`add_engine_parser(subparsers)` registers the subcommand (and sets `func=run_engine` as its default), and
`run_engine(args)` runs it: 0 on success, 2 for what the user must fix (no TensorRT, no GPU, a bad or
TensorRT-incompatible build, bad arguments), 1 when TensorRT itself fails to build an engine.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from buildformat import ManifestError
from export.engine import KNOWN_GRAPHS, EngineBuildError, EngineConfig, EngineError, EngineReport, build_engines
from runtime.gpu import NoGpuError


def _graph_list(text: str) -> tuple[str, ...]:
    return tuple(g.strip() for g in text.split(",") if g.strip())


def add_engine_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "engine",
        help="build TensorRT engines for a build directory, on the GPU that will run them",
        description=(
            "Builds engines/{graph}.plan for each graph of BUILD with TensorRT 8.6 or 10.x and records them in "
            "its manifest. The decoder stacks' engines get a prefill and a decode optimization profile, so one "
            "engine (one copy of the weights) serves both phases. An engine runs only on the GPU model and "
            "TensorRT version that built it: build on the target machine (a Jetson builds its own). Needs no torch."
        ),
    )
    parser.add_argument("build", type=Path, metavar="BUILD", help="build directory made by `python -m export build`")
    parser.add_argument(
        "--fp16",
        action="store_true",
        help="let TensorRT use fp16 kernels (not on Pascal GPUs such as the Titan Xp, where fp16 is slow)",
    )
    parser.add_argument(
        "--workspace", type=int, default=4096, metavar="MB", help="TensorRT workspace limit in MiB (default: 4096)"
    )
    parser.add_argument(
        "--graphs",
        type=_graph_list,
        default=None,
        metavar="LIST",
        help=f"comma-separated graphs to build, of {','.join(KNOWN_GRAPHS)} (default: every graph of the build)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild engines that already exist")
    parser.set_defaults(func=run_engine)
    return parser


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    value = n / 1000
    for unit in ("KB", "MB"):
        if value < 1000:
            return f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def _print_summary(report: EngineReport) -> None:
    rows = [
        (g, str(p.relative_to(report.build_dir)), _size(p.stat().st_size), ",".join(report.profiles.get(g, ())))
        for g, p in report.engines.items()
    ]
    header = ("graph", "engine", "size", "profiles")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print(
        f"TensorRT {report.tensorrt_version} ({report.api} API), {'fp16' if report.fp16 else 'fp32'}, on "
        f"{report.device.name} (SM {report.device.compute_capability}); these engines run only on that GPU model "
        "and TensorRT version"
    )


def _error(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)  # one line, whatever the message holds


def run_engine(args: argparse.Namespace) -> int:
    # Show the per-graph progress where nobody configured logging (a plain `python -m export engine`).
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        config = EngineConfig(
            build_dir=args.build, fp16=args.fp16, workspace_mb=args.workspace, graphs=args.graphs, force=args.force
        )
        report = build_engines(config)
    except EngineBuildError as e:
        _error(str(e))
        for line in e.errors:  # TensorRT's parser messages: what to fix in the graph
            print(f"  {' '.join(line.split())}", file=sys.stderr)
        return 1
    except (ManifestError, EngineError, NoGpuError, ValueError) as e:
        _error(str(e))
        return 2
    except OSError as e:  # disk full, permissions: nothing was half-written, but say what failed
        _error(f"{e.strerror or e} ({e.filename})" if e.filename else str(e))
        return 1
    _print_summary(report)
    return 0
