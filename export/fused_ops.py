"""ONNX Runtime's fused attention, traced into the stacks' ONNX Runtime form (docs/architecture.md).

The stacks' portable form spells attention with standard operators over a cache buffer that the runtime
fills: about 50 nodes per layer, and every step reads the whole buffer. ONNX Runtime's contrib operator
`com.microsoft.GroupQueryAttention` does the same work in one node: rotary embedding at given positions,
the new tokens' entries written into the buffer in place (past and present bound to the same memory),
attention over the used length only, an additive key bias (a merge's), and query heads grouped over KV
heads. TensorRT has no such operator, so a build keeps both forms and the manifest says which one each
runtime reads.

GroupQueryAttention rotates at the given positions only where the buffer already holds tokens: a first
prompt is rotated at 0..S-1 whatever `position_ids` says (measured, ONNX Runtime 1.32). The upper stack's
prefill runs the kept tokens at their own, gapped positions, so that stack rotates first with the contrib
`RotaryEmbedding` (which honours the positions) and attends without rotary.

The torch side is a custom op (`torch.ops.corematching.group_query_attention`) whose eager body is the
reference math (tests compare it with ONNX Runtime's kernel), whose fake body gives the exporter shapes,
and whose translation emits the contrib node. onnxscript builds nodes from registered ONNX schemas, so the
contrib operators' schemas (the inputs used here) are registered with `onnx.defs` once, under stand-in names
(`TRACED`): ONNX's own RotaryEmbedding shares the contrib one's name, and onnx's reference evaluator, which the
exporter runs, takes every operator name to be unique across domains. `contrib_names` gives the traced nodes
their real names.
"""

from __future__ import annotations

from typing import Any

import onnx
import torch
from onnx.defs import OpSchema
from torch import Tensor

CONTRIB_DOMAIN = "com.microsoft"
GQA = "GroupQueryAttention"


ROTARY = "RotaryEmbedding"
# The names the schemas are registered and traced under -> the contrib operators' names.
TRACED = {"CoreMatchingGroupQueryAttention": GQA, "CoreMatchingRotaryEmbedding": ROTARY}
_TRACED_AS = {real: traced for traced, real in TRACED.items()}


def contrib_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """The traced stand-in nodes renamed to the contrib operators ONNX Runtime runs (in place)."""
    for node in model.graph.node:
        if node.domain == CONTRIB_DOMAIN and node.op_type in TRACED:
            node.op_type = TRACED[node.op_type]
    return model


def _registered(name: str) -> bool:
    try:
        onnx.defs.get_schema(name, 1, CONTRIB_DOMAIN)
    except onnx.defs.SchemaError:
        return False
    return True


def register_schemas() -> None:
    """Declares GroupQueryAttention and RotaryEmbedding (the inputs the stacks use) to onnx, so onnxscript can
    emit them."""
    if not _registered(_TRACED_AS[GQA]):
        onnx.defs.register_schema(_gqa_schema())
    if not _registered(_TRACED_AS[ROTARY]):
        param = OpSchema.FormalParameter
        inputs = [param("input", "T", "[B, S, heads * hd]"), param("position_ids", "M", "[B, S]")]
        inputs += [param("cos_cache", "T", "[positions, hd / 2]"), param("sin_cache", "T", "[positions, hd / 2]")]
        schema = OpSchema(
            _TRACED_AS[ROTARY],
            CONTRIB_DOMAIN,
            1,
            doc="ONNX Runtime's contrib operator, declared for tracing",
            inputs=inputs,
            outputs=[param("output", "T", "")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int64)"], "")],
            attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "")],
        )
        onnx.defs.register_schema(schema)


