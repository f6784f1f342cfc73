"""One evaluation run end to end: load the model, answer every item, build and run ONNX graphs, report.

`scripts/evaluate.py` parses its flags into an `EvalJob` and calls `run_job` then `write_outputs`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coreMatching.errors import ConfigError
from evaluation.evaluate import EvalConfig, EvalResult, Setting, evaluate_build, evaluate_reference, summarise
from evaluation.parallel import reference_records
from vqadata.data import Item, jsonl_items, shapes_items

log = logging.getLogger(__name__)

OUTPUTS = ("results.json", "answers.jsonl", "accuracy.md", "accuracy.png", "core_tokens.png")

# progress(stage, done, total)
Progress = Callable[[str, int, int], None]


def parse_setting(text: str) -> Setting:
    """'dense', or 'SELECTOR[+MERGE]@K' (K an integer or 'auto'): what an ONNX build can deploy."""
    from coreMatching.selectors import MERGES, SELECTORS

    if text == "dense":
        return Setting("dense", 0, backend="onnx")
    name, _, budget = text.partition("@")
    method, _, merge = name.partition("+")
    usage = (
        f"use 'dense' or 'SELECTOR[+MERGE]@K' (SELECTOR one of {', '.join(SELECTORS)}; MERGE one of "
        f"{', '.join(m for m in MERGES if m != 'none')}; K an integer or 'auto')"
    )
    if method not in SELECTORS or not budget or (merge and merge not in MERGES):
        raise ConfigError(f"ONNX setting {text!r}: {usage}")
    merge = merge or "none"
    if budget == "auto":
        return Setting(method, "auto", backend="onnx", merge=merge)
    try:
        return Setting(method, int(budget), backend="onnx", merge=merge)
    except ValueError:
        raise ConfigError(f"ONNX setting {text!r}: the budget must be an integer or 'auto'") from None


def default_onnx_settings() -> str:
    """dense, every selector at k = 64 with the default merge, and the default selector without it."""
    from coreMatching.selectors import DEFAULT_MERGE, DEFAULT_SELECTOR, SELECTORS

    names = [f"{name}+{DEFAULT_MERGE}@64" for name in SELECTORS]
    return ",".join(["dense", *names, f"{DEFAULT_SELECTOR}@64"])


@dataclass(frozen=True)
class EvalJob:
    model_dir: Path | None = None  # None: the embedded default model
    data: Path | None = None  # a JSONL file; None: the shapes test split
    split: str = "test"
    count: int = 1000
    config: EvalConfig = field(default_factory=EvalConfig)
    onnx: tuple[Setting, ...] = ()  # settings to build and answer with the runtime
    onnx_count: int | None = None  # items for the ONNX runs (None: all)
    grid: int = 5  # rows of the core-token picture (shapes data only)
    fidelity_count: int = 100  # questions of the teacher-forced decode-fidelity figures (0: none)
    workers: int = 1  # processes answering the reference settings (each holds a copy of the model)
    weights: str = "fp32"  # "int8"/"int4": the reference on quantized-then-dequantized weights
    block_size: int = 32  # int4's block

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, got {self.workers}")
        if self.count < 1:
            raise ConfigError(f"count must be at least 1, got {self.count}")
        if self.fidelity_count < 0:
            raise ConfigError(f"fidelity_count must be 0 or more, got {self.fidelity_count}")
        if self.onnx_count is not None and self.onnx_count < 1:
            raise ConfigError(f"onnx_count must be at least 1, got {self.onnx_count}")

    def items(self) -> list[Item]:
        if self.data is not None:
            return jsonl_items(self.data, self.count)
        return list(shapes_items(self.split, self.count))

    def describe_data(self) -> str:
        return f"`{self.data.name}`" if self.data is not None else f"shapes dataset, {self.split} split"


def load_model(job: EvalJob) -> tuple[Any, Any]:
    """The job's model and processor, its weights fake-quantized as a build of `job.weights` stores them
    (coreMatching.quant: the neuron-sparse layers' down projections blocked along their output axis)."""
    from coreMatching.quant import down_projections, fake_quantize_
    from coreMatching.quant_scheme import WeightQuant
    from models import default_model_dir, load_llava
    from models.loading import num_image_tokens

    model, processor = load_llava(job.model_dir or default_model_dir())
    quant = WeightQuant.from_name(job.weights, job.block_size)
    if quant is not None:
        import torch

        text, n_img = model.config.text_config, num_image_tokens(model.config)
        budgets = job.config.corematching(Setting("core-coverage", 64), n_img).resolve(
            num_layers=text.num_hidden_layers, intermediate_size=text.intermediate_size, num_image_tokens=n_img
        )
        fake_quantize_(model, quant, torch.float32, down_projections(frozenset(budgets.neuron_sparse_layers)))
    return model, processor


def run_job(job: EvalJob, progress: Progress | None = None) -> tuple[EvalResult, list[Item]]:
    from models import default_model_dir
    from models.loading import num_image_tokens

    model_dir = job.model_dir or default_model_dir()
    model, processor = load_model(job)
    items = job.items()
    n_img = num_image_tokens(model.config)

    def report(stage: str, total: int) -> Callable[[int], None]:
        return lambda done: progress(stage, done, total) if progress else None

    if job.workers > 1:
        settings = job.config.settings(n_img)
        records = reference_records(load_model, job, len(items), job.workers, report("reference", len(items)))
    else:
        settings, records = evaluate_reference(model, processor, items, job.config, report("reference", len(items)))
    onnx_items = items[: job.onnx_count] if job.onnx_count else items
    for setting in job.onnx:
        setting = Setting("dense", n_img, "onnx") if setting.method == "dense" else setting
        records += _run_onnx(model_dir, setting, onnx_items, job.config, n_img, report(setting.label, len(onnx_items)))
        settings.append(setting)
    fidelity = []
    if job.fidelity_count:
        from evaluation.fidelity import FidelityConfig, decode_fidelity

        probe = items[: job.fidelity_count]
        fidelity = decode_fidelity(
            model,
            processor,
            probe,
            FidelityConfig(prune_layer=job.config.prune_layer),
            report("decode fidelity", len(probe)),
        )
    name = "embedded default (models/default)" if job.model_dir is None else str(job.model_dir)
    vision = model.config.vision_config
    geometry = (vision.image_size, vision.patch_size, n_img)
    result = EvalResult(name, job.describe_data(), job.config, settings, records, geometry=geometry, fidelity=fidelity)
    result.summaries = summarise(settings, records)
    return result, items


def _run_onnx(
    model_dir: Path,
    setting: Setting,
    items: list[Item],
    config: EvalConfig,
    n_img: int,
    on_item: Callable[[int], None],
) -> list:
    """Builds (and validates) the graphs of one setting in a temporary folder and answers every item."""
    from export.build import build
    from export.config import ExportConfig

    corematching = None if setting.method == "dense" else config.corematching(setting, n_img)
    tmp = Path(tempfile.mkdtemp(prefix="eval-build-"))
    try:
        log.info("building %s", setting.label)
        build(ExportConfig(out=tmp / "build", model_dir=model_dir, corematching=corematching))
        return evaluate_build(tmp / "build", setting, items, config.max_new_tokens, on_item)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_outputs(result: EvalResult, items: list[Item], out_dir: Path, command: str, grid: int) -> list[Path]:
    from evaluation import report

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / name for name in OUTPUTS]
    report.write_json(result, paths[0])
    report.write_records(result.records, paths[1])
    paths[2].write_text(report.markdown(result, command), encoding="utf-8")
    report.plot_accuracy(result, paths[3])
    pictured = items[:grid]
    if pictured:
        size, patch, n_img = result.geometry
        report.plot_core_tokens(result, pictured, paths[4], image_size=size, patch_size=patch, num_image_tokens=n_img)
    else:
        paths.pop()
    return paths
