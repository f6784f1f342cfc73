"""A seconds-long benchmark on a tiny model: the report's structure, not its speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.config import BenchConfig
from bench.measure import run_bench
from bench.precisions import PrecisionReport
from bench.precisions import markdown as precisions_markdown
from bench.records import BenchReport, GpuSkipped, Machine, Measurement, Versions
from bench.report import build_report, markdown
from models.presets import from_name

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks"


def _shape(value: object) -> object:
    """The key structure of a JSON value: dicts' keys in order, lists by their first item, leaves by type
    (an int where a float may be is a number either way; null stands for a figure not measured)."""
    if isinstance(value, dict):
        return [(key, _shape(item)) for key, item in value.items()]
    if isinstance(value, list):
        return ["list", _shape(value[0])] if value else ["list"]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return type(value).__name__
    return "number"


def test_bench_smoke_writes_a_complete_report(tmp_path):
    preset = from_name("tiny-llama-gqa").replace(
        name="tiny-bench", vocab_size=1024, image_token_id=1023, pad_token_id=3
    )
    out = tmp_path / "report"
    report = run_bench(
        BenchConfig(
            preset=preset, budgets=(8, 4), repeats=1, new_tokens=3, work=tmp_path / "work", out=out, target_budget=4
        )
    )
    assert {p.name for p in out.iterdir()} == {"bench.json", "bench.md", "latency.png", "stages.png"}
    written = json.loads((out / "bench.json").read_text())
    assert written == json.loads(json.dumps(report.to_json())) and BenchReport.from_json(written) == report
    names = [row.name for row in report.rows]
    assert names == [
        "onnxruntime dense",
        "onnxruntime k8",
        "onnxruntime k4",
        "transformers eager dense",
        "coreMatching reference dense",
        "coreMatching reference k=8",
        "coreMatching reference k=4",
    ]
    for row in report.rows:
        assert row.prefill_flops_ratio >= 1.0 and row.decode_bytes_ratio >= 1.0
    ort = {row.name: row.measurement for row in report.rows if row.measurement.engine == "onnxruntime"}
    assert all(m.peak_memory_bytes and m.kv_cache_bytes and m.samples for m in ort.values())
    assert ort["onnxruntime k4"].kv_cache_bytes < ort["onnxruntime dense"].kv_cache_bytes  # type: ignore[operator]
    assert [t.target.split()[0] for t in report.targets] == [
        "prefill",
        "decode-step",
        "end",
        "end",
        "Python",
        "peak",
    ]
    assert report.machine.cores >= 1 and report.command.startswith("python -m bench")
    assert "| onnxruntime k4 | 4 |" in (out / "bench.md").read_text()
    # The same layout as the published report (docs/benchmarks/bench.json): every key, in order, at every level.
    assert _shape(written) == _shape(json.loads((DOCS / "bench.json").read_text()))


def test_bench_and_plan_commands(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--budgets", "a,b", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    command = ["--model", "llava-1.5-7b", "--device", "agx-orin-32gb", "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "planner", *command], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["memory"]["dense"]["fits"] is True
    assert plan["memory"]["corematching"]["compacted_ffn"] > 0 == plan["memory"]["dense"]["compacted_ffn"]


def test_device_figures_path_runs_on_the_cpu():
    """The GPU section's code, on the CPU with a tiny model (the GPU run has no machine here)."""
    import torch

    from bench.measure import torch_device_figures

    figures = torch_device_figures("tiny-llama-gqa", "cpu", 4, repeats=1, dtype=torch.float32)
    assert [row.name for row in figures.rows] == ["transformers dense", "coreMatching reference k=4"]
    assert figures.prompt_tokens == 16 + 40 and figures.dtype == "float32"
    assert set(figures.to_json()) == {"device", "preset", "dtype", "prompt_tokens", "rows"}


