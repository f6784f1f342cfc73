"""The results of a run (load.*, soak.* or kill.* by mode): refused up front if they exist, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

from bench.load.config import LoadConfig, LoadError
from bench.load.report import Check, figure_rows, render_markdown

__all__ = ["Report", "check_outputs", "figure_rows", "render_markdown", "write_results"]


class Report(Protocol):
    """What every mode's report offers its writer and the command's summary."""

    config: LoadConfig
    checks: dict[str, Check]

    @property
    def passed(self) -> bool: ...

    def summary_rows(self) -> list[tuple[str, str]]: ...

    def markdown(self, command: str | None = None) -> str: ...

    def to_json(self, command: str | None = None) -> dict[str, Any]: ...


def check_outputs(config: LoadConfig) -> None:
    """Refuses up front to overwrite results without --force (not after a run of minutes)."""
    existing = [config.out_dir / name for name in config.outputs if (config.out_dir / name).exists()]
    if existing and not config.force:
        raise LoadError(f"{', '.join(map(str, existing))} exist; pass --force to overwrite, or another --out-dir")


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


def write_results(report: Report, command: str | None = None) -> list[Path]:
    """The mode's .json and .md in --out-dir (refused if they exist, without --force)."""
    out = report.config.out_dir
    check_outputs(report.config)
    out.mkdir(parents=True, exist_ok=True)
    json_name, md_name = report.config.outputs
    json_path, md_path = out / json_name, out / md_name
    _write_atomic(json_path, json.dumps(report.to_json(command), indent=2) + "\n")
    _write_atomic(md_path, report.markdown(command))
    return [json_path, md_path]
