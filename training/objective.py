"""The training losses of the default model: the answers' cross-entropy and the auxiliary losses that
made a small model learn to read the image (the per-patch heads on the vision tower, the position
read-out, the grounding of decoder heads, the cap on activation scale). Training only: the saved
model is a stock LlavaForConditionalGeneration (docs/training/log.md says what each one measured).
"""

from __future__ import annotations

from typing import Any

import torch

from vqadata import shapes

IGNORE = -100  # label of tokens without loss


def _halves(each: torch.Tensor, on_objects: torch.Tensor) -> torch.Tensor:
    """Mean of per-patch losses where object patches and the rest weigh half each: objects cover a few
    percent of the patches. Either group alone, if the other is empty."""
    if on_objects.any() and (~on_objects).any():
        return (each[on_objects].mean() + each[~on_objects].mean()) / 2
    return each.mean()


class PatchHeads(torch.nn.Module):
    """Per-patch colour / shape / centre classifiers on the vision tower's features, and a linear
    read-out of each image token's row and column from the projector's output (training only)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        sizes = (1 + len(shapes.COLOURS), 1 + len(shapes.SHAPES), 2)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(width, n) for n in sizes)
        self.where = torch.nn.Linear(hidden, 2)  # (row, column), scaled to [-1, 1]

    def loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # features: [B, P, w] patch tokens (CLS dropped); targets: [3, B, P]
        losses = []
        for head, target in zip(self.heads, targets, strict=True):
            each = torch.nn.functional.cross_entropy(head(features).flatten(0, 1), target.flatten(), reduction="none")
            losses.append(_halves(each, target.flatten() > 0))
        return torch.stack(losses).mean()

    def position_loss(self, tokens: torch.Tensor, on_objects: torch.Tensor) -> torch.Tensor:
        """Squared error of a linear read-out of each image token's row and column (row-major, as CLIP
        orders patches), object patches and the rest weighing half each.

        A linear read-out, on the tokens the decoder receives: "left of" is then the sign of a
        difference the decoder can take linearly, from the two objects' tokens its heads read.
        tokens: [B, P, d] projected image tokens; on_objects: [B, P] bool
        """
        p = tokens.shape[1]
        rows, cols = torch.div(torch.arange(p), shapes.GRID, rounding_mode="floor"), torch.arange(p) % shapes.GRID
        half = (shapes.GRID - 1) / 2
        target = (torch.stack([rows, cols], dim=-1).float() - half) / half  # [P, 2] in [-1, 1]
        each = (self.where(tokens) - target).pow(2).mean(-1)  # [B, P]
        return _halves(each, on_objects)


class VisionFeatures:
    """Keeps, from forward hooks, the vision tower's output of the layer the projector reads and the
    projector's output. Hooks, not the model output's fields: transformers renames and reshapes
    those between minor releases (5.24 made the projected features a per-image list)."""

    def __init__(self, model: Any) -> None:
        self.layer = model.config.vision_feature_layer
        self.value: torch.Tensor | None = None  # [B, P, w]
        self.projected: torch.Tensor | None = None  # [B, P, d]
        self.handles = [
            model.model.vision_tower.register_forward_hook(self._keep),
            model.model.multi_modal_projector.register_forward_hook(self._keep_projected),
        ]

    def _keep(self, _module: Any, _inputs: Any, output: Any) -> None:
        self.value = output.hidden_states[self.layer][:, 1:]  # [B, P, w]: CLS dropped, as "default" selects

    def _keep_projected(self, _module: Any, _inputs: Any, output: torch.Tensor) -> None:
        self.projected = output

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class GroundingLoss:
    """The grounding loss: a head of one decoder layer (head 0; head 1 too for a position question's
    second object), at each token that predicts an answer, should put its attention on the patches of
    the objects the answer depends on.

    The attention is recomputed for those few query rows from the layer's inputs (a forward pre-hook),
    so the model keeps its fast attention kernel. Why: the answer loss alone teaches a decoder to find
    a few object patches among 576 only slowly (the first runs plateaued at the answer priors for
    1500 steps); real LLaVA checkpoints learn that grounding from far more data.
    """

    def __init__(self, model: Any, layer: int) -> None:
        decoder = model.model.language_model
        self.attn = decoder.layers[layer].self_attn
        self.inputs: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self.handles = [self.attn.register_forward_pre_hook(self._keep, with_kwargs=True)]
        # The read-out: the hidden state one layer later, through the model's own final norm and LM head.
        readout = min(layer + 1, len(decoder.layers) - 1)
        self.norm, self.head = decoder.norm, model.lm_head
        self.after: torch.Tensor | None = None
        self.handles.append(decoder.layers[readout].register_forward_hook(self._keep_output))

    def _keep_output(self, _module: Any, _inputs: Any, output: Any) -> None:
        self.after = output[0] if isinstance(output, tuple) else output  # [B, S, d]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def readout_loss(self, queries: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each answer's first token, read at the query tokens one layer after the
        grounded head (a logit lens): the grounded head gets a direct reason to carry what it reads.

        queries: [B, T] (-1: no turn); labels: [B, S]
        """
        assert self.after is not None, "the model ran before the loss"
        rows, turns = (queries >= 0).nonzero(as_tuple=True)
        at = queries[rows, turns]  # [Q]
        logits = self.head(self.norm(self.after[rows, at]))  # [Q, V]
        return torch.nn.functional.cross_entropy(logits, labels[rows, at + 1])

    def _keep(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self.inputs = (hidden, kwargs["position_embeddings"], kwargs["attention_mask"])

    def loss(self, queries: torch.Tensor, relevant: torch.Tensor, image_start: int) -> torch.Tensor:
        """Sum over heads h of the mean -log attention mass that head h, at each query token, puts on
        relevant[h]'s patches (a head with no relevant patches for a turn is not grounded there).

        queries: [B, T] token indices (-1: no turn); relevant: [H, B, T, P] bool, for heads 0 .. H-1
        """
        from transformers.models.llama.modeling_llama import rotate_half

        assert self.inputs is not None, "the model ran before the loss"
        hidden, (cos, sin), mask = self.inputs  # hidden: [B, S, d]; cos, sin: [B, S, hd]; mask: [B, 1, S, S]
        hd = self.attn.head_dim
        keys = self.attn.k_proj(hidden).unflatten(-1, (-1, hd))  # [B, S, kv heads, hd], once for every head
        keys = keys * cos[:, :, None] + rotate_half(keys) * sin[:, :, None]
        total = hidden.new_zeros(())
        for head, wanted in enumerate(relevant):
            rows, turns = ((queries >= 0) & wanted.any(-1)).nonzero(as_tuple=True)  # [Q] each
            if len(rows) == 0:
                continue
            at = queries[rows, turns]  # [Q]
            q = self.attn.q_proj(hidden[rows, at])[:, head * hd : (head + 1) * hd]  # [Q, hd]
            q = q * cos[rows, at] + rotate_half(q) * sin[rows, at]
            k = keys[rows, :, head // self.attn.num_key_value_groups]  # [Q, S, hd]: the KV head it reads (GQA)
            logits = (k @ q[:, :, None])[..., 0] * self.attn.scaling + mask[rows, 0, at]  # [Q, S]
            image = torch.log_softmax(logits, dim=-1)[:, image_start : image_start + wanted.shape[-1]]  # [Q, P]
            on_objects = torch.logsumexp(image.masked_fill(~wanted[rows, turns], float("-inf")), dim=-1)  # [Q]
            total = total - on_objects.mean()
        return total


def activation_penalty(streams: list[torch.Tensor], max_rms: float) -> torch.Tensor:
    """Sum over the streams of the mean excess of each token's RMS over `max_rms`. streams: [..., d] each"""
    excess = [torch.relu((h.pow(2).mean(-1) + 1e-6).sqrt() - max_rms).mean() for h in streams]  # eps: finite grad at 0
    return torch.stack(excess).sum()
