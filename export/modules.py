"""The traced forms of a LLaVA model: vision, embed, prefill and decode (docs/architecture.md).

Each module holds its weights in the layout its MatMuls read (`x @ w_t`), under
names that the graph-surgeon passes look up (`ffn_prefix(i)` + `.gate_t`), so that
the exported graph carries them as plain initializers with no Transpose in
between. The math is the reference's (`coreMatching.layers`), checked by the
build's validation against `transformers` and the reference.

The prefill graph is traced *dense* with seams that the passes fill in:
- a graph input `keep_indices` [S'] gathers the hidden states and position ids
  after the prune layer (the core-token pass replaces it with TopK + Gather);
  with a merge, the inputs `merge_weights` [S'', S], `keep_positions` [S''] and
  `key_bias` [S''] instead (the merge pass computes them): later layers start
  from `merge_weights @ h` and add `key_bias` to every attention logit;
- graph outputs `act.{i}` [T, D] expose the FFN activation of the prune layer
  and the neuron-sparse layers (the core-neuron pass turns them into
  `core_neurons.{i}`, and the FFN-gather pass adds the compacted weights);
  `attn_last.{l_p}` [H, T] the last query's attention at the prune layer, for
  the selectors that read it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from buildformat.names import (
    FFN_WEIGHTS,
    IMAGE_START,
    KEEP_INDICES,
    KEPT_BIAS,
    MERGE_SEAMS,
    PAST,
    PAST_KEPT_LENGTH,
    GraphNames,
    activation_name,
    attention_name,
    cache_names,
    decode_names,
    ffn_name,
)
from coreMatching.backbones import backbone_of
from coreMatching.config import Budgets
from coreMatching.selectors import SELECTORS


def _t(linear: nn.Linear) -> nn.Parameter:
    return nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)


def _bias(linear: nn.Linear) -> nn.Parameter | None:
    return None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = nn.Parameter(norm.weight.detach().clone(), requires_grad=False)
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

    def forward(self, h: Tensor) -> Tensor:
        # As transformers' LlamaRMSNorm: normalise in fp32, scale in the input dtype.
        x = h.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(h.dtype)


class Attention(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.head_dim: int = attn.head_dim
        self.scale = float(getattr(attn, "scaling", self.head_dim**-0.5))
        self.q_t, self.k_t, self.v_t, self.o_t = (_t(attn.q_proj), _t(attn.k_proj), _t(attn.v_proj), _t(attn.o_proj))
        self.q_b, self.k_b, self.v_b, self.o_b = (
            _bias(attn.q_proj),
            _bias(attn.k_proj),
            _bias(attn.v_proj),
            _bias(attn.o_proj),
        )

    @staticmethod
    def _proj(x: Tensor, w_t: Tensor, b: Tensor | None) -> Tensor:
        y = x @ w_t
        return y if b is None else y + b

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, key_bias: Tensor | None = None, want_last: bool = False
    ) -> tuple[Tensor, ...]:
        """Prefill attention, causal by index. x: [1, T, d]; cos/sin: [1, 1, T, hd]; key_bias: [T] added to
        every query's logit for each key (a merged token's log multiplicity). -> out [1, T, d], k, v
        [1, n_kv, T, hd] and, with want_last, the last query's attention probabilities [H, T]."""
        seq = x.shape[1]
        q = self._proj(x, self.q_t, self.q_b).view(1, seq, -1, self.head_dim).transpose(1, 2)  # [1, H, T, hd]
        k = self._proj(x, self.k_t, self.k_b).view(1, seq, -1, self.head_dim).transpose(1, 2)  # [1, n_kv, T, hd]
        v = self._proj(x, self.v_t, self.v_b).view(1, seq, -1, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        groups = q.shape[1] // k.shape[1]
        k_rep = k.repeat_interleave(groups, dim=1) if groups > 1 else k
        v_rep = v.repeat_interleave(groups, dim=1) if groups > 1 else v
        # Causal by index, which equals causal by position since kept tokens keep their order (a merged
        # token sits after the kept image tokens it stands for).
        if key_bias is None:
            out = nn.functional.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True, scale=self.scale)
        else:
            causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()  # [T, T]
            mask = torch.where(causal, key_bias[None, :].to(q.dtype), torch.finfo(q.dtype).min)
            out = nn.functional.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask, scale=self.scale)
        out = self._proj(out.transpose(1, 2).reshape(1, seq, -1), self.o_t, self.o_b)  # [1, T, d]
        if not want_last:
            return out, k, v
        logits = (q[:, :, -1:] @ k_rep.transpose(-1, -2)) * self.scale  # [1, H, 1, T]: the last query sees all
        return out, k, v, logits.softmax(dim=-1)[0, :, 0]

    def decode(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        past_k: Tensor,
        past_v: Tensor,
        valid: Tensor,
        past_bias: Tensor | None = None,
    ):
        """One token against a preallocated cache buffer, without concatenating (or copying) it.

        x: [1, 1, d]; past_k/past_v: [1, n_kv, B, hd], of which the first `valid` [1] positions hold
        tokens (the rest is zero padding); past_bias: [B] the cached keys' log multiplicity (merges).
        Returns the output [1, 1, d] and the token's own k, v [1, n_kv, 1, hd], which the caller
        writes into its buffer at position `valid`.
        """
        q = self._proj(x, self.q_t, self.q_b).view(1, 1, -1, self.head_dim).transpose(1, 2)  # [1, H, 1, hd]
        k = self._proj(x, self.k_t, self.k_b).view(1, 1, -1, self.head_dim).transpose(1, 2)  # [1, n_kv, 1, hd]
        v = self._proj(x, self.v_t, self.v_b).view(1, 1, -1, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        n_kv = k.shape[1]
        # Query heads grouped by the KV head they read (head h reads KV head h // groups, as
        # repeat_interleave does): [1, n_kv, groups, hd], so no KV head is repeated.
        qg = q.reshape(1, n_kv, -1, self.head_dim)
        s_past = (qg @ past_k.transpose(-1, -2)) * self.scale  # [1, n_kv, g, B]
        if past_bias is not None:
            s_past = s_past + past_bias.to(s_past.dtype)
        filled = torch.arange(past_k.shape[2], device=x.device) < valid  # [B]
        s_past = torch.where(filled, s_past, torch.finfo(s_past.dtype).min)
        s_new = (qg * k).sum(-1, keepdim=True) * self.scale  # [1, n_kv, g, 1]
        probs = torch.cat([s_past, s_new], dim=-1).softmax(dim=-1)  # over the scores only, not the cache
        out = probs[..., :-1] @ past_v + probs[..., -1:] * v  # [1, n_kv, g, hd]
        out = self._proj(out.reshape(1, 1, -1), self.o_t, self.o_b)
        return out, k, v


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class FFN(nn.Module):
    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.act = mlp.act_fn
        # Named as FFN_WEIGHTS: the traced initializers are `{ffn_prefix(i)}.{weight}`.
        self.gate_t, self.up_t, self.down_t = _t(mlp.gate_proj), _t(mlp.up_proj), _t(mlp.down_proj)
        self.gate_b, self.up_b, self.down_b = _bias(mlp.gate_proj), _bias(mlp.up_proj), _bias(mlp.down_proj)

    def activation(self, x: Tensor, gate_t: Tensor, up_t: Tensor) -> Tensor:
        g, u = x @ gate_t, x @ up_t
        if self.gate_b is not None and gate_t is self.gate_t:
            g = g + self.gate_b
        if self.up_b is not None and up_t is self.up_t:
            u = u + self.up_b
        return self.act(g) * u

    def down(self, a: Tensor, down_t: Tensor) -> Tensor:
        y = a @ down_t
        return y if self.down_b is None else y + self.down_b


class Layer(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.input_norm = RMSNorm(layer.input_layernorm)
        self.attn = Attention(layer.self_attn)
        self.post_norm = RMSNorm(layer.post_attention_layernorm)
        self.mlp = FFN(layer.mlp)


class Rope(nn.Module):
    def __init__(self, rotary: nn.Module) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone(), persistent=False)
        self.scaling = float(getattr(rotary, "attention_scaling", 1.0))

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # positions: [T] int64 -> cos, sin: [1, 1, T, hd]
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype)[None, None], (emb.sin() * self.scaling).to(dtype)[None, None]


