"""A seconds-long benchmark on a tiny model: the report's structure, not its speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from export.bench import BenchConfig, Measurement, run_bench
from export.bench_report import build_report, markdown
from models.presets import from_name

REPO = Path(__file__).resolve().parent.parent


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
    assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(report))
    names = [row["name"] for row in report["rows"]]
    assert names == [
        "onnxruntime dense",
        "onnxruntime k8",
        "onnxruntime k4",
        "transformers eager dense",
        "coreMatching reference dense",
        "coreMatching reference k=8",
        "coreMatching reference k=4",
    ]
    for row in report["rows"]:
        for key in ("vision", "prefill", "decode_step", "end_to_end"):
            assert row[key] > 0
        assert row["prefill_flops_ratio"] >= 1.0 and row["decode_bytes_ratio"] >= 1.0
    ort = {row["name"]: row for row in report["rows"] if row["engine"] == "onnxruntime"}
    assert all(
        r["peak_memory_bytes"] > 0 and r["kv_cache_bytes"] > 0 and 0 <= r["python_overhead"] < 1 for r in ort.values()
    )
    assert ort["onnxruntime k4"]["kv_cache_bytes"] < ort["onnxruntime dense"]["kv_cache_bytes"]
    assert [t["target"].split()[0] for t in report["targets"]] == [
        "prefill",
        "decode-step",
        "end",
        "end",
        "Python",
        "peak",
    ]
    assert all(isinstance(t["met"], bool) for t in report["targets"])
    assert report["machine"]["cores"] >= 1 and report["command"].startswith("python -m export bench")
    assert "| onnxruntime k4 | 4 |" in (out / "bench.md").read_text()


def test_bench_and_plan_commands(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "export", "bench", "--budgets", "a,b", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    command = ["plan", "--model", "llava-1.5-7b", "--device", "agx-orin-32gb", "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "export", *command], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["memory"]["dense"]["fits"] is True
    assert plan["memory"]["corematching"]["compacted_ffn"] > 0 == plan["memory"]["dense"]["compacted_ffn"]


def test_device_figures_path_runs_on_the_cpu():
    """The GPU section's code, on the CPU with a tiny model (the GPU run has no machine here)."""
    import torch

    from export.bench import torch_device_figures

    figures = torch_device_figures("tiny-llama-gqa", "cpu", 4, repeats=1, dtype=torch.float32)
    assert [row["name"] for row in figures["rows"]] == ["transformers dense", "coreMatching reference k=4"]
    assert all(row["prefill"] > 0 and row["decode_step"] > 0 for row in figures["rows"])
    assert figures["prompt_tokens"] == 16 + 40 and figures["dtype"] == "float32"


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
    machine = {
        "cpu": "test cpu",
        "cores": 2,
        "memory_bytes": 2**31,
        "system": "test",
        "versions": {"onnxruntime": "1", "torch": "2"},
    }
    report = build_report(
        BenchConfig(preset="tiny", budgets=(64,), repeats=3, new_tokens=4), 576, 50, measurements, machine
    )
    rows = {row["name"]: row for row in report["rows"]}
    k64 = rows["onnxruntime k64"]
    assert k64["prefill_speedup"] == 4.0 and k64["decode_speedup"] == 4.0 and k64["end_to_end_speedup"] == 4.0
    assert k64["prefill_flops_ratio"] == 4.0 and k64["decode_bytes_ratio"] == 2.0
    assert k64["prefill_efficiency"] == 1.0 and k64["decode_efficiency"] == 2.0
    assert k64["end_to_end_vs_transformers"] == 8.0 and rows["transformers eager dense"]["prefill_speedup"] == 0.5
    met = {t["target"]: t["met"] for t in report["targets"]}
    assert met == {
        "prefill speedup >= 0.9 x analytic FLOPs ratio": True,  # 4 >= 3.6
        "decode-step speedup >= 0.85 x ratio of bytes read per step": True,  # 4 >= 1.7
        "end to end >= 3x the dense ONNX build": True,
        "end to end >= 5x transformers eager dense": True,
        "Python overhead < 5% of a decode step": True,
        "peak memory <= 1.3 x the build's weight bytes": False,  # 1400 > 1300
    }
    assert report["command"] == "python -m export bench --preset tiny --budgets 64 --repeats 3 --new-tokens 4"
    text = markdown(report | {"gpu": {"skipped": "no GPU"}})
    assert "| onnxruntime k64 | 64 | 100.0 | 250.0 | 25.0 | 1000.0 | 4.00x (4.00x, 1.00) | 4.00x (2.00x, 2.00) " in text
    assert "| end to end >= 5x transformers eager dense | 8.00x | 5.00x | yes |" in text
    assert "| peak memory <= 1.3 x the build's weight bytes | 0 MB | 0 MB | **no** |" in text
    assert "not measured (no GPU)" in text