def test_report_from_hand_made_measurements():
    """The report module alone: ratios, efficiencies and targets from given medians (no builds, no runs)."""

    def ort(name: str, kept: int, scale: float, flops: int, nbytes: int, memory: int) -> Measurement:
        return Measurement(
            name,
            "onnxruntime",
            kept,
            vision=0.1,
            prefill=1.0 * scale,
            decode_step=0.1 * scale,
            end_to_end=4.0 * scale,
            python_overhead=0.02,
            peak_memory_bytes=memory,
            weight_bytes=1000,
            kv_cache_bytes=2**20,
            prefill_flops=flops,
            decode_flops=flops // 10,
            decode_bytes=nbytes,
        )

    hf = Measurement(
        "transformers eager dense",
        "transformers",
        576,
        vision=0.2,
        prefill=2.0,
        decode_step=0.2,
        end_to_end=8.0,
        prefill_flops=800,
        decode_flops=80,
        decode_bytes=400,
    )
    measurements = [
        ort("onnxruntime dense", 576, 1.0, 800, 400, 1200),
        ort("onnxruntime k64", 64, 0.25, 200, 200, 1400),  # 4x faster, 4x fewer FLOPs, 2x fewer bytes
        hf,
    ]
    machine = Machine("test cpu", 2, 2**31, "3.12", "test", Versions("1", "2", "3", "4"))
    config = BenchConfig(preset="tiny", budgets=(64,), repeats=3, new_tokens=4)
    report = build_report(config, 576, 50, measurements, machine, GpuSkipped("no GPU"))
    rows = report.by_name
    k64 = rows["onnxruntime k64"]
    assert k64.prefill_speedup == 4.0 and k64.decode_speedup == 4.0 and k64.end_to_end_speedup == 4.0
    assert k64.prefill_flops_ratio == 4.0 and k64.decode_bytes_ratio == 2.0
    assert k64.prefill_efficiency == 1.0 and k64.decode_efficiency == 2.0
    assert k64.end_to_end_vs_transformers == 8.0 and rows["transformers eager dense"].prefill_speedup == 0.5
    met = {t.target: t.met for t in report.targets}
    assert met == {
        "prefill speedup >= 0.9 x analytic FLOPs ratio": True,  # 4 >= 3.6
        "decode-step speedup >= 0.85 x ratio of bytes read per step": True,  # 4 >= 1.7
        "end to end >= 3x the dense ONNX build": True,
        "end to end >= 5x transformers eager dense": True,
        "Python overhead < 5% of a decode step": True,
        "peak memory <= 1.3 x the build's weight bytes": False,  # 1400 > 1300
    }
    assert report.command == "python -m bench --preset tiny --budgets 64 --repeats 3 --new-tokens 4"
    text = markdown(report)
    assert "| onnxruntime k64 | 64 | 100.0 | 250.0 | 25.0 | 1000.0 | 4.00x (4.00x, 1.00) | 4.00x (2.00x, 2.00) " in text
    assert "| end to end >= 5x transformers eager dense | 8.00x | 5.00x | yes |" in text
    assert "| peak memory <= 1.3 x the build's weight bytes | 0 MB | 0 MB | **no** |" in text
    assert "not measured (no GPU)" in text
    assert BenchReport.from_json(json.loads(json.dumps(report.to_json()))) == report


def test_records_check_what_they_are_given():
    with pytest.raises(ValueError, match="engine"):
        Measurement("x", "tensorflow", 64, vision=0.1, prefill=0.1, decode_step=0.1, end_to_end=0.1)
    with pytest.raises(ValueError, match="prefill"):
        Measurement("x", "onnxruntime", 64, vision=0.1, prefill=0.0, decode_step=0.1, end_to_end=0.1)
    with pytest.raises(ValueError, match="python_overhead"):
        Measurement("x", "onnxruntime", 64, vision=0.1, prefill=0.1, decode_step=0.1, end_to_end=0.1, python_overhead=2)


@pytest.mark.parametrize("name", ["bench", "precisions"])
def test_published_reports_round_trip_and_render_as_published(name):
    """docs/benchmarks/{bench,precisions}.json read into the records and written back unchanged, and rendered
    as the published markdown (precisions.md goes on with a hand-written analysis after the table)."""
    data = json.loads((DOCS / f"{name}.json").read_text())
    published = (DOCS / f"{name}.md").read_text()
    if name == "bench":
        report = BenchReport.from_json(data)
        # The published bench.json predates the move from `python -m export bench`; bench.md names the new command.
        rendered = markdown(report).replace("python -m export bench", "python -m bench")
        assert rendered == published
    else:
        report = PrecisionReport.from_json(data)
        assert published.startswith(precisions_markdown(report))
    assert report.to_json() == data


@pytest.mark.parametrize(("old", "new"), [("plan", "planner"), ("bench", "bench"), ("triton", "serving.triton")])
def test_moved_export_commands_name_their_new_spelling(old, new, capsys):
    from export.__main__ import main

    assert main([old, "--help"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"python -m {new}" in err


def test_the_old_server_command_names_the_new_one():
    done = subprocess.run(
        [sys.executable, "-m", "runtime.serve", "--build", "x"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "python -m serving" in done.stderr
