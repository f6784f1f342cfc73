"""What export records about a build: the typed `buildformat.Manifest`, made from the model and the config.

The format itself (fields, reading, writing, checking) lives in `buildformat`, which the torch-free
runtime reads; this module only fills it in from the traced model (docs/build-format.md).
"""

from __future__ import annotations

import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx

from buildformat import (
    CoreMatchingInfo,
    Dim,
    Flops,
    GraphInfo,
    Manifest,
    ModelInfo,
    TensorSpec,
    TokenizerInfo,
)
from buildformat.geometry import Geometry
from coreMatching.config import Budgets
from coreMatching.flops import FlopsComparison, compare, decode_flops, prefill_flops
from export.config import ExportConfig
from export.weights import WEIGHTS
from models import default_model_dir
from models.answer import build_prompt
from models.hub import hub_source

# The text of a typical question, for the FLOPs figures of the summary.
QUESTION_TOKENS = 40


class PromptFormatError(ValueError):
    """The checkpoint's chat template does not render one question and one image token."""


def model_source(model_dir: Path) -> str:
    """The manifest's `model.source`: "embedded default", owner/name@commit for a snapshot of the Hugging Face
    cache (the checkpoint's name on any machine, where the snapshot's path is this machine's), else the path."""
    if model_dir == default_model_dir().resolve():
        return "embedded default"
    return hub_source(model_dir) or str(model_dir)


def make_manifest(
    config: ExportConfig,
    model: Any,
    processor: Any,
    model_dir: Path,
    geometry: Geometry,
    budgets: Budgets | None,
    build: Path,
    trt_problems: list[str],
    graphs: tuple[str, ...],
) -> Manifest:
    """The manifest of a build whose graphs are in `build` (files, weights and validation are added later)."""
    text = model.config.text_config
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None) or text.eos_token_id
    flops = flops_summary(geometry, budgets)
    prompt_format, image_token = prompt_template(processor)
    prompt = geometry.num_image_tokens + QUESTION_TOKENS
    return Manifest(
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        model=ModelInfo(
            source=model_source(model_dir),
            text_model_type=text.model_type,
            hidden_size=geometry.hidden_size,
            intermediate_size=geometry.intermediate_size,
            num_layers=geometry.num_layers,
            num_heads=geometry.num_heads,
            num_kv_heads=geometry.num_kv_heads,
            head_dim=geometry.head_dim,
            vocab_size=geometry.vocab_size,
            image_size=geometry.image_size,
            patch_size=geometry.patch_size,
            num_image_tokens=geometry.num_image_tokens,
            image_token_id=model.config.image_token_id,
            bos_token_id=text.bos_token_id,
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=text.pad_token_id,
        ),
        precision="float16" if config.fp16 else "float32",
        opset=config.opset,
        corematching=corematching_info(budgets, config),
        dims=prefill_dims(config, geometry, budgets),
        decode_dims=decode_dims(config, geometry, budgets),
        graphs={name: graph_info(build, name) for name in graphs},
        tensorrt_compatible=not trt_problems,
        tensorrt_reason="; ".join(trt_problems),
        tokenizer=TokenizerInfo(
            tokenizer="tokenizer.json",
            chat_template="chat_template.jinja",
            preprocessor="preprocessor_config.json",
            prompt=prompt_format,
            image_token=image_token,
        ),
        flops=Flops(
            prompt_tokens=prompt,
            prefill_dense=prefill_flops(geometry, prompt, None),
            decode_dense=decode_flops(geometry, prompt, None),
            prefill_corematching=flops.prefill_corematching if flops else None,
            decode_corematching=flops.decode_corematching if flops else None,
        ),
        versions=versions(),
    )


def corematching_info(budgets: Budgets | None, config: ExportConfig) -> CoreMatchingInfo | None:
    if budgets is None:
        return None
    cm = config.corematching
    assert cm is not None
    return CoreMatchingInfo(
        token_budget=budgets.token_budget,
        token_ratio=cm.token_ratio,
        neuron_ratio=cm.neuron_ratio,
        prune_layer=budgets.prune_layer,
        neuron_layers=tuple(budgets.neuron_layers),
        tokens_per_neuron_set=budgets.tokens_per_neuron_set,
        core_neurons=budgets.core_neurons,
        neuron_chunks=budgets.neuron_chunks,
        auto_range=tuple(budgets.auto_range),
        token_selector=budgets.token_selector,
        token_merge=budgets.token_merge,
        seed=cm.seed,
    )


