"""CoreMatching on a Hugging Face `LlavaForConditionalGeneration` (docs/method.md).

`CoreMatchingLlava(model, config)` runs the method with the model's own
weights:

- prefill: every layer up to the prune layer sees the whole prompt; at the
  prune layer the configured token selector (`coreMatching.rules`) picks `k`
  image tokens, kept in their original order; the others are physically
  removed from the hidden states (or merged, `coreMatching.merging`), so later
  layers compute and cache only the kept tokens, which keep their original
  position ids;
- the core neurons of every neuron-sparse layer are counted during prefill
  and that layer's FFN weights are gathered once into compact tensors;
- decode: every step runs the neuron-sparse layers with the compact weights.

The module reads the model by attribute and imports torch only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from coreMatching.backbones import Backbone, backbone_of
from coreMatching.config import Budgets, CoreMatchingConfig
from coreMatching.errors import InputError
from coreMatching.layers import CompactFFN, LayerKV, attention, ffn_dense
from coreMatching.merging import prune
from coreMatching.rules import PruneLayerView, merge_group_scores, token_scores
from coreMatching.selection import elbow_count, prompt_core_neurons, stable_topk, token_core_membership
from coreMatching.selectors import GROUPING_MERGES, SELECTORS

log = logging.getLogger(__name__)


@dataclass
class PrefillState:
    """Everything a request carries from prefill into decoding."""

    budgets: Budgets
    image_span: tuple[int, int]  # [start, stop) of the image tokens in the prompt
    kept_image_tokens: Tensor  # [k] ascending indices into the image's tokens
    token_scores: Tensor  # [n_img] the selector's score of every image token
    core_neurons: dict[int, Tensor]  # neuron-sparse layer -> [N] ascending
    compact_ffn: dict[int, CompactFFN]  # neuron-sparse layer -> weights gathered once
    kv: list[LayerKV]  # per layer; layers after the prune layer hold S - n_img + k tokens (+1 with a summary)
    logits: Tensor  # [V] logits of the last prompt token
    next_position: int  # position id of the next token (= prompt length: positions are not renumbered)
    image_bias: Tensor | None = None  # [k'] key bias of the image slots after a merge (None: no merge)


@dataclass
class GenerationResult:
    """What `generate` returns (README: Python API)."""

    tokens: list[int]  # generated ids
    kept_image_tokens: list[int]  # indices into the image's tokens, ascending
    core_neurons: dict[int, list[int]]  # layer -> ascending neuron indices
    prefill_logits: Tensor  # [V] logits of the last prompt token
    step_logits: Tensor  # [len(tokens), V] the logits each generated token was chosen from
    token_scores: Tensor  # [n_img]
    kv_lengths: list[int] = field(default_factory=list)  # cached tokens per layer after prefill


class CoreMatchingLlava:
    """The CoreMatching reference on a `transformers.LlavaForConditionalGeneration`."""

    def __init__(self, model: Any, config: CoreMatchingConfig | None = None) -> None:
        self.model = model.eval()
        self.config = config or CoreMatchingConfig()
        self.backbone: Backbone = backbone_of(model)
        text = model.config.text_config
        self.num_layers: int = text.num_hidden_layers
        self.window = self.backbone.window(text)
        self.image_token_id: int = model.config.image_token_id
        self.selector = SELECTORS[self.config.token_selector]

    # -- pieces -------------------------------------------------------------------

    def budgets(self, num_image_tokens: int) -> Budgets:
        text = self.model.config.text_config
        return self.config.resolve(
            num_layers=self.num_layers,
            intermediate_size=text.intermediate_size,
            num_image_tokens=num_image_tokens,
        )

    @torch.inference_mode()
    def image_features(self, pixel_values: Tensor) -> Tensor:
        """The projected image tokens. pixel_values: [1, 3, H, W] -> [n_img, d]"""
        if pixel_values.dim() != 4 or pixel_values.shape[0] != 1:
            raise InputError(
                f"pixel_values must be [1, 3, H, W] (one image per request), got {list(pixel_values.shape)}"
            )
        weight = self.backbone.embed_tokens(self.model).weight
        out = self.model.model.get_image_features(pixel_values=pixel_values.to(weight.device, weight.dtype))
        features = out.pooler_output if hasattr(out, "pooler_output") else out
        return features[0]

    def image_span(self, input_ids: Tensor, num_image_tokens: int) -> tuple[int, int]:
        """[start, stop) of the one contiguous run of image placeholders in the prompt."""
        where = (input_ids[0].cpu() == self.image_token_id).nonzero().flatten()
        if where.numel() == 0:
            raise InputError(
                f"the prompt has no image placeholder (token id {self.image_token_id}); put '<image>' in the "
                "prompt and expand it with the model's processor"
            )
        start, stop = int(where[0]), int(where[-1]) + 1
        if where.numel() != stop - start:
            raise InputError("the image placeholders are not contiguous; one image per prompt is supported")
        if stop - start != num_image_tokens:
            raise InputError(
                f"the prompt has {stop - start} image placeholders but the image gives {num_image_tokens} tokens; "
                "expand '<image>' with the model's processor"
            )
        return start, stop

    def _select_image_tokens(self, view: PruneLayerView) -> tuple[Tensor, Tensor]:
        """Scores every image token at the prune layer and keeps k of them. -> (kept [k] ascending, scores [n_img])"""
        budgets = view.budgets
        if budgets.token_budget == "auto":
            scores = token_scores(budgets.token_selector, view, view.num_image_tokens)
            k = elbow_count(scores, *budgets.auto_range)
        else:
            k = budgets.token_budget
            scores = token_scores(budgets.token_selector, view, k)
        kept = stable_topk(scores, k).sort().values
        return kept, scores

    # -- the request ----------------------------------------------------------------

    @torch.inference_mode()
    def prefill(
        self, input_ids: Tensor, pixel_values: Tensor | None = None, image_features: Tensor | None = None
    ) -> PrefillState:
        """Runs the prompt through the decoder with token pruning.

        input_ids: [1, S]; either pixel_values [1, 3, H, W] or the projected image_features [n_img, d]
        (from `image_features`, when the caller times the vision tower on its own).
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise InputError(
                f"input_ids must be [1, S]: batches larger than 1 are not supported, got {list(input_ids.shape)}"
            )
        if (pixel_values is None) == (image_features is None):
            raise InputError("pass exactly one of pixel_values and image_features")
        features = self.image_features(pixel_values) if image_features is None else image_features  # [n_img, d]
        n_img = features.shape[0]
        budgets = self.budgets(n_img)
        span = self.image_span(input_ids, n_img)
        seq_len = input_ids.shape[1]

        embed = self.backbone.embed_tokens(self.model)
        h = embed(input_ids.to(embed.weight.device)).clone()  # [1, S, d]
        h[0, span[0] : span[1]] = features.to(h.dtype)
        device = h.device
        positions = torch.arange(seq_len, device=device)  # [S]; pruning keeps the original ids

        rotary = self.backbone.rotary_emb(self.model)
        kv: list[LayerKV] = []
        core_neurons: dict[int, Tensor] = {}
        compact: dict[int, CompactFFN] = {}
        kept = torch.arange(n_img, device=device)
        scores = torch.zeros(n_img, device=device)
        key_bias: Tensor | None = None  # [T] log multiplicity of each key after a merge
        image_bias: Tensor | None = None
        for index, layer in enumerate(self.backbone.layers(self.model)):
            rope = rotary(h, positions[None])
            want_probs = index == budgets.prune_layer and self.selector.needs_attention
            attn_out, cache, probs = attention(
                layer.self_attn, layer.input_layernorm(h), rope, positions, None, self.window, want_probs, key_bias
            )
            kv.append(cache)
            h = h + attn_out
            ffn_out, a = ffn_dense(layer.mlp, layer.post_attention_layernorm(h))  # a: [1, T, D]
            h = h + ffn_out

            if budgets.is_neuron_sparse(index):
                member = token_core_membership(a[0], budgets.tokens_per_neuron_set)
                core_neurons[index] = prompt_core_neurons(member, budgets.core_neurons, budgets.neuron_chunks)
                compact[index] = CompactFFN.gather(layer.mlp, core_neurons[index])
            if index == budgets.prune_layer:
                view = PruneLayerView(a[0], span, budgets, probs, self.config.seed)
                kept, scores = self._select_image_tokens(view)
                groups = merge_group_scores(view, kept) if budgets.token_merge in GROUPING_MERGES else None
                pruned = prune(h, span, kept, budgets.token_merge, groups)  # physically drop (or merge) the rest
                h, positions, key_bias, image_bias = pruned.hidden, pruned.positions, pruned.key_bias, pruned.image_bias

        logits = self._logits(h[:, -1:])
        log.debug("prefill: %d tokens, kept %d of %d image tokens", seq_len, kept.numel(), n_img)
        return PrefillState(
            budgets=budgets,
            image_span=span,
            kept_image_tokens=kept,
            token_scores=scores,
            core_neurons=core_neurons,
            compact_ffn=compact,
            kv=kv,
            logits=logits,
            next_position=seq_len,
            image_bias=image_bias,
        )

    @torch.inference_mode()
    def decode_step(self, state: PrefillState, token_id: int) -> Tensor:
        """Appends one token to the request and returns the next logits [V]. Updates `state.kv`."""
        embed = self.backbone.embed_tokens(self.model)
        device = embed.weight.device
        h = embed(torch.tensor([[token_id]], device=device))  # [1, 1, d]
        position = torch.tensor([state.next_position], device=device)
        rope = self.backbone.rotary_emb(self.model)(h, position[None])
        for index, layer in enumerate(self.backbone.layers(self.model)):
            attn_out, state.kv[index], _ = attention(
                layer.self_attn, layer.input_layernorm(h), rope, position, state.kv[index], self.window
            )
            h = h + attn_out
            x = layer.post_attention_layernorm(h)
            if index in state.compact_ffn:
                h = h + state.compact_ffn[index](x, layer.mlp.act_fn)
            else:
                h = h + ffn_dense(layer.mlp, x)[0]
        state.next_position += 1
        return self._logits(h)

    def _logits(self, h: Tensor) -> Tensor:
        # h: [1, 1, d] -> [V]
        h = self.backbone.final_norm(self.model)(h)
        return self.backbone.lm_head(self.model)(h)[0, -1].float()

    def stream(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None,
        max_new_tokens: int,
        stop_at_eos: bool = True,
        image_features: Tensor | None = None,
    ) -> Iterator[tuple[int, Tensor, PrefillState]]:
        """Greedy decoding, one (token, its logits, state) at a time. Ties go to the lower token id."""
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        state = self.prefill(input_ids, pixel_values, image_features)
        eos = self._eos_ids() if stop_at_eos else set()
        logits = state.logits
        for step in range(max_new_tokens):
            token = int(torch.argmax(logits))  # first maximum, as ONNX ArgMax
            yield token, logits, state
            if token in eos or step == max_new_tokens - 1:
                return
            logits = self.decode_step(state, token)

    def generate(
        self, input_ids: Tensor, pixel_values: Tensor, max_new_tokens: int = 32, stop_at_eos: bool = True
    ) -> GenerationResult:
        tokens: list[int] = []
        step_logits: list[Tensor] = []
        state: PrefillState | None = None
        kv_lengths: list[int] = []
        for token, logits, state in self.stream(input_ids, pixel_values, max_new_tokens, stop_at_eos):
            if not tokens:
                kv_lengths = [layer.length for layer in state.kv]
            tokens.append(token)
            step_logits.append(logits)
        assert state is not None
        return GenerationResult(
            tokens=tokens,
            kept_image_tokens=state.kept_image_tokens.tolist(),
            core_neurons={layer: neurons.tolist() for layer, neurons in state.core_neurons.items()},
            prefill_logits=state.logits.cpu(),
            step_logits=torch.stack(step_logits).cpu(),
            token_scores=state.token_scores.cpu(),
            kv_lengths=kv_lengths,
        )

    def _eos_ids(self) -> set[int]:
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(self.model.config.text_config, "eos_token_id", None)
        if eos is None:
            return set()
        return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
