"""Tracing the four graphs with torch's dynamo ONNX exporter (docs/architecture.md).

Every graph gets explicit input and output names, and every sequence length
stays dynamic: `S` (prompt), `S_kept` (prompt after pruning), `P` and
`P_kept` (cached tokens of the full and of the pruned layers in decode).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch

from coreMatching.config import Budgets
from coreMatching.flops import DecoderGeometry
from export.modules import Decode, Decoder, Embed, Prefill, Vision

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Geometry:
    """The static sizes of a LLaVA model that the graphs are shaped by."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    image_size: int
    num_image_tokens: int

    @classmethod
    def of(cls, llava: Any) -> Geometry:
        from models import num_image_tokens

        text, vision = llava.config.text_config, llava.config.vision_config
        return cls(
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_layers=text.num_hidden_layers,
            num_heads=text.num_attention_heads,
            num_kv_heads=text.num_key_value_heads or text.num_attention_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            vocab_size=text.vocab_size,
            image_size=vision.image_size,
            num_image_tokens=num_image_tokens(llava.config),
        )

    def decoder(self) -> DecoderGeometry:
        """The decoder's geometry for the analytic FLOPs."""
        return DecoderGeometry(self.hidden_size, self.intermediate_size, self.num_layers, self.num_heads,
                               self.num_kv_heads, self.head_dim, self.vocab_size)  # fmt: skip




def _export(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    path: Path,
    inputs: list[str],
    outputs: list[str],
    dynamic: tuple[Any, ...],
    opset: int,
) -> None:
    # The exporter reports its progress on stdout and warns about torchvision ops it skips:
    # keep both out of the user's terminal (they go to the debug log).
    buffer = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(buffer), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(),
            args,
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes=dynamic,
            opset_version=opset,
            dynamo=True,
            external_data=False,
            optimize=True,
            verbose=False,
        )
    log.debug("exporter output for %s:\n%s", path.name, buffer.getvalue())
    model = program.model_proto
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, path)


