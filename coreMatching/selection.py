"""The primitives of CoreMatching's selections (docs/method.md), as pure tensor functions.

Every selection breaks ties by the lower index first, which is what ONNX
`TopK` specifies: the reference sorts with a stable descending sort so that
an exported graph and this module pick the same sets.
"""

from __future__ import annotations

import torch
from torch import Tensor


def stable_topk(scores: Tensor, k: int) -> Tensor:
    """Indices of the `k` largest entries of the last axis, best first, ties by lower index.

    scores: [..., n] -> [..., k] (int64)
    """
    if not 0 <= k <= scores.shape[-1]:
        raise ValueError(f"k={k} is outside 0..{scores.shape[-1]}")
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :k]


def token_core_membership(activations: Tensor, tokens_per_set: int) -> Tensor:
    """Token-wise core neurons C(i) in threshold form.

    member[i, n] = a[i, n] >= (k_tok-th largest of a[i]) and a[i, n] > 0.
    activations: [T, D] (the FFN activation SiLU(x W_gate) * (x W_up)) -> bool [T, D]
    """
    threshold = torch.topk(activations, tokens_per_set, dim=-1).values[..., -1:]  # [T, 1]
    return (activations >= threshold) & (activations > 0)


def prompt_core_neurons(membership: Tensor, num_core: int, chunks: int = 1) -> Tensor:
    """Core neurons of the prompt C*: the `num_core` neurons that are token-wise core for most tokens.

    With chunks > 1 the neurons are split into `chunks` contiguous ranges and each range keeps its
    share of `num_core` (as `chunk_sizes` splits them): what a TensorRT build does when N is beyond
    TopK's limit (K < 3840).
    membership: bool [T, D] -> int64 [N], ascending.
    """
    counts = membership.sum(dim=0)  # f(n): [D]
    if chunks == 1:
        return stable_topk(counts, num_core).sort().values
    picked = []
    for (start, stop), share in zip(chunk_bounds(counts.shape[0], chunks), chunk_sizes(num_core, chunks), strict=True):
        picked.append(stable_topk(counts[start:stop], share).sort().values + start)
    return torch.cat(picked)


def chunk_sizes(total: int, chunks: int) -> list[int]:
    """`total` split into `chunks` near-equal parts, the larger ones first (as numpy.array_split)."""
    base, extra = divmod(total, chunks)
    return [base + (1 if i < extra else 0) for i in range(chunks)]


def chunk_bounds(length: int, chunks: int) -> list[tuple[int, int]]:
    """[start, stop) of each of `chunks` contiguous near-equal ranges of `length`."""
    bounds, start = [], 0
    for size in chunk_sizes(length, chunks):
        bounds.append((start, start + size))
        start += size
    return bounds


def matching_scores(image_membership: Tensor, core_neurons: Tensor) -> Tensor:
    """|C(j) ∩ C*| for every image token j.

    image_membership: bool [n_img, D]; core_neurons: int64 [N] -> int64 [n_img]
    """
    return image_membership.index_select(1, core_neurons).sum(dim=-1)


def random_scores(num_image_tokens: int, seed: int) -> Tensor:
    """A seeded random permutation used as scores: keeping the top-k keeps k random tokens."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_image_tokens, generator=generator).to(torch.float32)


def elbow_count(scores: Tensor, lo: int, hi: int) -> int:
    """Adaptive budget: how many tokens to keep from the elbow of the sorted score curve.

    Sorts the scores in descending order and finds the point farthest from the
    chord joining the first and last points (first such point on ties) and
    keeps the tokens ranked above it (for a step curve, exactly the high
    plateau), at least one, clamped to [lo, hi]. The farthest point
    does not depend on how either axis is scaled, so no normalisation is needed.
    scores: [n] -> count
    """
    curve = torch.sort(scores.to(torch.float64), descending=True).values  # [n]
    n = curve.shape[0]
    if n <= 2:
        count = n
    else:
        x = torch.arange(n, dtype=torch.float64)
        # Twice the signed area of the triangle (first, last, point): proportional
        # to the point's distance from the chord.
        cross = (x[-1] - x[0]) * (curve[0] - curve) - (x[0] - x) * (curve[-1] - curve[0])
        distance = cross.abs()
        # A straight line (or a flat curve) has no elbow: rounding noise (scores may be float32) must not pick one.
        scale = (x[-1] - x[0]) * (curve[0] - curve[-1]).abs()
        count = 1 if distance.max() <= 1e-6 * scale else max(1, int(torch.argmax(distance).item()))
    return max(lo, min(hi, count))


def keep_indices(image_start: int, num_image_tokens: int, seq_len: int, kept_image: Tensor) -> Tensor:
    """Sequence positions that survive the prune layer: every text token and the kept image tokens.

    kept_image: int64 [k] ascending, indices into the image's tokens -> int64 [S - n_img + k], ascending
    """
    device = kept_image.device
    before = torch.arange(0, image_start, device=device)
    after = torch.arange(image_start + num_image_tokens, seq_len, device=device)
    return torch.cat([before, kept_image + image_start, after])
