"""Analytic FLOPs of dense and CoreMatching inference for a model preset, as a markdown report.

python scripts/flops.py --model llava-1.5-7b --question-tokens 40 --out docs/flops.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from buildformat.geometry import Geometry
from coreMatching import ConfigError, CoreMatchingConfig
from coreMatching.flops import VisionGeometry, compare, selection_flops
from coreMatching.selectors import MERGES, SELECTORS
from models.presets import PresetError, from_name


def render(model: str, question_tokens: int, budgets: list[int], config: CoreMatchingConfig) -> str:
    preset = from_name(model)
    hf = preset.hf_config()
    geometry = Geometry.from_hf_config(hf)
    n_img = preset.num_image_tokens
    prompt = n_img + question_tokens
    resolved = [
        config.with_(token_budget=k).resolve(
            num_layers=geometry.num_layers, intermediate_size=geometry.intermediate_size, num_image_tokens=n_img
        )
        for k in budgets
    ]
    rows = compare(geometry, prompt, resolved)
    vision = VisionGeometry.from_llava_config(hf).flops(n_img)
    b0 = resolved[0]
    lines = [
        f"# Analytic FLOPs: {model}, dense against CoreMatching",
        "",
        "Produced by:",
        "",
        "```",
        f"python scripts/flops.py --model {model} --question-tokens {question_tokens} "
        f"--budgets {','.join(map(str, budgets))} --out docs/flops.md",
        "```",
        "",
        f"Decoder: {geometry.num_layers} layers, d = {geometry.hidden_size}, D = {geometry.intermediate_size}, "
        f"{geometry.num_heads} heads ({geometry.num_kv_heads} KV heads), vocabulary {geometry.vocab_size}. "
        f"Prompt: {n_img} image tokens + {question_tokens} text tokens = {prompt}.",
        f"CoreMatching: prune layer {b0.prune_layer}, rho = {config.token_ratio} (k_tok = {b0.tokens_per_neuron_set}), "
        f"beta = {config.neuron_ratio} (N = {b0.core_neurons} core neurons), neuron-sparse decode in layers "
        f"{b0.neuron_layers[0]}..{b0.neuron_layers[1] - 1}.",
        "",
        "One multiply-add counts 2 FLOPs. Counted: q/k/v/o projections, causal attention (query i reads i + 1 "
        "keys), the three FFN matrices, the LM head on the last token, and the matrix products of the token "
        f"selector and the merge (here the default, `{config.token_selector}` with `{config.token_merge}`; every "
        "selector and merge in the last table). Not counted (under 1% each): norms, RoPE, softmax, SiLU, TopK. "
        "Prefill is dense in neurons; decode is the first new token with the whole prompt cached.",
        "",
        f"The vision tower and projector cost {vision / 1e12:.3f} TFLOPs in every row (it runs before the decoder "
        "and is not pruned); the figures below are the decoder's.",
        "",
        "| kept image tokens k | tokens after prune layer | prefill dense (TFLOPs) | prefill CoreMatching (TFLOPs) "
        "| prefill ratio | decode dense (GFLOPs/token) | decode CoreMatching (GFLOPs/token) | decode ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.token_budget} | {r.kept_tokens} | {r.prefill_dense / 1e12:.3f} "
            f"| {r.prefill_corematching / 1e12:.3f} "
            f"| {r.prefill_ratio:.2f}x | {r.decode_dense / 1e9:.2f} | {r.decode_corematching / 1e9:.2f} "
            f"| {r.decode_ratio:.2f}x |"
        )
    lines += [
        "",
        "With vision included, the end-to-end prefill ratio at each budget is "
        + ", ".join(
            f"k = {r.token_budget}: {(r.prefill_dense + vision) / (r.prefill_corematching + vision):.2f}x" for r in rows
        )
        + ".",
        "",
        *selector_costs(geometry, prompt, config, n_img, k=64),
    ]
    return "\n".join(lines)


def selector_costs(geometry: Geometry, prompt: int, config: CoreMatchingConfig, n_img: int, k: int) -> list[str]:
    """What each selector and merge adds at budget k: FLOPs at the prune layer and the fp16 KV cache of the prompt."""
    dense_kv = geometry.cache_bytes(prompt, itemsize=2)  # fp16
    lines = [
        f"## The token selector and the merge at k = {k}",
        "",
        f"The selection and merge FLOPs run once per prompt, at the prune layer; the KV cache is the prompt's "
        f"(fp16; dense: {dense_kv / 2**20:.1f} MiB). Their measured milliseconds in a pruned prefill (ONNX Runtime, "
        "CPU, `llava-7b-shape`): [benchmarks/selectors.md](benchmarks/selectors.md).",
        "",
        "| selector | merge | selection + merge (GFLOPs) | share of the pruned prefill | prompt KV cache (MiB) |",
        "|---|---|---:|---:|---:|",
    ]
    for name in SELECTORS:
        for merge in MERGES:
            b = config.with_(token_budget=k, token_selector=name, token_merge=merge).resolve(
                num_layers=geometry.num_layers, intermediate_size=geometry.intermediate_size, num_image_tokens=n_img
            )
            extra = selection_flops(geometry, prompt, b)
            prefill = compare(geometry, prompt, [b])[0].prefill_corematching
            kv = geometry.cache_bytes(prompt, 2, b.prune_layer, kept=k, merged=b.merged_tokens)
            lines.append(f"| {name} | {merge} | {extra / 1e9:.2f} | {100 * extra / prefill:.2f}% | {kv / 2**20:.1f} |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava-1.5-7b", help="a model preset name (default llava-1.5-7b)")
    parser.add_argument("--question-tokens", type=int, default=40, help="text tokens in the prompt (default 40)")
    parser.add_argument("--budgets", default="576,192,128,64,32", help="comma-separated token budgets k")
    parser.add_argument("--prune-layer", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the markdown report here (default: print it)")
    args = parser.parse_args(argv)
    try:
        budgets = [int(k) for k in args.budgets.split(",")]
        report = render(args.model, args.question_tokens, budgets, CoreMatchingConfig(prune_layer=args.prune_layer))
    except (ValueError, ConfigError, PresetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