class Decoder(nn.Module):
    """The decoder's weights in MatMul layout, shared by the prefill and decode modules."""

    def __init__(self, llava: Any) -> None:
        super().__init__()
        backbone = backbone_of(llava)
        self.layers = nn.ModuleList(Layer(layer) for layer in backbone.layers(llava))
        self.norm = RMSNorm(backbone.final_norm(llava))
        self.rope = Rope(backbone.rotary_emb(llava))
        self.lm_head_t = _t(backbone.lm_head(llava))

    def logits(self, h_last: Tensor) -> Tensor:
        # h_last: [1, d] -> [1, V]
        return self.norm(h_last) @ self.lm_head_t


class Prefill(nn.Module):
    """inputs_embeds [1, S, d] and the seams of the module docstring -> logits, KV of every layer, activations.

    Without a merge the seam is keep_indices [S']; with one, merge_weights [S'', S], keep_positions
    [S''] and key_bias [S''] (`seam_inputs` names them in order).
    """

    def __init__(self, decoder: Decoder, budgets: Budgets | None) -> None:
        super().__init__()
        self.decoder = decoder
        self.budgets = budgets  # None: the dense model
        self.act_layers = [] if budgets is None else sorted({budgets.prune_layer, *budgets.neuron_sparse_layers})
        self.merge = budgets is not None and budgets.token_merge != "none"
        self.want_attention = budgets is not None and SELECTORS[budgets.token_selector].needs_attention

    @property
    def seam_inputs(self) -> list[str]:
        if self.budgets is None:
            return []
        return list(MERGE_SEAMS) if self.merge else [KEEP_INDICES]

    @property
    def seam_outputs(self) -> list[str]:
        attention = [attention_name(self.budgets.prune_layer)] if self.want_attention else []  # type: ignore[union-attr]
        return [*[activation_name(i) for i in self.act_layers], *attention]

    def forward(self, inputs_embeds: Tensor, *seams: Tensor) -> tuple[Tensor, ...]:
        h = inputs_embeds  # [1, S, d]
        positions = torch.arange(h.shape[1], device=h.device)  # [S]
        cos, sin = self.decoder.rope(positions, h.dtype)
        kv: list[Tensor] = []
        acts: list[Tensor] = []
        attention: list[Tensor] = []
        key_bias: Tensor | None = None
        prune_layer = None if self.budgets is None else self.budgets.prune_layer
        for index, layer in enumerate(self.decoder.layers):
            want_last = self.want_attention and index == prune_layer
            attn = layer.attn(layer.input_norm(h), cos, sin, key_bias, want_last)
            kv += [attn[1], attn[2]]
            attention += list(attn[3:])
            h = h + attn[0]
            x = layer.post_norm(h)
            a = layer.mlp.activation(x, layer.mlp.gate_t, layer.mlp.up_t)  # [1, T, D]
            h = h + layer.mlp.down(a, layer.mlp.down_t)
            if index in self.act_layers:
                acts.append(a[0])
            if index == prune_layer:
                if self.merge:
                    merge_weights, keep_positions, key_bias = seams  # [S'', S], [S''], [S'']
                    h = (merge_weights.to(h.dtype) @ h[0])[None]  # [1, S'', d]: kept and merged tokens
                    key_bias = key_bias.to(h.dtype)
                else:
                    (keep_positions,) = seams  # [S']
                    h = h.index_select(1, keep_positions)  # [1, S', d]: later layers see the kept tokens only
                cos, sin = self.decoder.rope(keep_positions, h.dtype)  # kept tokens keep their positions
        logits = self.decoder.logits(h[:, -1])
        return (logits, *kv, *acts, *attention)