def graph_info(build: Path, name: str) -> GraphInfo:
    """The inputs and outputs of one traced graph, as its ONNX file declares them."""
    model = onnx.load(build / f"{name}.onnx", load_external_data=False)

    def describe(values: Any) -> tuple[TensorSpec, ...]:
        return tuple(
            TensorSpec(
                name=v.name,
                dtype=onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                shape=tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim),
            )
            for v in values
        )

    return GraphInfo(
        file=f"{name}.onnx",
        external_data=WEIGHTS,  # every graph's weights, stored once (export/weights.py)
        inputs=describe(model.graph.input),
        outputs=describe(model.graph.output),
    )


def prefill_dims(config: ExportConfig, geometry: Geometry, budgets: Budgets | None) -> dict[str, Dim]:
    """min/opt/max of every dynamic dimension in prefill (every graph's; the stacks' first TensorRT profile).

    S: the prompt. S_kept: the tokens after the prune layer. B / B_kept: the stacks' past buffers, one masked
    slot in prefill. W: a bound FFN weight's width, every neuron in prefill.
    """
    n_img = geometry.num_image_tokens
    prompt = Dim(n_img + 1, n_img + QUESTION_TOKENS, config.max_prompt_tokens)
    out = {"S": prompt, "B": Dim(1, 1, 1)}
    if budgets is not None:
        lo, hi = _kept_image_slots(budgets)
        out["S_kept"] = Dim(prompt.min - n_img + lo, prompt.opt - n_img + hi, prompt.max - n_img + hi)
        out["B_kept"] = Dim(1, 1, 1)
        if budgets.neuron_sparse_layers:
            width = geometry.intermediate_size
            out["W"] = Dim(width, width, width)
    return out


def decode_dims(config: ExportConfig, geometry: Geometry, budgets: Budgets | None) -> dict[str, Dim]:
    """min/opt/max of the stacks' dynamic dimensions in decode (their second TensorRT profile; the runtime's
    limits): one new token; B / B_kept: the cache buffers of the full / pruned layers, which hold up to
    max_sequence - 1 tokens before the last one; W: the request's core neurons."""
    n_img = geometry.num_image_tokens
    cache = Dim(n_img + 1, n_img + QUESTION_TOKENS + 32, config.max_sequence - 1)
    out = {"S": Dim(1, 1, 1), "B": cache}
    if budgets is not None:
        lo, hi = _kept_image_slots(budgets)
        out["S_kept"] = Dim(1, 1, 1)
        out["B_kept"] = Dim(1 + lo, cache.opt - n_img + hi, cache.max - n_img + hi)
        if budgets.neuron_sparse_layers:
            out["W"] = Dim(budgets.core_neurons, budgets.core_neurons, budgets.core_neurons)
    return out


def _kept_image_slots(budgets: Budgets) -> tuple[int, int]:
    """The fewest and most image slots the pruned layers cache (a summary token is cached too)."""
    lo, hi = budgets.auto_range if budgets.token_budget == "auto" else (budgets.token_budget,) * 2
    return lo + budgets.merged_tokens, hi + budgets.merged_tokens


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    packages = ("corematching-edge", "torch", "transformers", "onnx", "onnxruntime", "onnx-graphsurgeon", "onnxscript")
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def flops_summary(geometry: Geometry, budgets: Budgets | None) -> FlopsComparison | None:
    """Analytic FLOPs dense vs CoreMatching for a typical prompt (static budgets only)."""
    if budgets is None or budgets.token_budget == "auto":
        return None
    return compare(geometry, geometry.num_image_tokens + QUESTION_TOKENS, [budgets])[0]


def prompt_template(processor: Any) -> tuple[str, str]:
    """(prompt with a `{question}` marker, image token) from the checkpoint's chat template."""
    prompt = build_prompt(processor, "{question}")
    image_token = getattr(processor, "image_token", "<image>")
    if prompt.count("{question}") != 1 or prompt.count(image_token) != 1:
        raise PromptFormatError(f"the chat template renders {prompt!r}: expected one question and one {image_token}")
    return prompt, image_token
