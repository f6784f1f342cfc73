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
