"""llava-1.5-7b's figures by hand, and the planner's command, shared by the planner's tests."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from planner.cli import build_parser, run_plan

GIB = 2**30
ROOT = Path(__file__).resolve().parents[1]

# llava-1.5-7b: CLIP ViT-L/14 at 336 px + a 2-layer projector + Vicuna-7B (vocabulary 32064).
L, D_MODEL, D_FFN, HEADS, HEAD_DIM, VOCAB, N_IMG = 32, 4096, 11008, 32, 128, 32064, 576
VISION = (
    1024
    + 3 * 14 * 14 * 1024
    + 577 * 1024  # class embedding, patch conv, positions
    + 2 * 2 * 1024  # pre and post layer norms
    + 24 * (4 * (1024 * 1024 + 1024) + 2 * 2 * 1024 + (1024 * 4096 + 4096) + (4096 * 1024 + 1024))
)
PROJECTOR = 1024 * 4096 + 4096 + 4096 * 4096 + 4096
LAYER = 4 * D_MODEL * D_MODEL + 3 * D_MODEL * D_FFN + 2 * D_MODEL  # q k v o, gate up down, two norms
PARAMS_7B = VISION + PROJECTOR + VOCAB * D_MODEL + L * LAYER + D_MODEL + VOCAB * D_MODEL
N_CORE = math.ceil(0.4 * D_FFN)  # 4404
SPARSE_LAYERS = 21  # layers 6..26 of 32
PRUNE_LAYER = 2
# Expected fits of dense llava-1.5-7b at fp16 (weights alone are 13.2 GiB).
FITS_7B_FP16 = {
    "titan-xp": False,
    "orin-nano-8gb": False,
    "orin-nx-16gb": False,
    "agx-orin-32gb": True,
    "agx-orin-64gb": True,
}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = run_plan(build_parser().parse_args(list(argv)))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def kv_bytes(layers: int, tokens: int, kv_heads: int = HEADS, value_bytes: int = 2) -> int:
    return layers * 2 * kv_heads * HEAD_DIM * tokens * value_bytes
