"""The CoreMatching reference against transformers and against an independent recomputation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_inputs, num_image_tokens, tiny_model

from coreMatching import ConfigError, CoreMatchingConfig, CoreMatchingLlava, InputError
from coreMatching.layers import CompactFFN


def hf_greedy(model, ids, pixels, steps):
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            pixel_values=pixels,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            eos_token_id=None,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, ids.shape[1] :].tolist(), torch.stack(out.logits)[:, 0]


def test_dense_config_equals_transformers(tiny):
    """k = n_img and beta = 1 equals the dense model, logits within 1e-4, 32 equal greedy tokens."""
    _, model = tiny
    ids, pixels = make_inputs(model)
    reference = CoreMatchingLlava(model, CoreMatchingConfig.keep_all(num_image_tokens(model)))
    result = reference.generate(ids, pixels, max_new_tokens=32, stop_at_eos=False)
    tokens, logits = hf_greedy(model, ids, pixels, 32)
    assert result.tokens == tokens
    torch.testing.assert_close(result.step_logits, logits, atol=1e-4, rtol=0)
    assert result.kept_image_tokens == list(range(num_image_tokens(model)))


def test_pruned_kv_cache_holds_kept_tokens_only(tiny):
    _, model = tiny
    ids, pixels = make_inputs(model)
    n_img, seq = num_image_tokens(model), ids.shape[1]
    config = CoreMatchingConfig(token_budget=5, prune_layer=1)
    reference = CoreMatchingLlava(model, config)
    state = reference.prefill(ids, pixels)
    lengths = [layer.length for layer in state.kv]
    assert lengths[:2] == [seq, seq]
    assert lengths[2:] == [seq - n_img + 5] * (len(lengths) - 2)
    # Kept tokens keep their original position ids.
    kept_positions = state.kv[3].positions.tolist()
    start = state.image_span[0]
    assert kept_positions == list(range(start)) + [start + i for i in state.kept_image_tokens.tolist()] + list(
        range(start + n_img, seq)
    )
    reference.decode_step(state, 7)
    assert [layer.length for layer in state.kv] == [n + 1 for n in lengths]
    assert state.next_position == seq + 1


def test_a_summary_token_is_cached_after_the_kept_image_tokens(tiny):
    _, model = tiny
    ids, pixels = make_inputs(model)
    n_img, seq = num_image_tokens(model), ids.shape[1]
    state = CoreMatchingLlava(model, CoreMatchingConfig(token_budget=5, prune_layer=1, token_merge="summary")).prefill(
        ids, pixels
    )
    assert [layer.length for layer in state.kv][2:] == [seq - n_img + 5 + 1] * (len(state.kv) - 2)
    start = state.image_span[0]
    pruned = sorted(set(range(n_img)) - set(state.kept_image_tokens.tolist()))
    assert state.kv[3].positions[start + 5].item() == sum(start + i for i in pruned) // len(pruned)
    bias = state.kv[3].bias
    assert bias is not None and bias[start + 5].item() == pytest.approx(np.log(len(pruned)))
    assert state.kv[0].bias is None and float(bias.abs().sum()) == pytest.approx(np.log(len(pruned)))


def _member(a: np.ndarray, k_tok: int) -> np.ndarray:
    threshold = np.sort(a, axis=-1)[:, -k_tok][:, None]
    return (a >= threshold) & (a > 0)


def _top(scores: np.ndarray, k: int) -> list[int]:
    # numpy's stable argsort of the negated scores: ties go to the lower index.
    return sorted(np.argsort(-scores, kind="stable")[:k].tolist())


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral"])
def test_selection_matches_independent_recomputation_from_hooks(name):
    """Kept tokens and core neurons equal a recomputation from hooked FFN activations."""
    model = tiny_model(name)
    ids, pixels = make_inputs(model, seed=3)
    n_img, seq, d_ffn = num_image_tokens(model), ids.shape[1], model.config.text_config.intermediate_size
    config = CoreMatchingConfig(
        token_budget=6, prune_layer=1, neuron_layers=(1, 4), token_selector="prompt-frequency", token_merge="none"
    )
    budgets = config.resolve(num_layers=4, intermediate_size=d_ffn, num_image_tokens=n_img)
    k_tok, n_core = budgets.tokens_per_neuron_set, budgets.core_neurons

    captured: dict[int, np.ndarray] = {}
    layers = model.model.language_model.layers
    hooks = [
        layer.mlp.down_proj.register_forward_pre_hook(
            lambda _m, args, i=i: captured.__setitem__(i, args[0][0].detach().numpy().copy())
        )
        for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids, pixel_values=pixels)  # the stock dense forward
        dense_prune_layer = captured[1]
        state = CoreMatchingLlava(model, config).prefill(ids, pixels)
    finally:
        for hook in hooks:
            hook.remove()

    start = state.image_span[0]
    member = _member(dense_prune_layer, k_tok)  # [S, D]
    core = np.sort(np.argsort(-member.sum(0), kind="stable")[:n_core])
    scores = member[start : start + n_img][:, core].sum(1)
    assert state.kept_image_tokens.tolist() == _top(scores, 6)
    assert state.token_scores.tolist() == scores.tolist()
    assert state.core_neurons[1].tolist() == core.tolist()
    # Later layers saw only the kept tokens (physically removed, not masked).
    for layer in (2, 3):
        assert captured[layer].shape[0] == seq - n_img + 6
        m = _member(captured[layer], k_tok)
        expected = np.sort(np.argsort(-m.sum(0), kind="stable")[:n_core])
        assert state.core_neurons[layer].tolist() == expected.tolist()
        assert len(state.core_neurons[layer]) == n_core


def test_sparse_decode_ffn_equals_dense_with_non_core_neurons_zeroed():
    model = tiny_model("tiny-llama-gqa")
    ids, pixels = make_inputs(model)
    reference = CoreMatchingLlava(model, CoreMatchingConfig(token_budget=4, neuron_ratio=0.4))
    state = reference.prefill(ids, pixels)
    d, d_ffn = model.config.text_config.hidden_size, model.config.text_config.intermediate_size
    n_core = state.budgets.core_neurons
    assert state.compact_ffn, "no neuron-sparse layer"
    x = torch.randn(1, 1, d, generator=torch.Generator().manual_seed(0))
    for index, compact in state.compact_ffn.items():
        mlp = model.model.language_model.layers[index].mlp
        assert compact.gate.shape == (n_core, d) and compact.up.shape == (n_core, d)
        assert compact.down.shape == (d, n_core)
        mask = torch.zeros(d_ffn)
        mask[state.core_neurons[index]] = 1.0
        with torch.no_grad():
            masked = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x) * mask)
            torch.testing.assert_close(compact(x, mlp.act_fn), masked, atol=1e-6, rtol=1e-5)


def test_compact_ffn_is_gathered_once_per_request(monkeypatch):
    """Decode steps reuse the compacted weights: no gather after prefill."""
    model = tiny_model("tiny-llama")
    ids, pixels = make_inputs(model)
    reference = CoreMatchingLlava(model, CoreMatchingConfig(token_budget=4))
    calls = []
    original = CompactFFN.gather.__func__
    monkeypatch.setattr(CompactFFN, "gather", classmethod(lambda cls, *a: calls.append(1) or original(cls, *a)))
    reference.generate(ids, pixels, max_new_tokens=5, stop_at_eos=False)
    assert len(calls) == len(reference.budgets(num_image_tokens(model)).neuron_sparse_layers)


@pytest.mark.parametrize("selector", ["fastv", "random"])
def test_baselines_keep_k_tokens(selector):
    model = tiny_model("tiny-llama")
    ids, pixels = make_inputs(model)
    result = CoreMatchingLlava(model, CoreMatchingConfig(token_budget=5, token_selector=selector)).generate(
        ids, pixels, max_new_tokens=2
    )
    kept = result.kept_image_tokens
    assert len(kept) == 5 and kept == sorted(set(kept)) and kept[0] >= 0 and kept[-1] < num_image_tokens(model)
    if selector == "random":
        again = CoreMatchingLlava(model, CoreMatchingConfig(token_budget=5, token_selector="random", seed=0))
        assert again.generate(ids, pixels, max_new_tokens=1).kept_image_tokens == kept
    else:
        assert kept == _top(result.token_scores.numpy(), 5)


def test_fastv_scores_are_the_attention_received():
    model = tiny_model("tiny-llama")
    ids, pixels = make_inputs(model)
    n_img = num_image_tokens(model)
    captured = {}
    attn = model.model.language_model.layers[2].self_attn
    model.config.text_config._attn_implementation = "eager"
    hook = attn.register_forward_hook(lambda _m, _a, out: captured.__setitem__("w", out[1]))
    try:
        with torch.no_grad():
            model(input_ids=ids, pixel_values=pixels, output_attentions=True)
    finally:
        hook.remove()
        model.config.text_config._attn_implementation = "sdpa"
    received = captured["w"][0].mean(0)[-1]  # [S]: the last prompt token's attention, mean over heads
    start = int((ids[0] == model.config.image_token_id).nonzero()[0])
    state = CoreMatchingLlava(model, CoreMatchingConfig(token_budget=4, token_selector="fastv")).prefill(ids, pixels)
    torch.testing.assert_close(state.token_scores, received[start : start + n_img], atol=1e-6, rtol=1e-5)


def test_auto_budget_is_clamped_and_recorded():
    model = tiny_model("tiny-llama")
    ids, pixels = make_inputs(model)
    config = CoreMatchingConfig(
        token_budget="auto", auto_min_tokens=3, auto_max_tokens=9, token_selector="query-overlap", token_merge="none"
    )
    state = CoreMatchingLlava(model, config).prefill(ids, pixels)
    assert 3 <= state.kept_image_tokens.numel() <= 9
    with pytest.raises(ConfigError, match="scoring selector"):
        CoreMatchingLlava(model, CoreMatchingConfig(token_budget="auto", token_selector="random"))


# -- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"token_budget": 0}, "at least 1"),
        ({"token_budget": 2.5}, "positive integer"),
        ({"token_ratio": 0.0}, r"token_ratio must be in \(0, 1\]"),
        ({"neuron_ratio": 1.5}, r"neuron_ratio must be in \(0, 1\]"),
        ({"prune_layer": -1}, "prune_layer"),
        ({"neuron_layers": (5, 2)}, "neuron_layers"),
        ({"token_selector": "attention"}, "token_selector must be one of"),
    ],
)
def test_config_rejects_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CoreMatchingConfig(**kwargs)


@pytest.mark.parametrize(
    "config, match",
    [
        (CoreMatchingConfig(token_budget=17), "larger than the 16 image tokens"),
        (CoreMatchingConfig(token_budget=4, prune_layer=4), "outside the decoder"),
        (CoreMatchingConfig(token_budget=4, neuron_layers=(1, 9)), "reaches past"),
    ],
)
def test_config_rejected_against_the_model(config, match):
    model = tiny_model("tiny-llama")
    ids, pixels = make_inputs(model)
    with pytest.raises(ConfigError, match=match):
        CoreMatchingLlava(model, config).prefill(ids, pixels)


def test_bad_prompts_are_refused():
    model = tiny_model("tiny-llama")
    ids, pixels = make_inputs(model)
    reference = CoreMatchingLlava(model, CoreMatchingConfig(token_budget=4))
    text_only = ids[:, ids[0] != model.config.image_token_id]
    with pytest.raises(InputError, match="no image placeholder"):
        reference.prefill(text_only, pixels)
    with pytest.raises(InputError, match="batches larger than 1"):
        reference.prefill(ids.repeat(2, 1), pixels)
    with pytest.raises(InputError, match="one image per request"):
        reference.prefill(ids, pixels.repeat(2, 1, 1, 1))
    with pytest.raises(InputError, match="15 image placeholders"):
        reference.prefill(ids[:, 1:].contiguous()[:, [*range(3), *range(4, ids.shape[1] - 1)]], pixels)
    with pytest.raises(InputError, match="max_new_tokens"):
        reference.generate(ids, pixels, max_new_tokens=0)


def test_whole_sparse_decode_step_equals_masked_dense_step():
    """A decode step with compacted weights equals the dense step with the non-core neurons zeroed."""
    model = tiny_model("tiny-mistral")
    ids, pixels = make_inputs(model)
    reference = CoreMatchingLlava(model, CoreMatchingConfig(token_budget=6))
    sparse, masked = reference.prefill(ids, pixels), reference.prefill(ids, pixels)
    layers = model.model.language_model.layers
    hooks = []
    for index, neurons in masked.core_neurons.items():
        mask = torch.zeros(model.config.text_config.intermediate_size)
        mask[neurons] = 1.0
        hooks.append(layers[index].mlp.down_proj.register_forward_pre_hook(lambda _m, a, m=mask: (a[0] * m,)))
    masked.compact_ffn = {}  # the dense FFN, masked by the hooks
    try:
        for token in (5, 9, 11):
            torch.testing.assert_close(
                reference.decode_step(sparse, token), reference.decode_step(masked, token), atol=1e-5, rtol=1e-5
            )
    finally:
        for hook in hooks:
            hook.remove()
