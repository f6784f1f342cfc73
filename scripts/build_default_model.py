"""Rebuild the embedded default model directory (models/default).

    python scripts/build_default_model.py [--out models/default] [--seed 0] [--force]

The model is written to a temporary directory next to --out and renamed into
place at the end, so an interrupted build never leaves a half-written model.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

# Run from a checkout without installing: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.default_model import build_default_model

logger = logging.getLogger("build_default_model")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/default"), help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the random weights")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one log line is enough for a 3 MB model

    out: Path = args.out
    if out.exists() and not args.force:
        parser.error(f"{out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build_default_model(tmp, seed=args.seed)
        # mkdtemp makes the directory private (0700) and safetensors writes 0600 files;
        # the model is package data that every user of the checkout must be able to read.
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            # Move the old one aside first: the rename below needs the name free.
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    logger.info("wrote %s (%.1f MB)", out, size / 1e6)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
