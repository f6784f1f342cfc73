"""The selection rules on hand-made inputs."""

from __future__ import annotations

import math

import pytest
import torch

from coreMatching import CoreMatchingConfig
from coreMatching.selection import (
    elbow_count,
    keep_indices,
    matching_scores,
    prompt_core_neurons,
    stable_topk,
    token_core_membership,
)


def test_stable_topk_breaks_ties_by_lower_index():
    scores = torch.tensor([3, 5, 5, 1, 5, 3])
    assert stable_topk(scores, 4).tolist() == [1, 2, 4, 0]


def test_membership_keeps_only_positive_top_entries():
    a = torch.tensor([[5.0, -1.0, 3.0, 3.0, 0.0], [-2.0, -3.0, -1.0, -4.0, -5.0]])
    member = token_core_membership(a, 2)
    # Row 0: threshold 3 (the 2nd largest), so the tie at 3 joins; row 1: nothing positive.
    assert member.tolist() == [[True, False, True, True, False], [False] * 5]


def test_core_neurons_and_scores():
    member = torch.tensor(
        [[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1]],
        dtype=torch.bool,
    )
    core = prompt_core_neurons(member, 2)  # counts 3, 2, 2, 1: neuron 0 then the tie 1 < 2
    assert core.tolist() == [0, 1]
    assert matching_scores(member[2:], core).tolist() == [1, 1]


def test_keep_indices_keeps_all_text():
    assert keep_indices(2, 4, 8, torch.tensor([1, 3])).tolist() == [0, 1, 3, 5, 6, 7]


def _farthest_from_chord(curve: list[float]) -> int:
    """Brute force: perpendicular distance of every point from the chord."""
    (x0, y0), (x1, y1) = (0, curve[0]), (len(curve) - 1, curve[-1])
    norm = math.hypot(x1 - x0, y1 - y0)
    dist = [abs((y1 - y0) * x - (x1 - x0) * y + x1 * y0 - y1 * x0) / norm for x, y in enumerate(curve)]
    return dist.index(max(dist))


def test_elbow_on_a_step_keeps_the_high_plateau():
    scores = torch.tensor([1.0] * 20 + [10.0] * 5)[torch.randperm(25, generator=torch.Generator().manual_seed(0))]
    assert elbow_count(scores, 1, 25) == 5


def test_elbow_on_a_decay_matches_brute_force():
    curve = [100 * 0.8**i for i in range(40)]
    expected = _farthest_from_chord(curve)
    assert 1 < expected < 39
    assert elbow_count(torch.tensor(curve), 1, 40) == expected


def test_elbow_is_clamped():
    step = torch.tensor([10.0] * 5 + [1.0] * 20)
    assert elbow_count(step, 8, 25) == 8
    assert elbow_count(step, 1, 3) == 3
    assert elbow_count(torch.linspace(10, 0, 30), 4, 30) == 4  # a straight line has no elbow


@pytest.mark.parametrize("depth, expected", [(32, (6, 27)), (40, (8, 34)), (4, (1, 3)), (1, (0, 1))])
def test_neuron_range_scales_with_depth(depth, expected):
    budgets = CoreMatchingConfig(prune_layer=0).resolve(num_layers=depth, intermediate_size=100, num_image_tokens=576)
    assert budgets.neuron_layers == expected


def test_budgets_of_llava_7b():
    budgets = CoreMatchingConfig().resolve(num_layers=32, intermediate_size=11008, num_image_tokens=576)
    assert budgets.tokens_per_neuron_set == 1101 and budgets.core_neurons == 4404
    assert (budgets.token_budget, budgets.core_neurons) != (576, 11008)
    every = CoreMatchingConfig.keep_all(576).resolve(num_layers=32, intermediate_size=11008, num_image_tokens=576)
    assert (every.token_budget, every.core_neurons) == (576, 11008)


def test_chunked_core_neurons_keep_each_chunks_share():
    # counts: neuron n is core for n % 7 tokens; 10 neurons in 2 chunks of 5, N = 5 -> 3 + 2.
    member = torch.zeros(7, 10, dtype=torch.bool)
    for n in range(10):
        member[: n % 7, n] = True
    from coreMatching.selection import chunk_bounds, chunk_sizes

    assert chunk_sizes(5, 2) == [3, 2] and chunk_bounds(10, 2) == [(0, 5), (5, 10)]
    assert prompt_core_neurons(member, 5, chunks=2).tolist() == [2, 3, 4, 5, 6]
    assert prompt_core_neurons(member, 5).tolist() == [2, 3, 4, 5, 6]
    assert prompt_core_neurons(member, 4, chunks=2).tolist() == [3, 4, 5, 6]
    assert prompt_core_neurons(member, 4).tolist() == [3, 4, 5, 6]
    # A chunk with only low counts still keeps its share.
    member2 = member.clone()
    member2[:, 5:] = False
    assert prompt_core_neurons(member2, 4, chunks=2).tolist() == [3, 4, 5, 6]
    assert prompt_core_neurons(member2, 4).tolist() == [1, 2, 3, 4]
