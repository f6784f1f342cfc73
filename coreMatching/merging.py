"""After the selection: what the later layers see in place of the whole prompt (docs/method.md).

`prune` returns the hidden states, position ids and per-key attention biases of the tokens that
layers after the prune layer compute and cache:

- `none`: the text tokens and the kept image tokens, in their order, with their position ids;
- `summary`: the same plus one token right after the kept image tokens, the mean of the pruned
  tokens' hidden states at the floor of their mean position, with key bias log(m) for m pruned;
- `nearest`: every pruned image token joins the kept token whose core neurons it shares most (ties:
  the lower kept index); a kept token becomes the mean of its group, with key bias log(group size);
- `mass`: the same groups, but a kept token keeps its own hidden state: only its weight, the key
  bias log(group size), says how many tokens it stands for. Averaging blurs a kept object token
  with the background patches it absorbs; here its content stays its own while the attention mass
  the group drew stays with it.

A key bias log(m) makes a key weigh in every later softmax (prefill and decode) as m copies of
itself: the attention the pruned tokens drew stays with their representative instead of moving to
the kept tokens. Text tokens and kept tokens that absorbed nothing have bias 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from coreMatching.selection import keep_indices


@dataclass(frozen=True)
class Pruned:
    """What layers after the prune layer start from."""

    hidden: Tensor  # [1, S'', d]
    positions: Tensor  # [S''] int64, original position ids (RoPE is not renumbered)
    key_bias: Tensor | None  # [S''] float32 log multiplicity of each key; None: no merge (all zero)
    image_bias: Tensor | None  # [k'] the key bias of the image slots (k' = k, or k + 1 with a summary)


def prune(hidden: Tensor, span: tuple[int, int], kept: Tensor, merge: str, groups: Tensor | None = None) -> Pruned:
    """hidden: [1, S, d] after the prune layer; kept: [k] ascending image-token indices; groups: for
    `nearest` and `mass`, [n_img, k] the core-neuron overlap of every image token with every kept one."""
    start, stop = span
    n_img, seq = stop - start, hidden.shape[1]
    keep = keep_indices(start, n_img, seq, kept)  # [S - n_img + k]
    positions = torch.arange(seq, device=hidden.device)
    kept_h = hidden.index_select(1, keep)  # [1, S', d]
    if merge == "none" or kept.numel() == n_img:
        return Pruned(kept_h, keep, None, None)
    pruned = torch.ones(n_img, dtype=torch.bool, device=hidden.device)
    pruned[kept] = False
    k = kept.numel()
    if merge == "summary":
        m = int(pruned.sum())
        image_h = hidden[0, start:stop]  # [n_img, d]
        summary = (image_h * pruned[:, None].to(image_h.dtype)).sum(dim=0) / max(m, 1)  # [d]
        where = int((positions[start:stop] * pruned).sum()) // max(m, 1)
        slot = start + k  # right after the kept image tokens
        bias = torch.zeros(keep.numel() + 1, device=hidden.device)
        bias[slot] = torch.log(torch.tensor(float(m)))
        h = torch.cat([kept_h[:, :slot], summary[None, None].to(kept_h.dtype), kept_h[:, slot:]], dim=1)
        pos = torch.cat([keep[:slot], torch.tensor([where], device=keep.device), keep[slot:]])
        return Pruned(h, pos, bias, bias[start : start + k + 1].clone())
    if merge in ("nearest", "mass"):
        assert groups is not None, f"the {merge} merge needs the overlaps of the image tokens with the kept ones"
        owner = torch.argmax(groups, dim=1)  # [n_img] the first maximum: the lower kept index on ties
        owner[kept] = torch.arange(k, device=owner.device)  # a kept token heads its own group
        member = torch.zeros(k, n_img, dtype=hidden.dtype, device=hidden.device)
        member[owner, torch.arange(n_img, device=owner.device)] = 1.0  # [k, n_img]
        size = member.sum(dim=1)  # [k] >= 1
        h = kept_h
        if merge == "nearest":
            h = kept_h.clone()
            h[0, start : start + k] = (member @ hidden[0, start:stop]) / size[:, None]  # [k, d] the group means
        bias = torch.zeros(keep.numel(), device=hidden.device)
        bias[start : start + k] = torch.log(size.float())
        return Pruned(h, keep, bias, bias[start : start + k].clone())
    raise ValueError(f"unknown merge {merge!r}")
