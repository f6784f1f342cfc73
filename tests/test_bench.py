"""A seconds-long benchmark on a tiny model: the report's structure, not its speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from export.bench import BenchConfig, run_bench
from models.presets import from_name

REPO = Path(__file__).resolve().parent.parent


def test_bench_smoke_writes_a_complete_report(tmp_path):
    preset = from_name("tiny-llama-gqa").replace(
        name="tiny-bench", vocab_size=1024, image_token_id=1023, pad_token_id=3
    )
    out = tmp_path / "report"
    report = run_bench(BenchConfig(preset=preset, budgets=(8, 4), repeats=1, new_tokens=3, work=tmp_path / "work",
                                   out=out, target_budget=4))  # fmt: skip
    assert {p.name for p in out.iterdir()} == {"bench.json", "bench.md", "latency.png", "stages.png"}
    assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(report))
    names = [row["name"] for row in report["rows"]]
    assert names == [
        "onnxruntime dense", "onnxruntime k8", "onnxruntime k4", "transformers eager dense",
        "coreMatching reference dense", "coreMatching reference k=8", "coreMatching reference k=4",
    ]  # fmt: skip
    for row in report["rows"]:
        for key in ("vision", "prefill", "decode_step", "end_to_end"):
            assert row[key] > 0
        assert row["prefill_flops_ratio"] >= 1.0 and row["decode_bytes_ratio"] >= 1.0
    ort = {row["name"]: row for row in report["rows"] if row["engine"] == "onnxruntime"}
    assert all(r["peak_memory_bytes"] > 0 and r["kv_cache_bytes"] > 0 and 0 <= r["python_overhead"] < 1
               for r in ort.values())  # fmt: skip
    assert ort["onnxruntime k4"]["kv_cache_bytes"] < ort["onnxruntime dense"]["kv_cache_bytes"]
    assert [t["target"].split()[0] for t in report["targets"]] == ["prefill", "decode-step", "end", "end", "Python",
                                                                   "peak"]  # fmt: skip
    assert all(isinstance(t["met"], bool) for t in report["targets"])
    assert report["machine"]["cores"] >= 1 and report["command"].startswith("python -m export bench")
    assert "| onnxruntime k4 | 4 |" in (out / "bench.md").read_text()


def test_bench_and_plan_commands(tmp_path):
    done = subprocess.run([sys.executable, "-m", "export", "bench", "--budgets", "a,b", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0 and "Traceback" not in done.stderr
    command = ["plan", "--model", "llava-1.5-7b", "--device", "agx-orin-32gb", "--json"]
    done = subprocess.run([sys.executable, "-m", "export", *command], cwd=REPO, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
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
