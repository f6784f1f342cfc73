"""The traced forms of a LLaVA model: the vision tower and the decoder stacks (docs/architecture.md).

Each module holds its weights in the layout its MatMuls read (`x @ w_t`), under
names that the graph-surgeon passes look up (`ffn_prefix(i)` + `.gate_t`), so that
the exported graph carries them as plain initializers with no Transpose in
between. The math is the reference's (`coreMatching.layers`), checked by the
build's validation against `transformers` and the reference.

A decoder stack (`Stack`) serves prefill and decode alike: it takes S new tokens
(the prompt, or one), their positions, and cache buffers of which `past_length`
entries hold tokens, and returns the new tokens' cache entries. So every decoder
weight is in exactly one graph. A dense build has one stack (`decoder`); a
CoreMatching build splits at the prune layer into `lower` (the embedding and
layers 0..l_p) and `upper` (the rest and the head), and the weightless `select`
graph (export/select_graph.py) runs between them in prefill only. The
activations that the prefill-only graphs read (`act.{i}`, `attn_last.{l_p}`) are
stack outputs, and the FFN weights of the per-request neuron-sparse layers are
stack inputs, bound by the runtime: the full weights in prefill, the request's
compacted ones in decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from buildformat.names import (
    DECODER,
    FFN_WEIGHTS,
    HIDDEN,
    IMAGE_FEATURES,
    IMAGE_START,
    INPUT_IDS,
    KEPT_BIAS,
    LOWER,
    PAST,
    PAST_LENGTH,
    POSITION_IDS,
    UPPER,
    GraphNames,
    cache_name,
    ffn_name,
    stack_names,
)
from coreMatching.backbones import backbone_of
from coreMatching.config import Budgets
from coreMatching.selectors import SELECTORS
from export.fused_ops import group_query_attention, key_bias, rotary_embedding


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

    def fusable(self, h: Tensor) -> Tensor:
        """The same norm (fp32 activations) in the operator pattern that ONNX Runtime's optimizer fuses into
        SimplifiedLayerNormalization, and with the residual Add before it into SkipSimplifiedLayerNormalization:
        Pow, ReduceMean, Add, Sqrt, Div, Mul (x * rsqrt(...) is not matched: 7 nodes per norm stay)."""
        return (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)) * self.weight


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
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        past_k: Tensor,
        past_v: Tensor,
        mask: tuple[Tensor, Tensor],
        want_last: bool = False,
    ) -> tuple[Tensor, ...]:
        """S new tokens against a cache buffer, without concatenating (or copying) it.

        x: [1, S, d]; cos/sin: [1, 1, S, hd]; past_k/past_v: [1, n_kv, B, hd]; mask: the additive key bias of
        the B cached keys [B] and of the S new keys [g*S, S] (`key_masks`: -inf-like on the padding, the one
        masked slot of a prefill and the future, a merged token's log multiplicity). Returns the output [1, S, d],
        the new tokens' k, v [1, n_kv, S, hd] (the caller writes them into its buffer at `valid`) and, with
        want_last, the last query's attention over the new keys [H, S].
        """
        seq = x.shape[1]
        q = self._proj(x, self.q_t, self.q_b).view(1, seq, -1, self.head_dim).transpose(1, 2)  # [1, H, S, hd]
        k = self._proj(x, self.k_t, self.k_b).view(1, seq, -1, self.head_dim).transpose(1, 2)  # [1, n_kv, S, hd]
        v = self._proj(x, self.v_t, self.v_b).view(1, seq, -1, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        n_kv, heads = k.shape[1], q.shape[1]
        groups = heads // n_kv
        # Query heads grouped by the KV head they read (head h reads KV head h // groups, as
        # repeat_interleave does), rows ordered (group, token): [1, n_kv, g * S, hd], so no KV head is repeated.
        qg = q.reshape(1, n_kv, groups * seq, self.head_dim)
        # One additive bias per stack rather than a select per layer (cheaper on every runtime).
        s_past = (qg @ past_k.transpose(-1, -2)) * self.scale + mask[0]  # [1, n_kv, g*S, B]
        s_new = (qg @ k.transpose(-1, -2)) * self.scale + mask[1]  # [1, n_kv, g*S, S]
        # One softmax over the cached and the new keys, without concatenating the scores (a concatenation and
        # two slices of them cost a tenth of a 7B-shape prefill): a softmax over each part, weighed by the
        # part's log-sum-exp. The new keys' comes from their softmax: at the top score s_max the probability
        # is p_max >= 1/S, so lse = s_max - log(p_max) and nothing underflows.
        p_new, p_past = s_new.softmax(dim=-1), s_past.softmax(dim=-1)  # [1, n_kv, g*S, S], [1, n_kv, g*S, B]
        lse_new = s_new.amax(-1, keepdim=True) - p_new.amax(-1, keepdim=True).log()  # [1, n_kv, g*S, 1]
        share = torch.sigmoid(lse_new - torch.logsumexp(s_past, dim=-1, keepdim=True))  # the new keys' part
        out = (p_new @ v) * share + (p_past @ past_v) * (1 - share)  # [1, n_kv, g*S, hd]
        out = out.reshape(1, heads, seq, self.head_dim).transpose(1, 2).reshape(1, seq, -1)
        out = self._proj(out, self.o_t, self.o_b)  # [1, S, d]
        if not want_last:
            return out, k, v
        probs = p_new * share  # [1, n_kv, g*S, S]: over the new keys, of the whole softmax
        last = probs.reshape(1, n_kv, groups, seq, seq)[:, :, :, -1]  # [1, n_kv, g, S]
        return out, k, v, last.reshape(heads, seq)


def fused_attention(
    attn: Attention,
    x: Tensor,
    past: tuple[Tensor, Tensor],
    lengths: tuple[Tensor, Tensor],
    caches: tuple[Tensor, Tensor],
    positions: Tensor,
    bias: Tensor | None,
    gapped: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The stacks' ONNX Runtime form of `Attention`: one GroupQueryAttention node (export.fused_ops) that
    rotates, writes the new entries into the buffers at the used length and attends over the used length only.
    x: [1, S, d]; past: the key and value buffers [1, n_kv, B, hd]; lengths: seqlens_k [1] and total (int32,
    the used length after the run); caches: cos, sin [P, hd/2]; positions: [S]; bias: a merge's key bias [1, 1,
    S, total] or None; gapped: a prefill's positions may not be 0..S-1 (the kept tokens'), so q and k are
    rotated before the kernel, which rotates a first prompt at 0..S-1 whatever the positions (export.fused_ops).
    -> the output [1, S, d] and the buffers (present) [1, n_kv, B, hd]."""
    q, k, v = (attn._proj(x, w, b) for w, b in ((attn.q_t, attn.q_b), (attn.k_t, attn.k_b), (attn.v_t, attn.v_b)))
    heads, kv_heads = attn.q_t.shape[1] // attn.head_dim, attn.k_t.shape[1] // attn.head_dim
    if gapped:
        q = rotary_embedding(q, positions[None], caches[0], caches[1], heads)
        k = rotary_embedding(k, positions[None], caches[0], caches[1], kv_heads)
    out, present_k, present_v = group_query_attention(
        q, k, v, past[0], past[1], lengths[0], lengths[1], caches[0], caches[1], positions[None], bias,
        heads, kv_heads, attn.scale, not gapped,
    )  # fmt: skip
    return attn._proj(out, attn.o_t, attn.o_b), present_k, present_v


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class FFN(nn.Module):
    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.act = mlp.act_fn
        # The traced initializers are `{ffn_prefix(i)}.gate_t` ... (the quantization and the static neuron set
        # look them up); a per-request neuron-sparse layer takes its weights as inputs instead (`bound`).
        self.gate_t, self.up_t, self.down_t = _t(mlp.gate_proj), _t(mlp.up_proj), _t(mlp.down_proj)
        self.gate_b, self.up_b, self.down_b = _bias(mlp.gate_proj), _bias(mlp.up_proj), _bias(mlp.down_proj)

    @staticmethod
    def bound(gate: Tensor, up: Tensor, down_t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The bound weights (FFN_WEIGHTS, each neuron-major [W, d]) in the layout `activation` and `down`
        take: gate and up transposed to [d, W]. ONNX Runtime fuses each Transpose into its MatMul (FusedMatMul
        with transB), so no transposed copy is made in any step."""
        return gate.transpose(0, 1), up.transpose(0, 1), down_t

    def activation(self, x: Tensor, gate_t: Tensor, up_t: Tensor) -> Tensor:
        """x: [1, S, d]; gate_t, up_t: [d, W] -> [1, S, W]"""
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

    def caches(self, positions: int) -> tuple[Tensor, Tensor]:
        """cos, sin [positions, hd/2]: the rotary tables GroupQueryAttention reads (fp32)."""
        freqs = torch.arange(positions, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        return freqs.cos() * self.scaling, freqs.sin() * self.scaling

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


def ffn_prefix(layer: int) -> str:
    """The traced name of a layer's FFN weights, `{prefix}.gate_t` ...: the module path in a `Stack`
    (`decoder.layers[i].mlp`), which the quantization looks up."""
    return f"decoder.layers.{layer}.mlp"


@dataclass(frozen=True)
class StackPlan:
    """What one decoder stack holds and exposes (`stack_plans` makes them from the budgets).

    layers: its layers, in order; embeds: it starts from ids and image features (else hidden states);
    head: it ends with the norm and the LM head (else it outputs the hidden states); merge: its keys carry a
    merge's bias (the upper stack); bound: its per-request neuron-sparse layers, whose FFN weights are
    inputs; acts: the layers whose FFN activation it outputs; attention: the layer whose last query's
    attention it outputs (selectors that read it).
    """

    layers: tuple[int, ...]
    embeds: bool
    head: bool
    merge: bool = False
    bound: tuple[int, ...] = ()
    acts: tuple[int, ...] = ()
    attention: int | None = None
    fused: bool = False  # the ONNX Runtime form (`fused_attention`): present.* outputs, no attention output

    def __post_init__(self) -> None:
        assert set(self.bound) <= set(self.layers) and set(self.acts) <= set(self.layers), self
        assert not (self.fused and self.attention is not None), "the fused form has no attention output"

    @property
    def names(self) -> GraphNames:
        return stack_names(
            self.layers,
            embeds=self.embeds,
            head=self.head,
            merge=self.merge,
            bound_layers=self.bound,
            act_layers=self.acts,
            attention_layer=self.attention,
            fused=self.fused,
        )


def stack_plans(num_layers: int, budgets: Budgets | None) -> dict[str, StackPlan]:
    """The decoder stacks of a build, by graph name: `decoder` (dense) or `lower` and `upper`."""
    if budgets is None:
        return {DECODER: StackPlan(tuple(range(num_layers)), embeds=True, head=True)}
    prune = budgets.prune_layer
    sparse = set(budgets.neuron_sparse_layers)  # per request (a static set is baked into the weights)
    lower, upper = tuple(range(prune + 1)), tuple(range(prune + 1, num_layers))
    attention = prune if SELECTORS[budgets.token_selector].needs_attention else None
    return {
        LOWER: StackPlan(
            lower,
            embeds=True,
            head=False,
            bound=tuple(i for i in lower if i in sparse),
            acts=tuple(i for i in lower if i in sparse or i == prune),
            attention=attention,
        ),
        UPPER: StackPlan(
            upper,
            embeds=False,
            head=True,
            merge=budgets.token_merge != "none",
            bound=tuple(i for i in upper if i in sparse),
            acts=tuple(i for i in upper if i in sparse),
        ),
    }


class Stack(nn.Module):
    """A decoder stack for S new tokens against cache buffers: prefill (the prompt, empty buffers) and decode
    (one token) alike. Inputs and outputs: `StackPlan.names` (buildformat.names.stack_names)."""

    def __init__(self, decoder: Decoder, plan: StackPlan, embed: Tensor | None = None, positions: int = 0) -> None:
        """positions: the rotary tables' length in the fused form (`plan.fused`; 0 for the portable one)."""
        super().__init__()
        self.decoder = decoder
        self.plan = plan
        assert (embed is not None) == plan.embeds
        # Traced as the initializer `embed_tokens` (EMBED_TABLE).
        self.embed_tokens = None if embed is None else nn.Parameter(embed.detach().clone(), requires_grad=False)
        self.fused = plan.fused
        assert self.fused == (positions > 0)
        if self.fused:
            dtype = decoder.lm_head_t.dtype
            cos, sin = (t.to(dtype) for t in decoder.rope.caches(positions))
            self.cos_cache = nn.Parameter(cos, requires_grad=False)  # [P, hd/2]
            self.sin_cache = nn.Parameter(sin, requires_grad=False)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        plan = self.plan
        named = dict(zip(plan.names.inputs, inputs, strict=True))
        positions, valid = named[POSITION_IDS], named[PAST_LENGTH]  # [S], [1]
        h = self._embed(named) if plan.embeds else named[HIDDEN]  # [1, S, d]
        if self.fused:
            return self._fused(named, h)
        cos, sin = self.decoder.rope(positions, h.dtype)
        past = named[cache_name(PAST, plan.layers[0], "key")] if plan.layers else None
        masks = None if past is None else key_masks(past.shape[2], h.shape[1], valid, self._groups(), h.dtype)
        if plan.merge and masks is not None:
            slots = torch.arange(past.shape[2], device=h.device)  # [B]: the cache's kept positions
            new = valid + torch.arange(h.shape[1], device=h.device)  # [S]: the new tokens'
            start, kept_bias = named[IMAGE_START], named[KEPT_BIAS]
            # The merged keys' log multiplicity, along the key axis of both parts.
            past_bias, new_bias = (_slot_bias(p, start, kept_bias).to(h.dtype) for p in (slots, new))  # [B], [S]
            masks = (masks[0] + past_bias, masks[1] + new_bias)
        new_kv: list[Tensor] = []
        acts: list[Tensor] = []
        attention: list[Tensor] = []
        for index in plan.layers:
            layer = self.decoder.layers[index]
            past_k, past_v = (named[cache_name(PAST, index, kind)] for kind in ("key", "value"))
            attn = layer.attn(layer.input_norm(h), cos, sin, past_k, past_v, masks, index == plan.attention)
            new_kv += [attn[1], attn[2]]
            attention += list(attn[3:])
            h = h + attn[0]
            h = self._ffn(named, index, h, acts)
        out = self.decoder.logits(h[:, -1]) if plan.head else h
        return (out, *new_kv, *acts, *attention)

    def _ffn(self, named: dict[str, Tensor], index: int, h: Tensor, acts: list[Tensor]) -> Tensor:
        """h + the layer's FFN of its post-attention norm; the activation [S, W] appended to `acts` where the
        plan outputs it."""
        layer = self.decoder.layers[index]
        x = layer.post_norm.fusable(h) if self.fused else layer.post_norm(h)
        mlp = layer.mlp
        weights = (mlp.gate_t, mlp.up_t, mlp.down_t)  # [d, W], [d, W], [W, d]
        if index in self.plan.bound:
            weights = mlp.bound(*(named[ffn_name(index, w)] for w in FFN_WEIGHTS))
        a = mlp.activation(x, weights[0], weights[1])  # [1, S, W]
        if index in self.plan.acts:
            acts.append(a[0])
        return h + mlp.down(a, weights[2])

    def _fused(self, named: dict[str, Tensor], h: Tensor) -> tuple[Tensor, ...]:
        """The ONNX Runtime form: attention by `fused_attention`, the buffers returned with the new entries
        written (present.{i}.*, the past buffers' memory where the runtime binds them so)."""
        plan = self.plan
        positions, valid = named[POSITION_IDS], named[PAST_LENGTH]  # [S], [1]
        seq = h.shape[1]
        # What GroupQueryAttention reads of the lengths, made once for every layer: total - 1 and total.
        lengths = ((valid + seq - 1).to(torch.int32), (valid + seq).to(torch.int32).reshape(()))
        bias = None
        if plan.merge:
            past = named[cache_name(PAST, plan.layers[0], "key")]
            slots = torch.arange(past.shape[2], device=h.device)  # [B]
            new = valid + torch.arange(seq, device=h.device)  # [S]
            start, kept_bias = named[IMAGE_START], named[KEPT_BIAS]
            slot_bias = (_slot_bias(p, start, kept_bias).to(h.dtype) for p in (slots, new))  # [B], [S]
            bias = key_bias(*slot_bias, lengths[1])  # [1, 1, S, total]
        caches = (self.cos_cache, self.sin_cache)
        present: list[Tensor] = []
        acts: list[Tensor] = []
        for index in plan.layers:
            layer = self.decoder.layers[index]
            past = tuple(named[cache_name(PAST, index, kind)] for kind in ("key", "value"))
            x = layer.input_norm.fusable(h)
            # The stack that embeds runs a prompt at 0..S-1; the other takes the kept tokens at their positions.
            out, present_k, present_v = fused_attention(
                layer.attn, x, past, lengths, caches, positions, bias, gapped=not plan.embeds
            )
            present += [present_k, present_v]
            h = self._ffn(named, index, h + out, acts)
        out = self.decoder.norm.fusable(h[:, -1]) @ self.decoder.lm_head_t if plan.head else h
        return (out, *present, *acts)

    def _groups(self) -> int:
        """Query heads per KV head."""
        attn = self.decoder.layers[self.plan.layers[0]].attn
        return attn.q_t.shape[1] // attn.k_t.shape[1]

    def _embed(self, named: dict[str, Tensor]) -> Tensor:
        """The ids' embeddings with the image features spliced in by position: the token at position p is
        image token p - image_start when that lies in 0..n_img-1. The same rule serves the prompt and a
        decode step (whose token lies after the image), so the features stay where the graphs run."""
        assert self.embed_tokens is not None
        ids, features, start = named[INPUT_IDS], named[IMAGE_FEATURES], named[IMAGE_START]  # [1, S], [1, n, d], [1]
        n_img = features.shape[1]
        slot = named[POSITION_IDS] - start  # [S]
        inside = (slot >= 0) & (slot < n_img)
        tokens = nn.functional.embedding(ids, self.embed_tokens)  # [1, S, d]
        # Gathered along the features' own axis: `features[0]` would copy all of them on every step.
        image = features.index_select(1, slot.clamp(0, n_img - 1))  # [1, S, d]
        return torch.where(inside[None, :, None], image.to(tokens.dtype), tokens)


def key_masks(cached: int, seq: int, valid: Tensor, groups: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The additive attention bias of S new tokens' queries (rows ordered (group, token)): over the B cached
    keys [B], 0 for the first `valid`, the dtype's lowest for the rest; over the new keys [g*S, S], causal."""
    lowest = torch.finfo(dtype).min
    zero = torch.zeros((), dtype=dtype)
    filled = torch.arange(cached, device=valid.device) < valid  # [B]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=valid.device).tril().repeat(groups, 1)  # [g*S, S]
    return torch.where(filled, zero, lowest), torch.where(causal, zero, lowest)


def _slot_bias(slots: Tensor, image_start: Tensor, kept_bias: Tensor) -> Tensor:
    """The key bias of the pruned layers' cache positions `slots`: kept_bias [k'] at image_start..+k', else 0."""
    slot = slots - image_start
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


def embed_weight(llava: Any) -> Tensor:
    """The token embedding table [V, d] (held by the stack that embeds)."""
    return backbone_of(llava).embed_tokens(llava).weight
