"""Write a split of the shapes dataset as PNG images and a questions.jsonl file.

    python scripts/make_dataset.py --split test --count 200 --out shapes-test

The JSONL file is the format `scripts/evaluate.py --data` reads (image, question, answers, type), so
an exported split can be evaluated like real data, or looked at. Deterministic: example i of a split
is always the same image and question (vqadata/shapes.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vqadata import shapes
from vqadata.data import write_jsonl


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="test", choices=("validation", "test"))
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--start", type=int, default=0, help="index of the first example")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs and questions.jsonl")
    parser.add_argument("--force", action="store_true", help="write into a folder that has a questions.jsonl")
    args = parser.parse_args(argv)
    if args.count < 1 or args.start < 0:
        print("error: --count must be at least 1 and --start at least 0", file=sys.stderr)
        return 2
    if (args.out / "questions.jsonl").exists() and not args.force:
        print(f"error: {args.out / 'questions.jsonl'} exists; pass --force to replace it", file=sys.stderr)
        return 2
    path = write_jsonl(list(shapes.examples(args.split, args.count, args.start)), args.out)
    print(f"wrote {args.count} {args.split} questions to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