def _gqa_schema() -> OpSchema:
    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    inputs = [param("query", "T", "[B, S, H * hd]")]
    inputs += [param(name, "T", "", param_option=optional) for name in ("key", "value", "past_key", "past_value")]
    inputs += [param("seqlens_k", "M", "[B]: total length - 1"), param("total_sequence_length", "M", "scalar")]
    inputs += [param(name, "T", "[positions, hd / 2]", param_option=optional) for name in ("cos_cache", "sin_cache")]
    inputs += [param("position_ids", "tensor(int64)", "[B, S]", param_option=optional)]
    inputs += [param("attention_bias", "T", "[B or 1, 1, S, total]", param_option=optional)]
    outputs = [param("output", "T", ""), param("present_key", "T", ""), param("present_value", "T", "")]
    kinds = {"num_heads": OpSchema.AttrType.INT, "kv_num_heads": OpSchema.AttrType.INT}
    kinds |= {"do_rotary": OpSchema.AttrType.INT, "scale": OpSchema.AttrType.FLOAT}
    attributes = [OpSchema.Attribute(name, kind, "") for name, kind in kinds.items()]
    return OpSchema(
        _TRACED_AS[GQA],
        CONTRIB_DOMAIN,
        1,
        doc="ONNX Runtime's contrib operator, declared for tracing",
        inputs=inputs,
        outputs=outputs,
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=attributes,
    )


