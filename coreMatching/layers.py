"""One decoder layer of a Llama-family model, run explicitly on the model's own modules.

CoreMatching needs what the stock `transformers` forward hides: the FFN
activation of every token, hidden states that shrink half-way through the
stack, and a KV cache whose layers hold different numbers of tokens. So the
reference runs each layer here, calling the layer's own projections and norms
(the same weights and the same operations as `transformers`), and keeps the
KV cache as explicit tensors, the form the exported graphs use too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class LayerKV:
    """The KV cache of one layer. Layers after the prune layer hold fewer tokens."""

    key: Tensor  # [1, n_kv, T, hd] (after RoPE)
    value: Tensor  # [1, n_kv, T, hd]
    positions: Tensor  # [T] position ids of the cached tokens (kept tokens keep their original ones)
    bias: Tensor | None = None  # [T] added to every query's logit for each key: log of its multiplicity (merges)

    @property
    def length(self) -> int:
        return self.key.shape[2]


@dataclass(frozen=True)
class CompactFFN:
    """The FFN of one layer restricted to its core neurons, gathered once per request.

    gate, up: [N, d] rows of W_gate and W_up; down: [d, N] columns of W_down.
    """

    neurons: Tensor  # [N] ascending neuron indices
    gate: Tensor  # [N, d]
    up: Tensor  # [N, d]
    down: Tensor  # [d, N]
    gate_bias: Tensor | None  # [N]
    up_bias: Tensor | None  # [N]
    down_bias: Tensor | None  # [d]

    @classmethod
    def gather(cls, mlp: Any, neurons: Tensor) -> CompactFFN:
        def rows(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.index_select(0, neurons).contiguous()

        return cls(
            neurons=neurons,
            gate=rows(mlp.gate_proj.weight),
            up=rows(mlp.up_proj.weight),
            down=mlp.down_proj.weight.index_select(1, neurons).contiguous(),
            gate_bias=rows(mlp.gate_proj.bias),
            up_bias=rows(mlp.up_proj.bias),
            down_bias=mlp.down_proj.bias,
        )

    def __call__(self, x: Tensor, act_fn: Any) -> Tensor:
        # x: [1, T, d] -> [1, T, d]
        a = act_fn(F.linear(x, self.gate, self.gate_bias)) * F.linear(x, self.up, self.up_bias)  # [1, T, N]
        return F.linear(a, self.down, self.down_bias)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    # q: [1, H, T, hd], k: [1, n_kv, T, hd], cos/sin: [1, T, hd]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def attention(
    attn: Any,
    x: Tensor,
    rope: tuple[Tensor, Tensor],
    positions: Tensor,
    past: LayerKV | None,
    window: int | None,
    want_probs: bool = False,
    key_bias: Tensor | None = None,
) -> tuple[Tensor, LayerKV, Tensor | None]:
    """Self-attention of one layer on normed hidden states, with an explicit KV cache.

    x: [1, T, d]; positions: [T] position ids of x's tokens; key_bias: [T] log multiplicity of x's
    keys (a merged token weighs as that many copies; None: all 1).
    Returns the output [1, T, d], the layer's cache with x's keys appended, and,
    when asked (FastV), the last query's attention probabilities [H, T_kv].
    """
    _, seq, _ = x.shape
    head_dim = attn.head_dim
    q = attn.q_proj(x).view(1, seq, -1, head_dim).transpose(1, 2)  # [1, H, T, hd]
    k = attn.k_proj(x).view(1, seq, -1, head_dim).transpose(1, 2)  # [1, n_kv, T, hd]
    v = attn.v_proj(x).view(1, seq, -1, head_dim).transpose(1, 2)  # [1, n_kv, T, hd]
    q, k = apply_rope(q, k, *rope)
    if past is not None:
        k = torch.cat([past.key, k], dim=2)
        v = torch.cat([past.value, v], dim=2)
        kv_positions = torch.cat([past.positions, positions])
    else:
        kv_positions = positions
    bias = None
    if key_bias is not None or (past is not None and past.bias is not None):
        new_bias = key_bias if key_bias is not None else torch.zeros(seq, device=x.device)
        bias = new_bias if past is None else torch.cat([_bias_of(past), new_bias])
    cache = LayerKV(k, v, kv_positions, bias)

    groups = q.shape[1] // k.shape[1]
    k_rep = k.repeat_interleave(groups, dim=1)  # [1, H, T_kv, hd]
    v_rep = v.repeat_interleave(groups, dim=1)
    scale = getattr(attn, "scaling", head_dim**-0.5)

    # Kept tokens keep their order, so causality by index equals causality by
    # position and the plain causal kernel applies; a sliding window is measured
    # in original positions and needs an explicit mask.
    # A merged token sits after the kept image tokens but keeps their mean position: causality is by
    # index there (the order the cache holds), as in the graphs.
    mask = None
    if window is not None or want_probs or bias is not None:
        total = k.shape[2]
        mask = torch.ones(seq, total, dtype=torch.bool, device=x.device).tril(total - seq)  # [T, T_kv] by index
        if window is not None:
            mask &= (positions[:, None] - kv_positions[None, :]) < window
    attn_mask = mask
    if bias is not None:
        assert mask is not None
        attn_mask = torch.where(mask, bias.to(q.dtype)[None, :], torch.finfo(q.dtype).min)  # [T, T_kv] additive
    is_causal = mask is None and past is None and seq > 1
    out = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    out = attn.o_proj(out.transpose(1, 2).reshape(1, seq, -1))  # [1, T, d]

    probs = None
    if want_probs:
        logits = (q[:, :, -1:] @ k_rep.transpose(-1, -2)) * scale  # [1, H, 1, T_kv]: the last query only
        probs = logits.masked_fill(~mask[-1:], float("-inf")).softmax(dim=-1)[0, :, 0]
    return out, cache, probs


def _bias_of(past: LayerKV) -> Tensor:
    return past.bias if past.bias is not None else torch.zeros(past.length, device=past.key.device)


def ffn_dense(mlp: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    """The dense FFN, returning its activation too. x: [1, T, d] -> ([1, T, d], a: [1, T, D])."""
    a = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    # down_proj is called as a module so that forward hooks on it see `a`.
    return mlp.down_proj(a), a
