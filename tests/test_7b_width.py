"""The 7B geometry end to end (scripts/bench_7b_width.py): a CoreMatching int4 build at llava-1.5-7b's widths,
validated, answered by the runtime, its peak memory within 10% of the planner's. Heavy: `pytest -m heavy`."""

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

    assert bench_7b_width.main(["--work", str(tmp_path / "work"), "--builds", "cm-int4", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "7b-width.json").read_text())["rows"]
    assert row["validated"]
    assert row["measured"]["kept"] == 64 and len(row["measured"]["tokens"]) == 8
    assert 0.9 <= row["peak_vs_plan"] <= 1.1, row


def test_7b_width_row_keeps_the_published_layout():
    """A row as the script writes it (no build: a planned figure and a hand-made answer), against the published
    docs/benchmarks/7b-width.json: the planner's figures key for key, and every measured figure it shows."""
    import bench_7b_width

    from planner.plan import plan_build

    planned = plan_build("llava-7b-width", weights="int4", activations="fp16", neurons="per-request")
    measured = bench_7b_width.Answered(1.0, (5, 6), 64, 589, 2.0, 0.25, planned.total // 2)
    row = bench_7b_width.WidthRow("cm-int4", 12.5, True, 2**30, measured, planned).to_json()
    assert json.loads(json.dumps(row)) == row and row["peak_vs_plan"] == measured.peak_bytes / planned.total
    (published, *_) = json.loads((REPO / "docs" / "benchmarks" / "7b-width.json").read_text())["rows"]
    assert list(row["planned"]) == list(published["planned"])
    assert list(row["planned"]["weights_by_part"]) == list(published["planned"]["weights_by_part"])
    assert set(published["measured"]) <= set(row["measured"])
    assert {"build", "validated", "weights_file_bytes", "peak_vs_plan"} <= set(published) & set(row)
