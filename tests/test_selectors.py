"""The token-selector registry, the greedy rules and the merges, on hand-made inputs."""

from __future__ import annotations

import math

import pytest
import torch

from coreMatching import ConfigError, CoreMatchingConfig
from coreMatching.layers import LayerKV, attention
from coreMatching.merging import prune
from coreMatching.rules import (
    RULES,
    PruneLayerView,
    conditional_dpp,
    core_coverage,
    dpp_kernel,
    max_min,
    picks_as_scores,
)
from coreMatching.selection import stable_topk
from coreMatching.selectors import DEFAULT_MERGE, DEFAULT_SELECTOR, MERGES, SELECTORS
from export.passes import GRAPH_RULES


def test_every_selector_has_a_torch_rule_and_a_graph_rule():
    assert set(SELECTORS) == set(RULES) == set(GRAPH_RULES)
    assert DEFAULT_SELECTOR in SELECTORS and DEFAULT_MERGE in MERGES
    assert CoreMatchingConfig().token_selector == DEFAULT_SELECTOR
    assert {"prompt-frequency", "query-overlap", "fastv", "random", "max-min"} <= set(SELECTORS)


def test_config_refuses_unknown_names_and_auto_for_greedy_rules():
    with pytest.raises(ConfigError, match="token_selector must be one of"):
        CoreMatchingConfig(token_selector="attention")
    with pytest.raises(ConfigError, match="token_merge must be one of"):
        CoreMatchingConfig(token_merge="average")
    with pytest.raises(ConfigError, match="needs a scoring selector"):
        CoreMatchingConfig(token_budget="auto", token_selector="core-coverage")
    with pytest.raises(ConfigError, match="needs a scoring selector"):
        CoreMatchingConfig(token_budget="auto", token_selector="random", token_merge="none")
    assert CoreMatchingConfig.from_name("auto").token_selector == "query-overlap"


def _budgets(d: int, n_img: int, k: int, k_tok: int = 2):
    from coreMatching import Budgets

    return Budgets(
        num_layers=2,
        intermediate_size=d,
        num_image_tokens=n_img,
        token_budget=k,
        auto_range=(1, n_img),
        tokens_per_neuron_set=k_tok,
        core_neurons=2,
        prune_layer=0,
        neuron_layers=(1, 2),
    )


def test_picks_as_scores_rank_the_picks_first():
    scores = picks_as_scores([3, 0, 5], 6, torch.device("cpu"))
    assert scores.tolist() == [2.0, 0.0, 0.0, 3.0, 0.0, 1.0]
    assert stable_topk(scores, 3).tolist() == [3, 0, 5]


def test_core_coverage_covers_before_it_repeats():
    # Tokens 0-2 share neurons {0, 1} (the "background"), token 3 has {2, 3}, token 4 {4, 5}; the last
    # prompt token's core neurons are {4, 5}: the query's object first, then what is not covered yet.
    a = torch.tensor(
        [
            [5.0, 4, 0, 0, 0, 0],
            [5.0, 4, 0, 0, 0, 0],
            [5.0, 4, 0, 0, 0, 0],
            [0.0, 0, 5, 4, 0, 0],
            [0.0, 0, 0, 0, 5, 4],
            [0.0, 0, 0, 0, 5, 4],  # the query token (text, after the image)
        ]
    )
    view = PruneLayerView(a, (0, 5), _budgets(6, 5, 3))
    scores = core_coverage(view, 3)
    assert stable_topk(scores, 3).tolist() == [4, 0, 3]  # query object, then 0 (lower index of the tie), then 3


def test_max_min_picks_the_farthest_points():
    # Two tight clusters and one outlier: the outlier first (farthest from its nearest neighbour), then
    # one token of each cluster.
    a = torch.tensor([[1.0, 0, 0], [0.99, 0.01, 0], [0, 1.0, 0], [0.01, 0.99, 0], [0, 0, 1.0], [1, 1, 1]])
    view = PruneLayerView(a, (0, 5), _budgets(3, 5, 3, k_tok=1))
    # 4 is orthogonal to everything; then 0 (ties at distance 1 go to the lower index); then 2, 1.0 away
    # from both where 3 is 0.99 away from 0.
    assert stable_topk(max_min(view, 3), 3).tolist() == [4, 0, 2]


def test_conditional_dpp_trades_relevance_against_redundancy():
    # Tokens 0 and 1 point nearly the same way; 2 and 3 too, orthogonal to the first two. The query
    # (row 4) shares no core neuron with them (k_tok = 1: each row's largest), so the relevance is
    # uniform and the kernel is the cosines: diversity alone decides.
    a = torch.tensor(
        [
            [4.0, 3.0, 0.0, 0.0],
            [4.0, 3.5, 0.0, 0.0],
            [0.0, 0.0, 4.0, 3.0],
            [0.0, 0.0, 4.0, 3.2],
            [0.0, 3.0, 0.0, 3.0],
        ]
    )
    view = PruneLayerView(a, (0, 4), _budgets(4, 4, 2, k_tok=1))
    kernel = dpp_kernel(view)
    assert torch.allclose(kernel, kernel.T) and torch.all(torch.linalg.eigvalsh(kernel) > -1e-5)  # a valid DPP kernel
    picks = stable_topk(conditional_dpp(view, 2), 2).tolist()
    # One of each direction: never the two near-copies together.
    assert sorted(picks) in ([0, 2], [0, 3], [1, 2], [1, 3])
    # Each pick is the largest residual: the first is the largest diagonal entry of the kernel.
    assert picks[0] == int(torch.argmax(torch.diagonal(kernel)))


