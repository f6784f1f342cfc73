"""`python -m serving.triton BUILD --out REPO`: the flags, the config, one call (torch-free)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from buildformat import ManifestError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving.triton",
        description="Write a Triton model repository: one decoupled Python-backend model that runs the "
        "runtime pipeline on the build (tokens stream), with its config.pbtxt and a README.",
    )
    p.add_argument("build", type=Path, help="the build directory")
    p.add_argument("--out", type=Path, required=True, help="the model repository to write")
    p.add_argument("--instances", type=int, default=1, help="model instances (pipelines) Triton runs (default 1)")
    p.add_argument("--max-batch", type=int, default=1, help="requests per execution: 1 (the graphs are batch 1)")
    p.add_argument("--name", default="corematching", help="the model's name in the repository")
    p.add_argument("--provider", default="auto", help="the pipeline's provider: auto, tensorrt, cuda or cpu")
    p.add_argument("--link", action="store_true", help="symlink the build instead of copying it")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("-v", "--verbose", action="store_true", help="log every step")
    return p


def run_triton(args: argparse.Namespace) -> int:
    from serving.triton import TritonConfig, TritonConfigError, write_repository

    try:
        config = TritonConfig(
            build=args.build,
            out=args.out,
            instances=args.instances,
            max_batch=args.max_batch,
            name=args.name,
            provider=args.provider,
            link=args.link,
            force=args.force,
        )
        out = write_repository(config)
    except (TritonConfigError, ManifestError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote the Triton model repository {out} (model {config.name!r}, {config.instances} instance(s))")
    print(f"start it: tritonserver --model-repository {out}   (see {out / 'README.md'})")
    return 0
