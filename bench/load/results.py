"""load.json and load.md: refused up front if they exist, rendered, and written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from bench.load.config import LoadConfig, LoadError
from bench.load.plan import BAD_KINDS
from bench.load.report import LoadReport

OUTPUTS = ("load.json", "load.md")


def check_outputs(config: LoadConfig) -> None:
    """Refuses up front to overwrite results without --force (not after a run of minutes)."""
    existing = [config.out_dir / name for name in OUTPUTS if (config.out_dir / name).exists()]
    if existing and not config.force:
        raise LoadError(f"{', '.join(map(str, existing))} exist; pass --force to overwrite, or another --out-dir")


FIGURE_LABELS = (
    ("planned", "requests planned"),
    ("sent", "requests sent"),
    ("completed", "completed"),
    ("rejected_429", "rejected (429, not retried)"),
    ("refused_as_expected", "bad requests refused as expected"),
    ("failed", "failed"),
    ("disconnected", "disconnected after the first chunk"),
    ("cut_by_time_limit", "cut by --time-limit"),
    ("ttft_p50_ms", "time to first token p50 (ms, client)"),
    ("ttft_p95_ms", "time to first token p95 (ms, client)"),
    ("total_p50_ms", "total latency p50 (ms, client)"),
    ("total_p95_ms", "total latency p95 (ms, client)"),
    ("server_ttft_p50_ms", "time to first token p50 (ms, server)"),
    ("server_ttft_p95_ms", "time to first token p95 (ms, server)"),
    ("rejected_p50_ms", "time to a 429 p50 (ms, client)"),
    ("load_seconds", "load phase (s)"),
    ("answers_per_second", "completed answers per second"),
    ("queue_depth_max", "deepest queue seen (/health)"),
    ("rss_after_reference_mib", "server RSS after the sequential reference pass (MiB)"),
    ("rss_before_mib", "server RSS before the load, after the warm-up (MiB)"),
    ("rss_after_mib", "server RSS after (MiB)"),
    ("rss_diff_mib", "RSS difference (MiB)"),
    ("rss_tolerance_mib", "RSS tolerance (MiB)"),
)


def figure_rows(report: LoadReport) -> list[tuple[str, str]]:
    """(label, value) of the headline figures, for the markdown table and the command's summary."""
    rows = []
    for key, label in FIGURE_LABELS:
        value = report.figures.get(key)
        if key == "failed" and report.figures.get("failed_by_kind"):
            kinds = ", ".join(f"{k}: {n}" for k, n in sorted(report.figures["failed_by_kind"].items()))
            rows.append((label, f"{value} ({kinds})"))
        else:
            rows.append((label, "n/a" if value is None else str(value)))
    return rows


def render_markdown(report: LoadReport, command: str | None) -> str:
    env, fig = report.environment, report.figures
    kinds = ", ".join(f"{k}: {n}" for k, n in sorted(fig["sent_by_kind"].items()))
    lines = [
        "# Load test of the local server",
        "",
        f"Made by `{command or 'run_load(...)'}` on {report.finished_at[:10]}: {report.config.clients} concurrent "
        f"clients, {fig['planned']} requests (seed {report.config.seed}; {kinds}; bad requests cycle through "
        f"{len(BAD_KINDS)} kinds), the server's --max-queue {fig['max_queue'] or 'as started'}, "
        f"max_tokens {report.config.max_tokens}, temperature 0. Server: {report.server['health'].get('backend')} "
        f"on {env['platform']}, {env['cpu_count']} CPUs, Python {env['python']}, onnxruntime {env['onnxruntime']}.",
        "",
        "A 429 counts as rejected and is not retried. Times are measured by the client: to the first content "
        "chunk (non-streamed: to the response) and to the end, over completed answers of the load. RSS is the "
        "server's VmRSS: after the sequential reference pass (each distinct question alone), "
        + (
            f"after {report.config.warmup_rounds} warm-up burst(s) of {report.config.clients} concurrent valid "
            'requests ("before": the first concurrent requests raise the allocator\'s high-water mark once), '
            if report.config.warmup_rounds
            else 'which is "before" (no warm-up burst: --warmup-rounds 0), '
        )
        + "and after the load drained"
        + (' and one more request ("after").' if report.config.final_request else ' ("after").'),
        "",
        "| Figure | Value |",
        "| --- | --- |",
        *(f"| {label} | {value} |" for label, value in figure_rows(report)),
        "",
        "| Check | Passed | Detail |",
        "| --- | --- | --- |",
        *(
            f"| {name} | {'yes' if check.passed else 'no'} | {check.detail.replace('|', '/')} |"
            for name, check in report.checks.items()
        ),
        "",
        f"All checks passed: {'yes' if report.passed else 'no'}. Every request's outcome is in load.json.",
        "",
    ]
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    # A temp file in the same directory, then a rename: a reader never sees half a file.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def write_results(report: LoadReport, command: str | None = None) -> list[Path]:
    """load.json and load.md in --out-dir (refused if they exist, without --force)."""
    out = report.config.out_dir
    check_outputs(report.config)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / OUTPUTS[0], out / OUTPUTS[1]
    _write_atomic(json_path, json.dumps(report.to_json(command), indent=2) + "\n")
    _write_atomic(md_path, render_markdown(report, command))
    return [json_path, md_path]