def ffn_prefix(layer: int) -> str:
    """The traced name of a layer's FFN weights, `{prefix}.gate_t` ...: the module path in `Prefill` and `Decode`
    (`decoder.layers[i].mlp`), which the FFN-gather pass and the quantization look up."""
    return f"decoder.layers.{layer}.mlp"


class Decode(nn.Module):
    """One token against preallocated cache buffers.

    Inputs: inputs_embeds [1, 1, d]; position_ids [1], which is also the number of cached tokens
    of the full layers; past_kept_length [1], the cached tokens of the pruned layers (CoreMatching
    builds); with a merge, image_start [1] and kept_bias [k'] (the key bias of the pruned layers'
    image slots, from prefill); the buffers past.{i}.key/value [1, n_kv, B, hd] (B >= the valid
    length, zero padded); the compacted FFN weights of the neuron-sparse layers.
    Outputs: logits [1, V] and new.{i}.key/value [1, n_kv, 1, hd], the token's own cache entries.
    """

    def __init__(self, decoder: Decoder, budgets: Budgets | None) -> None:
        super().__init__()
        self.decoder = decoder
        self.prune_layer = None if budgets is None else budgets.prune_layer
        self.sparse = [] if budgets is None else budgets.neuron_sparse_layers
        self.merge = budgets is not None and budgets.token_merge != "none"

    @property
    def names(self) -> GraphNames:
        """The graph's inputs, in the order `forward` takes them (the trace builds an example per name), and
        outputs."""
        return decode_names(len(self.decoder.layers), self.prune_layer is not None, self.merge, self.sparse)

    def forward(self, inputs_embeds: Tensor, position_ids: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
        num_layers = len(self.decoder.layers)
        named = dict(zip(self.names.inputs[2:], rest, strict=True))
        kept_length = named.get(PAST_KEPT_LENGTH, position_ids)
        image_start, kept_bias = named.get(IMAGE_START), named.get(KEPT_BIAS)
        past = [named[name] for name in cache_names(PAST, num_layers)]
        compact = {layer: tuple(named[ffn_name(layer, w)] for w in FFN_WEIGHTS) for layer in self.sparse}
        h = inputs_embeds
        cos, sin = self.decoder.rope(position_ids, h.dtype)
        bias = None
        if self.merge:
            assert image_start is not None and kept_bias is not None and self.prune_layer is not None
            bias = _slot_bias(past[2 * (self.prune_layer + 1)].shape[2], image_start, kept_bias)  # [B_kept]
        new: list[Tensor] = []
        for index, layer in enumerate(self.decoder.layers):
            pruned = self.prune_layer is not None and index > self.prune_layer
            valid = kept_length if pruned else position_ids
            attn_out, k, v = layer.attn.decode(
                layer.input_norm(h), cos, sin, past[2 * index], past[2 * index + 1], valid, bias if pruned else None
            )
            new += [k, v]
            h = h + attn_out
            x = layer.post_norm(h)
            gate_t, up_t, down_t = compact.get(index, (layer.mlp.gate_t, layer.mlp.up_t, layer.mlp.down_t))
            h = h + layer.mlp.down(layer.mlp.activation(x, gate_t, up_t), down_t)
        return (self.decoder.logits(h[:, -1]), *new)


def _slot_bias(length: int, image_start: Tensor, kept_bias: Tensor) -> Tensor:
    """The key bias of a pruned layer's cache buffer: kept_bias [k'] at positions image_start..+k', else 0. -> [B]"""
    slot = torch.arange(length, device=kept_bias.device) - image_start  # [B]
    inside = (slot >= 0) & (slot < kept_bias.shape[0])
    return torch.where(inside, kept_bias[slot.clamp(0, kept_bias.shape[0] - 1)], torch.zeros_like(kept_bias[:1]))


class Vision(nn.Module):
    """pixel_values [1, 3, H, W] -> image_features [1, n_img, d] (vision tower, feature layer, projector)."""

    def __init__(self, llava: Any) -> None:
        super().__init__()
        self.llava = llava

    def forward(self, pixel_values: Tensor) -> Tensor:
        out = self.llava.model.get_image_features(pixel_values=pixel_values)
        features = out.pooler_output if hasattr(out, "pooler_output") else out
        return features[0][None]


class Embed(nn.Module):
    """input_ids [1, S] -> inputs_embeds [1, S, d]"""

    def __init__(self, llava: Any) -> None:
        super().__init__()
        self.weight = nn.Parameter(backbone_of(llava).embed_tokens(llava).weight.detach().clone(), requires_grad=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        return nn.functional.embedding(input_ids, self.weight)
