"""What a static neuron set's width costs: FFN weights held and bytes a decode step reads (docs/evaluation/static).

    python scripts/static_costs.py [--model llava-1.5-7b] [--ratios 1.0,1.25] [--itemsize 2]

For the per-request set and a static set of each width ratio, at k = 64 with the default configuration:
the FFN weights of the neuron-sparse layers a runtime holds (per-request: the full FFN, which prefill
needs, plus one compacted copy per request; static: the narrowed FFN alone) and the bytes one decode
step reads (`coreMatching.flops.decode_bytes`: weights and the KV cache of the prompt).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from buildformat.geometry import Geometry
from coreMatching import CoreMatchingConfig
from coreMatching.flops import decode_bytes
from models.presets import from_name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava-1.5-7b", help="a model preset name")
    parser.add_argument("--ratios", default="1.0,1.25", help="static width ratios")
    parser.add_argument("--itemsize", type=int, default=2, help="bytes per weight and cache entry (2: fp16)")
    parser.add_argument("--question-tokens", type=int, default=40)
    args = parser.parse_args(argv)
    preset = from_name(args.model)
    geometry = Geometry.from_hf_config(preset.hf_config())
    n_img = 576
    prompt = n_img + args.question_tokens
    budgets = CoreMatchingConfig(token_budget=64).resolve(
        num_layers=geometry.num_layers, intermediate_size=geometry.intermediate_size, num_image_tokens=n_img
    )
    layers = budgets.narrowable_layers
    row = 3 * geometry.hidden_size * args.itemsize  # one neuron's gate, up and down weights
    per_request_step = decode_bytes(geometry, prompt, budgets, args.itemsize)
    print(
        f"{args.model}: {len(layers)} narrowed layers ({layers[0]}..{layers[-1]}), D = {geometry.intermediate_size}, "
        f"N = {budgets.core_neurons}, {args.itemsize}-byte weights, a {prompt}-token prompt\n"
    )
    print("| neurons | width per layer | FFN weights held (MiB) | decode step reads (MiB) | vs per-request |")
    print("|---|---:|---:|---:|---:|")
    held = len(layers) * row * (geometry.intermediate_size + budgets.core_neurons)
    extra = len(layers) * row * budgets.core_neurons  # each request's compacted copy
    print(
        f"| per-request | {budgets.core_neurons} | {held / 2**20:.1f} (+{extra / 2**20:.1f} per extra request) | "
        f"{per_request_step / 2**20:.1f} | 1.00x |"
    )
    for ratio in (float(r) for r in args.ratios.split(",")):
        width = budgets.static_width(1, ratio)
        static = dataclasses.replace(
            budgets,
            neuron_layers=(budgets.neuron_layers[0], budgets.neuron_layers[0]),
            static_layers=tuple(layers),
            static_neurons=width,
        )
        step = decode_bytes(geometry, prompt, static, args.itemsize)
        print(
            f"| static, {ratio:g} x N | {width} | {len(layers) * row * width / 2**20:.1f} | {step / 2**20:.1f} | "
            f"{step / per_request_step:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
