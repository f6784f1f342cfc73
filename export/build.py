"""`python -m export build`: trace, run the passes, validate and write a build directory.

A build is written to a temporary directory next to `--out` and renamed into
place only once it is complete and validated: an error or a failed validation
leaves nothing behind (the validation report goes next to `--out`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

import buildformat
from buildformat import Manifest, Quantization, SkippedValidation, ValidationRecord
from buildformat.geometry import Geometry
from buildformat.names import FFN_WEIGHTS, NEURONS, SELECT, VISION_GRAPH, fused_graph, graph_set
from coreMatching.config import Budgets
from coreMatching.errors import ConfigError
from coreMatching.static_neurons import FILE as STATIC_FILE
from export.bound import BoundPart, bound_parts, bound_values
from export.config import ExportConfig
from export.manifest import graph_info, make_manifest
from export.modules import Decoder, StackPlan, embed_weight, stack_plans
from export.passes import check_tensorrt
from export.passes.membership import TOPK_LIMIT
from export.quantize_graphs import quantize_graphs
from export.select_graph import neurons_graph, select_graph
from export.static import bake
from export.static import record as static_info
from export.trace import save_model, trace_stack, trace_vision
from export.validate import ValidationError, validate_build
from export.validate_quant import validate_quantized_build
from export.weights import share_weights
from models import default_model_dir, load_llava

log = logging.getLogger(__name__)

STAGES = (
    "load",
    "calibrate",
    "trace vision",
    "trace decoder",
    "graph passes",
    "validate",
    "write",
)
# Copied from the checkpoint when present: what the torch-free runtime needs to tokenize and preprocess.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)


class BuildError(RuntimeError):
    """A build cannot be made as asked; the message names the problem and the fix."""


@dataclass
class BuildResult:
    out: Path
    manifest: Manifest
    validation: ValidationRecord | None  # None: built with --no-validate
    seconds: float


def build(config: ExportConfig, on_stage: Callable[[str], None] | None = None) -> BuildResult:
    stage = on_stage or (lambda name: None)
    started = time.perf_counter()
    out = config.out.expanduser().resolve()
    if out.exists() and not config.force:
        raise BuildError(f"{out} already exists; pass --force to replace it, or choose another --out")

    stage("load")
    model_dir = (config.model_dir or default_model_dir()).expanduser().resolve()
    model, processor = load_llava(model_dir)
    geometry = Geometry.from_hf_config(model.config)
    budgets = _budgets(config, geometry)
    _check_limits(config, model, geometry)

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    (tmp / OWNER).write_text(f"{os.getpid()}\n")  # which process builds here: a later build checks it is gone
    try:
        static = None
        if config.static_neurons:
            stage("calibrate")
            assert config.corematching is not None and budgets is not None  # checked by ExportConfig
            cm = config.corematching.with_(neuron_chunks=budgets.neuron_chunks)
            align = config.block_size if config.weights == "int4" else 1  # narrowed rows fill whole int4 blocks
            static, budgets = bake(
                model, processor, cm, budgets, config.calibration, config.calibration_count, align, config.static_recipe
            )
            static.save(tmp / STATIC_FILE)
        dtype = torch.float16 if config.fp16 else torch.float32
        np_dtype = np.float16 if config.fp16 else np.float32
        traced_model = model.to(dtype) if config.fp16 else model
        decoder = Decoder(traced_model).eval()
        stage("trace vision")
        trace_vision(traced_model, geometry, tmp / "vision.onnx", config.opset, dtype)
        stage("trace decoder")
        plans = stack_plans(geometry.num_layers, budgets)
        fused = fused_plans(plans, config, geometry)
        for name, plan in (plans | fused).items():
            embed = embed_weight(traced_model) if plan.embeds else None
            positions = config.max_sequence if plan.fused else 0
            trace_stack(decoder, plan, embed, geometry, budgets, tmp / f"{name}.onnx", config.opset, dtype, positions)
        ffn = {
            i: dict(zip(FFN_WEIGHTS, _ffn_weights(decoder, i), strict=True)) for p in plans.values() for i in p.bound
        }
        quant = config.quant
        bound = bound_values(ffn, geometry, quant, np_dtype)
        del decoder, ffn
        if config.fp16:
            model = model.float()  # the reference runs in fp32

        stage("graph passes")
        seed = config.corematching.seed if config.corematching is not None else 0
        parts = bound_parts(geometry, budgets, quant, np_dtype)
        graphs = _prefill_only_graphs(tmp, geometry, budgets, parts, np_dtype, config.opset, seed)
        quantization = None
        if quant is not None:
            counts = quantize_graphs(tmp, quant, geometry, plans)
            quantize_graphs(tmp, quant, geometry, fused, vision=False)  # the same weights: counted once
            quantization = Quantization(quant.name, quant.block_size if quant.bits == 4 else None, **counts)
        names = graph_set(budgets is None, bool(parts))
        assert set(names) == {VISION_GRAPH, *plans, *graphs}, (names, plans, graphs)
        trt_problems = _tensorrt_problems(tmp, names, budgets, quant is not None and bool(parts))
        weights = share_weights(tmp, [f"{name}.onnx" for name in (*names, *fused)], bound)
        _copy_tokenizer(model_dir, processor, tmp)
        manifest = make_manifest(config, model, processor, model_dir, geometry, budgets, tmp, trt_problems, names)
        manifest = manifest.with_(fused={name: graph_info(tmp, fused_graph(name)) for name in plans if fused})
        files = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name != OWNER)
        static_record = None if static is None else static_info(static)
        manifest = manifest.with_(weights=weights, quantization=quantization, static_neurons=static_record)
        manifest = buildformat.with_files(tmp, manifest, files)
        buildformat.write(tmp, manifest)

        report = None
        if config.validate:
            stage("validate")
            if quant is None:
                report = validate_build(tmp, manifest, model, processor)
            else:
                report = validate_quantized_build(tmp, manifest, model, processor, quant)
            manifest = manifest.with_(validation=report)
            if not report.passed:
                path = out.parent / f"{out.name}.validation-failed.json"
                path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
                failed = "; ".join(f"{c.name}: {', '.join(c.problems)}" for c in report.cases if c.problems)
                raise ValidationError(f"validation failed ({failed}); report: {path}", report)
        else:
            manifest = manifest.with_(validation=SkippedValidation("--no-validate"))
        manifest = manifest.with_(build_seconds=round(time.perf_counter() - started, 1))
        buildformat.write(tmp, manifest)

        stage("write")
        (tmp / OWNER).unlink()
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BuildResult(out=out, manifest=manifest, validation=report, seconds=time.perf_counter() - started)


def fused_plans(plans: dict[str, StackPlan], config: ExportConfig, geometry: Geometry) -> dict[str, StackPlan]:
    """The stacks' ONNX Runtime form (export.fused_ops), by graph name, where the build can have one: not
    when a selector reads the prune layer's attention (the fused kernel does not output it), not for float16
    activations (GPU builds, whose providers read the portable form), and not for heads whose size is not a
    multiple of 16 (GroupQueryAttention's CPU kernel refuses them)."""
    reasons = {
        "float16 activations": config.fp16,
        "a selector reads the attention": any(plan.attention is not None for plan in plans.values()),
        f"head size {geometry.head_dim} is not a multiple of 16": geometry.head_dim % 16 != 0,
    }
    why = [reason for reason, applies in reasons.items() if applies]
    if why:
        log.info("no fused stacks (%s): ONNX Runtime reads the portable form", "; ".join(why))
        return {}
    return {fused_graph(name): dataclasses.replace(plan, fused=True) for name, plan in plans.items()}


def _budgets(config: ExportConfig, geometry: Geometry) -> Budgets | None:
    if config.corematching is None:
        return None
    cm = config.corematching
    if cm.token_budget == "auto" and cm.token_merge != "none":
        raise ConfigError(
            f"--token-budget auto exports without a merge (the merged slots would need a data-dependent count); "
            f"add --token-merge none (the reference runs {cm.token_merge!r} with 'auto')"
        )
    n = math.ceil(cm.neuron_ratio * geometry.intermediate_size)
    if config.tensorrt and cm.neuron_chunks == 1 and n > TOPK_LIMIT:
        # TensorRT's TopK takes K < 3840: select the core neurons per chunk (docs/architecture.md), recorded
        # in the manifest.
        cm = dataclasses.replace(cm, neuron_chunks=math.ceil(n / TOPK_LIMIT))
        log.info("N = %d core neurons is beyond TopK's limit: selecting them in %d chunks", n, cm.neuron_chunks)
    return cm.resolve(
        num_layers=geometry.num_layers,
        intermediate_size=geometry.intermediate_size,
        num_image_tokens=geometry.num_image_tokens,
    )


def _check_limits(config: ExportConfig, model: Any, geometry: Geometry) -> None:
    text = model.config.text_config
    if config.max_prompt_tokens <= geometry.num_image_tokens:
        raise ConfigError(
            f"--max-prompt-tokens {config.max_prompt_tokens} leaves no room for text after the "
            f"{geometry.num_image_tokens} image tokens; raise it"
        )
    limit = getattr(text, "max_position_embeddings", None)
    if limit is not None and config.max_sequence > limit:
        raise ConfigError(f"--max-sequence {config.max_sequence} is beyond the model's {limit} positions; lower it")
    for module in model.model.language_model.layers[0].mlp.modules():
        if getattr(module, "bias", None) is not None:
            raise BuildError("FFN layers with biases are not supported by the export; the reference handles them")
    window = getattr(text, "sliding_window", None) if text.model_type == "mistral" else None
    if window is not None and window < config.max_sequence:
        raise BuildError(
            f"the model attends within a sliding window of {window} tokens, shorter than --max-sequence "
            f"{config.max_sequence}; export with --max-sequence {window} or less"
        )


def _ffn_weights(decoder: Decoder, layer: int) -> tuple[torch.Tensor, ...]:
    mlp = decoder.layers[layer].mlp
    return mlp.gate_t, mlp.up_t, mlp.down_t


def _prefill_only_graphs(
    build: Path,
    geometry: Geometry,
    budgets: Budgets | None,
    parts: list[BoundPart],
    dtype: type,
    opset: int,
    seed: int,
) -> list[str]:
    """Writes the weightless graphs a CoreMatching prefill runs besides the stacks: `select` and, with
    per-request neuron-sparse layers, `neurons`. -> their names"""
    if budgets is None:
        return []
    graphs = {SELECT: select_graph(geometry, budgets, dtype, opset, seed)}
    if parts:
        graphs[NEURONS] = neurons_graph(geometry, budgets, parts, dtype, opset)
    for name, graph in graphs.items():
        model = onnx.shape_inference.infer_shapes(gs.export_onnx(graph), strict_mode=True)
        save_model(model, build / f"{name}.onnx")
    return list(graphs)


def _tensorrt_problems(
    build: Path, names: tuple[str, ...], budgets: Budgets | None, bound_quantized: bool
) -> list[str]:
    """What would stop a TensorRT build of these graphs (the manifest records it; `export engine` refuses)."""
    problems = []
    for name in names:
        problems += [f"{name}: {p}" for p in check_tensorrt(gs.import_onnx(onnx.load(build / f"{name}.onnx")))]
    if bound_quantized:
        problems.append(
            "quantized FFN weights bound per request (TensorRT dequantizes constant weights only): "
            "use --static-neurons or float weights"
        )
    if budgets is not None and budgets.token_budget == "auto":
        problems.append("token_budget 'auto' gives data-dependent shapes (ONNX Runtime only)")
    if budgets is not None and budgets.tokens_per_neuron_set > TOPK_LIMIT:
        problems.append(f"k_tok = {budgets.tokens_per_neuron_set} is above TopK's limit {TOPK_LIMIT}")
    return problems


def _copy_tokenizer(model_dir: Path, processor: Any, out: Path) -> None:
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / name)
    # The tokenizer transformers actually runs: for some checkpoints (Llama's sentencepiece ones)
    # it rebuilds the pipeline from the vocabulary rather than using tokenizer.json as stored, and
    # the runtime must tokenize exactly as the processor that the build was validated with.
    backend = getattr(processor.tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.save(str(out / "tokenizer.json"))
    elif not (out / "tokenizer.json").exists():
        raise BuildError(f"{model_dir} has no fast tokenizer (tokenizer.json); the runtime needs one")
    if not (out / "chat_template.jinja").exists():
        template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
        if not template:
            raise BuildError(f"{model_dir} has no chat template; add chat_template.jinja (the LLaVA-1.5 template)")
        (out / "chat_template.jinja").write_text(template)
    if not (out / "preprocessor_config.json").exists():
        processor.image_processor.to_json_file(out / "preprocessor_config.json")


OWNER = ".owner"  # the pid of the build that writes a .partial directory


def remove_stale_partials(out: Path) -> list[Path]:
    """Removes the `.NAME.*.partial` directories that an interrupted build of `out` left (killed, so its
    cleanup never ran); a directory whose builder is still running is left alone. -> the removed ones"""
    removed = []
    for partial in out.parent.glob(f".{out.name}.*.partial"):
        try:
            pid = int((partial / OWNER).read_text())
        except (OSError, ValueError):
            pid = None  # no owner file: from before owners were recorded, or killed before writing it
        if pid is not None and _alive(pid):
            log.info("%s belongs to build process %d, still running: left alone", partial, pid)
            continue
        shutil.rmtree(partial, ignore_errors=True)
        log.warning("removed %s, left by an interrupted build", partial)
        removed.append(partial)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def replace_dir(tmp: Path, out: Path) -> None:
    """Moves a finished directory into place; an old one (with --force) goes only once the new one is there."""
    if out.exists():
        trash = out.parent / f".{out.name}.old-{int(time.time() * 1000)}"
        out.rename(trash)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)
