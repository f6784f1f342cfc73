"""The token selectors of `coreMatching.selectors`, as torch functions of the prune layer's tensors.

Every rule returns one float32 score per image token such that the `k` highest (ties to the lower
index, `stable_topk`) are the tokens it keeps. A greedy rule scores its t-th pick `k - t` and every
token it did not pick 0, so the same top-k and the same graph tail (`export.passes.core_tokens`)
serve both kinds.

The rules built on core-neuron sets are exact in float32 whatever order a MatMul sums in (the
scores are integer counts, and coverage weights are small integers times powers of two), so the
graphs pick the same tokens as this reference, ties included. FastV's and max-min's scores are
float sums: they agree unless two candidates are within rounding (~1e-7) of each other, which the
build's validation would report.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from coreMatching.config import Budgets
from coreMatching.selection import matching_scores, prompt_core_neurons, random_scores, token_core_membership

# core-coverage: a neuron that is a core neuron of the query token starts at weight 1 + QUERY_WEIGHT.
COVERAGE_QUERY_WEIGHT = 1.0
# Each time a kept token covers a neuron its weight halves, at most FLOOR_HALVINGS times (to 2^-8):
# weights stay k * 2^-8 for small integers k, so every gain is an exact float32 sum.
COVERAGE_FLOOR_HALVINGS = 8


@dataclass
class PruneLayerView:
    """What a selector reads at the prune layer for one prompt of S tokens."""

    activations: Tensor  # a: [S, D], the FFN activation SiLU(x W_gate) * (x W_up) of every prompt token
    image_span: tuple[int, int]  # [start, stop) of the image tokens
    budgets: Budgets
    last_attention: Tensor | None = None  # [H, S] the last prompt token's attention probabilities (fastv)
    seed: int = 0  # of the random selector

    @functools.cached_property
    def membership(self) -> Tensor:
        """Token-wise core neurons C(i) of every prompt token: bool [S, D]."""
        return token_core_membership(self.activations, self.budgets.tokens_per_neuron_set)

    def image(self, rows: Tensor) -> Tensor:
        start, stop = self.image_span
        return rows[start:stop]

    @property
    def num_image_tokens(self) -> int:
        return self.image_span[1] - self.image_span[0]


Rule = Callable[[PruneLayerView, int], Tensor]
RULES: dict[str, Rule] = {}


def rule(name: str) -> Callable[[Rule], Rule]:
    def add(fn: Rule) -> Rule:
        RULES[name] = fn
        return fn

    return add


@rule("prompt-frequency")
def prompt_frequency(view: PruneLayerView, k: int) -> Tensor:
    """|C(j) ∩ C*|, C* the N neurons that are core for the most prompt tokens. -> [n_img]"""
    b = view.budgets
    core = prompt_core_neurons(view.membership, b.core_neurons, b.neuron_chunks)  # [N]
    return matching_scores(view.image(view.membership), core).float()


@rule("query-overlap")
def query_overlap(view: PruneLayerView, k: int) -> Tensor:
    """|{n: a_jn > 0} ∩ {n: a_qn > 0}| with q the last prompt token (the authors' released rule). -> [n_img]"""
    active = (view.activations > 0).float()  # [S, D]
    return view.image(active) @ active[-1]


@rule("fastv")
def fastv(view: PruneLayerView, k: int) -> Tensor:
    """The last prompt token's attention to each image token, mean over heads. -> [n_img]"""
    assert view.last_attention is not None, "fastv reads the prune layer's attention"
    return view.image(view.last_attention.float().mean(dim=0))


@rule("random")
def random(view: PruneLayerView, k: int) -> Tensor:
    return random_scores(view.num_image_tokens, view.seed).to(view.activations.device)


def picks_as_scores(picks: list[int], n: int, device: torch.device) -> Tensor:
    """The t-th of k picks scores k - t, the rest 0: the top-k of the scores are the picks. -> [n]"""
    scores = torch.zeros(n, device=device)
    scores[torch.tensor(picks, dtype=torch.long, device=device)] = torch.arange(
        len(picks), 0, -1, dtype=torch.float32, device=device
    )
    return scores


@rule("core-coverage")
def core_coverage(view: PruneLayerView, k: int) -> Tensor:
    """Greedy weighted coverage of the image tokens' core neurons, conditioned on the query.

    weight_n starts at 1 + QUERY_WEIGHT * [n in C(q)] (q: the last prompt token, whose output is
    the first answer token). Each step keeps the token whose core neurons carry the most weight
    (ties: lower index), then halves the weight of every neuron it covers (at most FLOOR_HALVINGS
    times). The first picks are the tokens the query's neurons point at; once a kind of patch (the
    background) is covered, its neurons weigh little and the next picks go to what is not covered
    yet: relevance first, then coverage of what the image holds.
    """
    member = view.membership.float()  # [S, D]
    image = view.image(member)  # [n_img, D]
    weight = 1.0 + COVERAGE_QUERY_WEIGHT * member[-1]  # [D]
    halvings = torch.zeros_like(weight)
    taken = torch.zeros(image.shape[0], dtype=torch.bool, device=image.device)
    picks: list[int] = []
    for _ in range(k):
        gain = torch.where(taken, -1.0, image @ weight)  # [n_img], exact (see the module docstring)
        j = int(torch.argmax(gain))  # the first maximum: the lower index on ties
        picks.append(j)
        taken[j] = True
        halve = (image[j] > 0) & (halvings < COVERAGE_FLOOR_HALVINGS)
        weight = torch.where(halve, weight * 0.5, weight)
        halvings = halvings + halve.float()
    return picks_as_scores(picks, image.shape[0], image.device)


def cosine_distance(x: Tensor) -> Tensor:
    """1 - cos(x_i, x_j). x: [n, D] -> [n, n]"""
    unit = x / x.pow(2).sum(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)
    return 1.0 - unit @ unit.T


@rule("max-min")
def max_min(view: PruneLayerView, k: int) -> Tensor:
    """Max-min diversity (DivPrune's greedy): first the token farthest from its nearest neighbour,
    then each step the token farthest from everything kept so far, under the cosine distance of
    the prune layer's FFN activations (DivPrune measures it on the projector's output; here it is
    the same layer every other rule reads)."""
    dist = cosine_distance(view.image(view.activations).float())  # [n, n]
    n = dist.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=dist.device)
    nearest = torch.where(eye, torch.inf, dist).min(dim=1).values  # [n]
    taken = torch.zeros(n, dtype=torch.bool, device=dist.device)
    picks = [int(torch.argmax(nearest))]
    taken[picks[0]] = True
    closest = dist[picks[0]]  # [n] distance to the nearest kept token
    for _ in range(k - 1):
        j = int(torch.argmax(torch.where(taken, -1.0, closest)))
        picks.append(j)
        taken[j] = True
        closest = torch.minimum(closest, dist[j])
    return picks_as_scores(picks, n, dist.device)


