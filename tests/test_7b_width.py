"""The 7B geometry end to end (scripts/bench_7b_width.py): a CoreMatching int4 build (static neurons) at
llava-1.5-7b's widths, validated, answered by the runtime, its peak memory within 10% of the planner's.
Heavy: `pytest -m heavy`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))


@pytest.mark.heavy
def test_7b_width_int4_build_validates_answers_and_matches_the_plan(tmp_path):
    import bench_7b_width

    argv = ["--work", str(tmp_path / "work"), "--builds", "cm-int4-static", "--out", str(tmp_path)]
    assert bench_7b_width.main(argv) == 0
    (row,) = json.loads((tmp_path / "7b-width.json").read_text())["rows"]
    assert row["validated"]
    assert row["measured"]["kept"] == 64 and len(row["measured"]["tokens"]) == 8
    assert 0.9 <= row["peak_vs_plan"] <= 1.1, row


def test_the_planner_figures_keep_the_published_layout():
    """The planner's figure the script writes beside each measured row (`asdict(Estimate)`), key for key against
    the published docs/benchmarks/7b-width.json."""
    from dataclasses import asdict

    from planner.plan import plan_build

    planned = asdict(plan_build("llava-7b-width", weights="int4", activations="fp16", neurons="per-request"))
    (published, *_) = json.loads((REPO / "docs" / "benchmarks" / "7b-width.json").read_text())["rows"]
    assert list(planned) == list(published["planned"])
    assert list(planned["weights_by_part"]) == list(published["planned"]["weights_by_part"])
