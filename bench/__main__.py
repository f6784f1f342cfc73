"""`python -m bench`: latency, FLOPs and memory of CoreMatching builds against dense (bench/measure.py).

With `--llama-cpp DIR` it also times llama.cpp (the tools built in DIR) on the same model, side by side with
the project's builds (bench/peer/, llama-cpp.md); `--peer-only` runs that comparison alone.

A missed target is reported in the report (bench.md, llama-cpp.md), not as the command's exit code; a bad flag
or a missing llama.cpp tool is one `error:` line and exit code 2; llama.cpp failing, or disagreeing with the
PyTorch model, is one `error:` line and exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Build the preset dense and at each budget, then measure ONNX Runtime (CPU), "
        "transformers eager and the PyTorch reference side by side; write docs/benchmarks/.",
    )
    p.add_argument("--preset", default="llava-7b-shape", help="model preset (default llava-7b-shape)")
    p.add_argument("--budgets", default="192,128,64,32", help="comma-separated token budgets")
    p.add_argument("--repeats", type=int, default=5, help="measured repeats after one warm-up (default 5)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated end to end (default 16)")
    p.add_argument("--work", type=Path, default=Path("builds/bench"), help="checkpoint and builds (reused)")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="report directory")
    p.add_argument("--no-torch", action="store_true", help="skip transformers and the PyTorch reference")
    p.add_argument(
        "--llama-cpp",
        type=Path,
        metavar="DIR",
        help="also time llama.cpp on the same model: DIR holds llama-bench, llama-quantize and libllama "
        "(a llama.cpp build's bin directory; docs/benchmarks/llama-cpp.md)",
    )
    p.add_argument(
        "--peer-only", action="store_true", help="with --llama-cpp: run only the llama.cpp comparison, not bench.md's"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log every step")
    return p


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from bench.config import BenchConfig
    from bench.measure import run_bench
    from bench.peer.check import LlamaCppMismatch, ProbeBuildError
    from bench.peer.config import PeerConfig
    from bench.peer.llamacpp import LlamaCppError
    from bench.peer.run import run_peer

    console = Console(stderr=True)
    try:
        if args.peer_only and args.llama_cpp is None:
            raise ValueError("--peer-only needs --llama-cpp DIR")
        peer = None
        if args.llama_cpp is not None:
            peer = PeerConfig(
                llama_cpp=args.llama_cpp, preset=args.preset, repeats=args.repeats, work=args.work, out=args.out
            )
        config = BenchConfig(
            preset=args.preset,
            budgets=tuple(int(k) for k in args.budgets.split(",")),
            repeats=args.repeats,
            new_tokens=args.new_tokens,
            work=args.work,
            out=args.out,
            torch_baselines=not args.no_torch,
        )
        with console.status("benchmark") as status:
            if not args.peer_only:
                run_bench(config, lambda name: status.update(name))
            if peer is not None:
                run_peer(peer, lambda name: status.update(f"llama.cpp comparison: {name}"))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (LlamaCppError, LlamaCppMismatch, ProbeBuildError) as e:
        print(f"error: {e}".replace("\n", " "), file=sys.stderr)
        return 1
    for report, ran in (("bench.md", not args.peer_only), ("llama-cpp.md", peer is not None)):
        if ran:
            print((args.out / report).read_text())
    return 0  # a missed target is reported (bench.md), not an error of the command


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