# conditional-dpp: a token's quality is exp(DPP_RELEVANCE * share of its core neurons that are the query's);
# the similarity is the squared cosine (a Schur power of a PSD kernel stays PSD): it tells near-copies (cos ~ 1)
# from merely similar patches more sharply than the cosine.
DPP_RELEVANCE = 1.0


def dpp_relevance(view: PruneLayerView) -> Tensor:
    """r_j = exp(DPP_RELEVANCE * |C(j) ∩ C(q)| / k_tok), q the last prompt token. -> [n]"""
    member = view.membership.float()  # [S, D]
    overlap = view.image(member) @ member[-1]  # [n] integer counts, exact
    return torch.exp(DPP_RELEVANCE * overlap / view.budgets.tokens_per_neuron_set)


def dpp_kernel(view: PruneLayerView, relevance: Tensor | None = None) -> Tensor:
    """L = diag(r) K diag(r): K the squared cosines of the image tokens' FFN activations, r their relevance
    (`dpp_relevance`, computed here when not given). -> [n, n]"""
    x = view.image(view.activations).float()  # [n, D]
    unit = x / x.pow(2).sum(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)
    cos = unit @ unit.T
    r = dpp_relevance(view) if relevance is None else relevance  # [n]
    return r[:, None] * (cos * cos) * r[None, :]


@rule("conditional-dpp")
def conditional_dpp(view: PruneLayerView, k: int) -> Tensor:
    """Greedy MAP of a conditional DPP (CDPruner): each step keeps the token that adds the most
    log-determinant to the kept set's kernel, i.e. the largest residual d_j^2 of its kernel row once
    projected off the kept ones (the incremental Cholesky form of Chen et al., 2018). Quality (relevance
    to the query) and diversity (cosine of the activations) multiply in the kernel, so a token is kept
    for being both relevant and unlike what is kept already."""
    relevance = dpp_relevance(view)  # [n]
    kernel = dpp_kernel(view, relevance)  # [n, n]
    n = kernel.shape[0]
    # d^2 starts at L_jj = r_j^2 exactly (a cosine with itself is 1): the kernel's computed diagonal is
    # 1 +- rounding, which would let the summation order of a MatMul decide between equally relevant tokens.
    residual = relevance * relevance  # [n]
    basis = torch.zeros(n, k, device=kernel.device)  # the Cholesky columns of the kept tokens
    taken = torch.zeros(n, dtype=torch.bool, device=kernel.device)
    picks: list[int] = []
    for step in range(k):
        j = int(torch.argmax(torch.where(taken, -1.0, residual)))  # the first maximum: the lower index on ties
        picks.append(j)
        taken[j] = True
        if step == k - 1:
            break
        e = (kernel[j] - basis[:, :step] @ basis[j, :step]) / residual[j].clamp_min(1e-12).sqrt()  # [n]
        basis[:, step] = e
        residual = residual - e * e
    return picks_as_scores(picks, n, kernel.device)


def token_scores(selector: str, view: PruneLayerView, k: int) -> Tensor:
    """The scores of a registered selector. -> float32 [n_img]"""
    try:
        fn = RULES[selector]
    except KeyError:
        raise KeyError(f"no torch rule for token selector {selector!r}") from None
    return fn(view, k)


def merge_group_scores(view: PruneLayerView, kept: Tensor) -> Tensor:
    """|C(i) ∩ C(j)| of every image token i with every kept token j (the `nearest` merge). -> [n_img, k]"""
    member = view.image(view.membership).float()  # [n_img, D]
    return member @ member.index_select(0, kept).T


__all__ = ["RULES", "PruneLayerView", "cosine_distance", "merge_group_scores", "token_scores"]