def _rotate(x: Tensor, positions: Tensor, cos_cache: Tensor, sin_cache: Tensor, heads: int) -> Tensor:
    """x [1, S, heads*hd] rotated at positions [1, S] (rotate-half layout) -> [1, S, heads, hd]."""
    seq = x.shape[1]
    hd = x.shape[2] // heads
    cos = torch.cat((cos_cache[positions[0]],) * 2, dim=-1)[None, :, None]  # [1, S, 1, hd]
    sin = torch.cat((sin_cache[positions[0]],) * 2, dim=-1)[None, :, None]
    x = x.view(1, seq, heads, hd)
    return x * cos + torch.cat((-x[..., hd // 2 :], x[..., : hd // 2]), dim=-1) * sin


@torch.library.custom_op("corematching::rotary_embedding", mutates_args=())
def rotary_embedding(x: Tensor, position_ids: Tensor, cos_cache: Tensor, sin_cache: Tensor, heads: int) -> Tensor:
    """x [1, S, heads*hd] rotated at position_ids [1, S]: the contrib RotaryEmbedding (non-interleaved)."""
    return _rotate(x, position_ids, cos_cache, sin_cache, heads).reshape(x.shape)


@rotary_embedding.register_fake
def _rotary_fake(x: Tensor, position_ids: Tensor, cos_cache: Tensor, sin_cache: Tensor, heads: int) -> Tensor:
    return x.new_empty(x.shape)


def _translate_rotary(x: Any, position_ids: Any, cos_cache: Any, sin_cache: Any, heads: int) -> Any:
    import onnxscript

    contrib = onnxscript.values.Opset(CONTRIB_DOMAIN, 1)
    rotary = getattr(contrib, _TRACED_AS[ROTARY])
    return rotary(x, position_ids, cos_cache, sin_cache, num_heads=heads)


@torch.library.custom_op("corematching::key_bias", mutates_args=())
def key_bias(bias_past: Tensor, bias_new: Tensor, total: Tensor) -> Tensor:
    """The additive key bias GroupQueryAttention reads, [1, 1, S, total]: the first total - S entries of the
    buffer slots' bias [B], then the new tokens' [S], for every query (made once per stack)."""
    seq = bias_new.shape[0]
    keys = torch.cat((bias_past[: int(total) - seq], bias_new))  # [T]
    return keys[None, None, None].expand(1, 1, seq, keys.shape[0]).contiguous()


@key_bias.register_fake
def _key_bias_fake(bias_past: Tensor, bias_new: Tensor, total: Tensor) -> Tensor:
    keys = torch.library.get_ctx().new_dynamic_size()  # the used length: a value of `total`
    return bias_new.new_empty(1, 1, bias_new.shape[0], keys)


def _translate_key_bias(bias_past: Any, bias_new: Any, total: Any) -> Any:
    from onnxscript import opset18 as op

    seq = op.Shape(bias_new)  # [1]
    used = op.Sub(op.Reshape(op.Cast(total, to=onnx.TensorProto.INT64), op.Constant(value_ints=[1])), seq)
    keys = op.Concat(op.Slice(bias_past, op.Constant(value_ints=[0]), used), bias_new, axis=0)  # [T]
    shape = op.Concat(op.Constant(value_ints=[1, 1]), seq, op.Shape(keys), axis=0)
    return op.Expand(op.Reshape(keys, op.Constant(value_ints=[1, 1, 1, -1])), shape)


@torch.library.custom_op("corematching::group_query_attention", mutates_args=())
def group_query_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    past_key: Tensor,
    past_value: Tensor,
    seqlens_k: Tensor,
    total: Tensor,
    cos_cache: Tensor,
    sin_cache: Tensor,
    position_ids: Tensor,
    attention_bias: Tensor | None,
    num_heads: int,
    kv_heads: int,
    scale: float,
    do_rotary: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """S new tokens against a cache buffer, as the contrib op computes them. query: [1, S, H*hd]; key/value:
    [1, S, n_kv*hd] (before rotary, with do_rotary); past_key/value: [1, n_kv, B, hd]; seqlens_k: [1] int32,
    total - 1; total: int32 scalar, the used length after this run; cos/sin_cache: [P, hd/2]; position_ids:
    [1, S]; attention_bias: [1, 1, S, total] (`key_bias`) or None. -> output [1, S, H*hd], the buffers with the
    new entries at total - S.."""
    seq = query.shape[1]
    used = int(total) - seq
    hd = past_key.shape[-1]

    def rotate(x: Tensor, heads: int) -> Tensor:  # [1, S, heads*hd] -> [1, heads, S, hd]
        if do_rotary:
            return _rotate(x, position_ids, cos_cache, sin_cache, heads).transpose(1, 2)
        return x.view(1, seq, heads, hd).transpose(1, 2)

    q, k = rotate(query, num_heads), rotate(key, kv_heads)
    v = value.view(1, seq, kv_heads, hd).transpose(1, 2)
    present_key, present_value = past_key.clone(), past_value.clone()
    present_key[:, :, used : used + seq], present_value[:, :, used : used + seq] = k, v
    keys = present_key[:, :, : used + seq].repeat_interleave(num_heads // kv_heads, dim=1)  # [1, H, T, hd]
    values = present_value[:, :, : used + seq].repeat_interleave(num_heads // kv_heads, dim=1)
    scores = (q @ keys.transpose(-1, -2)) * scale  # [1, H, S, T]
    causal = torch.arange(used + seq)[None, :] <= (used + torch.arange(seq))[:, None]  # [S, T]
    scores = scores.masked_fill(~causal, float("-inf"))
    if attention_bias is not None:
        scores = scores + attention_bias
    out = scores.softmax(-1) @ values  # [1, H, S, hd]
    return out.transpose(1, 2).reshape(1, seq, -1), present_key, present_value


@group_query_attention.register_fake
def _fake(query: Tensor, key: Tensor, value: Tensor, past_key: Tensor, past_value: Tensor, *rest: Any) -> Any:
    return query.new_empty(query.shape), past_key.new_empty(past_key.shape), past_value.new_empty(past_value.shape)


def _translate(
    query: Any,
    key: Any,
    value: Any,
    past_key: Any,
    past_value: Any,
    seqlens_k: Any,
    total: Any,
    cos_cache: Any,
    sin_cache: Any,
    position_ids: Any,
    attention_bias: Any,
    num_heads: int,
    kv_heads: int,
    scale: float,
    do_rotary: bool,
) -> Any:
    """The contrib node (the lengths and the bias are made once per stack, not per layer)."""
    import onnxscript

    contrib = onnxscript.values.Opset(CONTRIB_DOMAIN, 1)
    rotary = (cos_cache, sin_cache, position_ids) if do_rotary else (None, None, None)
    attention = getattr(contrib, _TRACED_AS[GQA])
    return attention(
        query,
        key,
        value,
        past_key,
        past_value,
        seqlens_k,
        total,
        *rotary,
        attention_bias,
        num_heads=num_heads,
        kv_num_heads=kv_heads,
        do_rotary=int(do_rotary),
        scale=scale,
        _outputs=3,
    )


def translations() -> dict[Any, Any]:
    """The exporter's `custom_translation_table` for the fused stacks (the schemas registered first)."""
    register_schemas()
    return {
        torch.ops.corematching.group_query_attention.default: _translate,
        torch.ops.corematching.rotary_embedding.default: _translate_rotary,
        torch.ops.corematching.key_bias.default: _translate_key_bias,
    }