def test_conditional_dpp_prefers_the_query_relevant_copy():
    # Two identical directions; only token 1 shares the query's core neuron, so it is kept first.
    a = torch.tensor([[0.0, 5.0, 1.0], [5.0, 0.0, 1.0], [0.0, 0.0, 9.0], [5.0, 0.0, 0.0]])
    view = PruneLayerView(a, (0, 3), _budgets(3, 3, 1, k_tok=1))
    relevance = torch.diagonal(dpp_kernel(view)).sqrt()  # r_j (the cosines' diagonal is 1)
    assert relevance[1] > relevance[0] == relevance[2]
    assert stable_topk(conditional_dpp(view, 1), 1).tolist() == [1]


def test_summary_merge_adds_the_mean_after_the_kept_image_tokens():
    hidden = torch.arange(8 * 2, dtype=torch.float32).view(1, 8, 2)  # S = 8, d = 2; image at 2..6
    out = prune(hidden, (2, 7), torch.tensor([1, 3]), "summary")
    pruned = [2 + 0, 2 + 2, 2 + 4]  # image tokens 0, 2, 4
    assert out.positions.tolist() == [0, 1, 3, 5, sum(pruned) // 3, 7]
    torch.testing.assert_close(out.hidden[0, 4], hidden[0, pruned].mean(dim=0))
    assert out.key_bias is not None and out.key_bias.tolist() == pytest.approx([0, 0, 0, 0, math.log(3), 0])
    assert out.image_bias.tolist() == pytest.approx([0, 0, math.log(3)])


def test_nearest_merge_folds_each_pruned_token_into_its_closest_kept_one():
    hidden = torch.randn(1, 6, 3, generator=torch.Generator().manual_seed(0))  # image at 1..4 (4 tokens)
    kept = torch.tensor([0, 2])
    # overlaps [n_img, k]: token 1 ties (lower kept index wins), token 3 goes to kept token 2.
    groups = torch.tensor([[5.0, 0], [2.0, 2.0], [0.0, 5], [1.0, 3.0]])
    out = prune(hidden, (1, 5), kept, "nearest", groups)
    assert out.positions.tolist() == [0, 1, 3, 5]
    torch.testing.assert_close(out.hidden[0, 1], hidden[0, [1, 2]].mean(dim=0))  # image 0 with image 1
    torch.testing.assert_close(out.hidden[0, 2], hidden[0, [3, 4]].mean(dim=0))  # image 2 with image 3
    assert out.key_bias.tolist() == pytest.approx([0, math.log(2), math.log(2), 0])


def test_mass_merge_keeps_the_kept_states_and_weighs_the_groups():
    hidden = torch.randn(1, 6, 3, generator=torch.Generator().manual_seed(0))  # image at 1..4 (4 tokens)
    kept = torch.tensor([0, 2])
    groups = torch.tensor([[5.0, 0], [2.0, 2.0], [0.0, 5], [1.0, 3.0]])
    mass = prune(hidden, (1, 5), kept, "mass", groups)
    nearest = prune(hidden, (1, 5), kept, "nearest", groups)
    assert mass.positions.tolist() == nearest.positions.tolist() == [0, 1, 3, 5]
    torch.testing.assert_close(mass.hidden, hidden[:, [0, 1, 3, 5]])  # every kept state is its own
    assert mass.key_bias.tolist() == nearest.key_bias.tolist() == pytest.approx([0, math.log(2), math.log(2), 0])


def test_no_merge_when_every_token_is_kept():
    assert (
        CoreMatchingConfig(token_budget=5).resolve(num_layers=4, intermediate_size=8, num_image_tokens=5).token_merge
        == "none"
    )


class _Attn(torch.nn.Module):
    """A one-head attention block with identity projections, as `attention` reads it."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.head_dim = d
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear = torch.nn.Linear(d, d, bias=False)
            torch.nn.init.eye_(linear.weight)
            setattr(self, name, linear)


def test_a_key_bias_of_log_m_weighs_as_m_copies():
    d = 4
    attn = _Attn(d)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, d, generator=g)
    rope = (torch.ones(1, 3, d), torch.zeros(1, 3, d))  # no rotation
    # Key 1 with bias log(3) ...
    biased, cache, _ = attention(attn, x, rope, torch.arange(3), None, None, key_bias=torch.tensor([0, math.log(3), 0]))
    # ... equals key 1 three times, for the last query (which sees every key in both).
    copies = torch.cat([x[:, :2], x[:, 1:2], x[:, 1:2], x[:, 2:]], dim=1)  # [1, 5, d]
    rope5 = (torch.ones(1, 5, d), torch.zeros(1, 5, d))
    plain, _, _ = attention(attn, copies, rope5, torch.arange(5), None, None)
    torch.testing.assert_close(biased[0, -1], plain[0, -1])
    # Decode keeps the bias with the cached keys.
    assert isinstance(cache, LayerKV) and cache.bias is not None and cache.bias[1] == pytest.approx(math.log(3))
    _, cache2, _ = attention(
        attn, x[:, :1], (torch.ones(1, 1, d), torch.zeros(1, 1, d)), torch.tensor([3]), cache, None
    )
    assert cache2.bias.tolist() == pytest.approx([0, math.log(3), 0, 0])