# protobuf cannot hold more than 2 GB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**20


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Saves one graph; models over 2 GB keep their weights in `<file>.data` (ONNX external data)."""
    if model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, path)
    else:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)  # fmt: skip


def trace_vision(llava: Any, geometry: Geometry, path: Path, opset: int, dtype: torch.dtype) -> None:
    pixels = torch.zeros(1, 3, geometry.image_size, geometry.image_size, dtype=dtype)
    _export(Vision(llava), (pixels,), path, ["pixel_values"], ["image_features"], ({},), opset)


def trace_embed(llava: Any, path: Path, opset: int) -> None:
    ids = torch.zeros(1, 9, dtype=torch.int64)
    # Its own dim: it embeds whole prompts and single generated tokens (a TensorRT profile from 1).
    dims = ({1: torch.export.Dim("T", min=1, max=1 << 20)},)
    _export(Embed(llava), (ids,), path, ["input_ids"], ["inputs_embeds"], dims, opset)


def kv_names(prefix: str, num_layers: int) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def ffn_names(layers: list[int]) -> list[str]:
    return [f"ffn.{i}.{w}" for i in layers for w in ("gate_t", "up_t", "down_t")]


def trace_prefill(
    decoder: Decoder, geometry: Geometry, budgets: Budgets | None, path: Path, opset: int, dtype: torch.dtype
) -> None:
    """The dense prefill with the seams of `export.modules.Prefill` (keep_indices or merge inputs in, activations
    out)."""
    n_img = geometry.num_image_tokens
    seq = n_img + 7  # distinct example sizes, so the exporter cannot take two dims for equal
    embeds = torch.zeros(1, seq, geometry.hidden_size, dtype=dtype)
    module = Prefill(decoder, budgets)
    s = torch.export.Dim("S", min=2, max=1 << 16)
    outputs = ["logits", *kv_names("present", geometry.num_layers), *module.seam_outputs]
    if budgets is None:
        _export(module, (embeds,), path, ["inputs_embeds"], outputs, ({1: s},), opset)
        return
    kept = budgets.token_budget if budgets.token_budget != "auto" else min(budgets.auto_range[1], n_img - 1)
    keep = torch.cat([torch.arange(3), 3 + torch.arange(kept), torch.arange(3 + n_img, seq)])
    s_kept = torch.export.Dim("S_kept", min=1, max=1 << 16)
    if not module.merge:
        seams: tuple[torch.Tensor, ...] = (keep,)
        dims: tuple[Any, ...] = ({1: s}, ({0: s_kept},))  # the module takes (inputs_embeds, *seams)
    else:
        rows = keep.numel() + budgets.merged_tokens
        weights = torch.zeros(rows, seq)  # float32 whatever the precision: the passes compute them
        weights[torch.arange(keep.numel()), keep] = 1.0
        positions = torch.cat([keep, keep[-1:].repeat(budgets.merged_tokens)])
        seams = (weights, positions, torch.zeros(rows))
        dims = ({1: s}, ({0: s_kept, 1: s}, {0: s_kept}, {0: s_kept}))
    _export(module, (embeds, *seams), path, ["inputs_embeds", *module.seam_inputs], outputs, dims, opset)


def trace_decode(
    decoder: Decoder, geometry: Geometry, budgets: Budgets | None, path: Path, opset: int, dtype: torch.dtype
) -> None:
    """The decode step against preallocated buffers (`export.modules.Decode`)."""
    n_img = geometry.num_image_tokens
    kept = n_img if budgets is None else (budgets.auto_range[0] if budgets.token_budget == "auto" else
                                          budgets.token_budget)  # fmt: skip
    position = n_img + 9
    buffer, buffer_kept = position + 5, position - n_img + kept + 3  # distinct example sizes
    b = torch.export.Dim("B", min=1, max=1 << 16)
    b_kept = torch.export.Dim("B_kept", min=1, max=1 << 16)
    past, dims = [], []
    for layer in range(geometry.num_layers):
        pruned = budgets is not None and layer > budgets.prune_layer
        length, dim = (buffer_kept, b_kept) if pruned else (buffer, b)
        past += [torch.zeros(1, geometry.num_kv_heads, length, geometry.head_dim, dtype=dtype) for _ in range(2)]
        dims += [{2: dim}, {2: dim}]
    sparse = [] if budgets is None else budgets.neuron_sparse_layers
    n, d = (geometry.intermediate_size if budgets is None else budgets.core_neurons), geometry.hidden_size
    ffn = []
    for _ in sparse:
        ffn += [torch.zeros(d, n, dtype=dtype), torch.zeros(d, n, dtype=dtype), torch.zeros(n, d, dtype=dtype)]
        dims += [{}, {}, {}]
    lengths = [torch.tensor([position], dtype=torch.int64)]
    inputs = ["inputs_embeds", "position_ids"]
    if budgets is not None:
        lengths.append(torch.tensor([position - n_img + kept], dtype=torch.int64))
        inputs.append("past_kept_length")
        dims.insert(0, {})
    if budgets is not None and budgets.token_merge != "none":
        # The pruned layers' key bias: kept_bias [k'] at the image slots, which start at image_start.
        lengths += [torch.tensor([3], dtype=torch.int64), torch.zeros(budgets.image_slots)]
        inputs += ["image_start", "kept_bias"]
        dims[1:1] = [{}, {}]
    inputs += [*kv_names("past", geometry.num_layers), *ffn_names(sparse)]
    outputs = ["logits", *kv_names("new", geometry.num_layers)]
    embeds = torch.zeros(1, 1, d, dtype=dtype)
    args = (embeds, *lengths, *past, *ffn)
    _export(Decode(decoder, budgets), args, path, inputs, outputs, ({}, {}, tuple(dims)), opset)
