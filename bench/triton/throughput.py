"""Throughput of a build on a local Triton server with 1, 2, ... instances, under a bounded concurrent load."""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serving.triton.interface import interface
from serving.triton.local import TritonInstall, local_triton
from serving.triton.repository import ROOT, TritonConfig, write_repository

log = logging.getLogger(__name__)
EXAMPLES = ROOT / "examples"


class ThroughputError(ValueError):
    """A setting of the throughput run is out of range; the message names the flag."""


@dataclass(frozen=True)
class ThroughputConfig:
    build: Path
    triton_python: Path
    instances: tuple[int, ...] = (1, 2)
    requests: int = 32
    concurrency: int = 4
    max_tokens: int = 16

    def __post_init__(self) -> None:
        if not self.instances or min(self.instances) < 1:
            raise ThroughputError(f"--instances must be positive counts, got {self.instances}")
        if self.requests < 1 or self.concurrency < 1:
            raise ThroughputError("--requests and --concurrency must be at least 1")


def _items(config: ThroughputConfig) -> list[dict[str, Any]]:
    pairs = [(EXAMPLES / i["image"], i["question"]) for i in json.loads((EXAMPLES / "questions.json").read_text())]
    return [
        {"image": str(pairs[k % len(pairs)][0]), "question": pairs[k % len(pairs)][1], "max_tokens": config.max_tokens}
        for k in range(config.requests)
    ]


def _ask(install: TritonInstall, grpc: str, items: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    done = subprocess.run(
        [str(install.python), "-m", "bench.triton.client", "--url", grpc, "--concurrency", str(concurrency)],
        input=json.dumps(items),
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the Triton client failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def measure(config: ThroughputConfig) -> list[dict[str, Any]]:
    """One row per instance count: answers/s, latency and time to first token (seconds), answers checked."""
    from runtime import Pipeline

    install = TritonInstall.find(config.triton_python)
    items = _items(config)
    pipeline = Pipeline.load(config.build, provider="cpu")
    expected = {}
    for item in items:
        key = (item["image"], item["question"])
        if key not in expected:
            expected[key] = pipeline.answer(item["image"], item["question"], config.max_tokens).text
    rows = []
    for count in config.instances:
        with tempfile.TemporaryDirectory() as work:
            repo = write_repository(
                TritonConfig(build=config.build, out=Path(work) / "repo", instances=count, provider="cpu", link=True)
            )
            with local_triton(install, repo) as running:
                _ask(install, running.grpc, items[: max(2, count)], max(2, count))  # warm-up: every instance
                run = _ask(install, running.grpc, items, config.concurrency)
        results = run["results"]
        errors = [r["error"] for r in results if r["error"]]
        same = sum(
            r["result"] is not None and r["result"]["answer"] == expected[(i["image"], i["question"])]
            for r, i in zip(results, items, strict=True)
        )
        latency = [r["seconds"] for r in results if not r["error"]]
        first = [r["first_token_seconds"] for r in results if not r["error"]]
        rows.append(
            {
                "instances": count,
                "requests": len(items),
                "concurrency": config.concurrency,
                "errors": len(errors),
                "same_as_runtime": same,
                "seconds": run["seconds"],
                "answers_per_second": len(latency) / run["seconds"],
                "latency_p50": statistics.median(latency),
                "latency_p95": statistics.quantiles(latency, n=20)[-1] if len(latency) > 1 else latency[0],
                "first_token_p50": statistics.median(first),
                "instances_seen": len({r["result"]["instance"] for r in results if r["result"]}),
            }
        )
        log.info("instances %d: %.2f answers/s", count, rows[-1]["answers_per_second"])
    return rows


def render(config: ThroughputConfig, rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# Triton Inference Server",
        "",
        "The model that `python -m serving.triton` writes ([docs/serving.md](../serving.md)): what it takes and "
        "answers, then its throughput.",
        "",
        interface("corematching").strip(),  # the name measure() gives the model
        "",
        "## Throughput",
        "",
        f"Made by `{command}`: the build `{config.build.name}` in a repository of `python -m serving.triton`, "
        f"on the nvidia-pytriton wheel's tritonserver (CPU, ONNX Runtime's CPU provider), {config.requests} "
        f"gRPC-streamed requests over the shipped examples from {config.concurrency} concurrent streams, "
        f"max_tokens {config.max_tokens}, greedy; after a warm-up request per instance.",
        "",
        "| instances | answers/s | latency p50 (s) | latency p95 (s) | first token p50 (s) | instances that answered "
        "| same answer as the runtime | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['instances']} | {r['answers_per_second']:.2f} | {r['latency_p50']:.3f} | {r['latency_p95']:.3f} "
            f"| {r['first_token_p50']:.3f} | {r['instances_seen']} | {r['same_as_runtime']} of {r['requests']} "
            f"| {r['errors']} |"
        )
    if len(rows) > 1:
        lines += [
            "",
            f"Speedup of {rows[-1]['instances']} instances over {rows[0]['instances']}: "
            f"{rows[-1]['answers_per_second'] / rows[0]['answers_per_second']:.2f}x (one run, side by side).",
        ]
    lines += [
        "",
        "```json",
        json.dumps({"config": {k: str(v) for k, v in asdict(config).items()}, "rows": rows}, indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)
