"""Command-line flags for CoreMatching settings, shared by every entry point that takes them."""

from __future__ import annotations

import argparse

from coreMatching.config import CoreMatchingConfig
from coreMatching.errors import ConfigError
from coreMatching.selectors import MERGES, SELECTORS


def parse_token_budget(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"token budget must be an integer or 'auto', got {text!r}") from None


def parse_layer_range(text: str) -> tuple[int, int]:
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(start), int(stop)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"layer range must be START:STOP (half-open, e.g. 6:27), got {text!r}"
        ) from None


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    d = CoreMatchingConfig()
    group = parser.add_argument_group("CoreMatching")
    group.add_argument(
        "--token-budget",
        type=parse_token_budget,
        default=d.token_budget,
        help=f"image tokens kept after the prune layer, or 'auto' (default {d.token_budget})",
    )
    group.add_argument(
        "--token-ratio",
        type=float,
        default=d.token_ratio,
        help=f"rho: share of each token's activations that are its core neurons (default {d.token_ratio})",
    )
    group.add_argument(
        "--neuron-ratio",
        type=float,
        default=d.neuron_ratio,
        help=f"beta: share of neurons that are core neurons of the prompt (default {d.neuron_ratio})",
    )
    group.add_argument(
        "--prune-layer",
        type=int,
        default=d.prune_layer,
        help=f"decoder layer after which image tokens are pruned (default {d.prune_layer})",
    )
    group.add_argument(
        "--neuron-layers",
        type=parse_layer_range,
        default=None,
        help="half-open range A:B of neuron-sparse decode layers (default: 6:27 scaled to the depth)",
    )
    group.add_argument(
        "--token-selector",
        choices=tuple(SELECTORS),
        default=d.token_selector,
        metavar="NAME",
        help=f"the rule that picks the kept image tokens: {', '.join(SELECTORS)} (default {d.token_selector})",
    )
    group.add_argument(
        "--token-merge",
        choices=tuple(MERGES),
        default=d.token_merge,
        help=f"what becomes of the pruned image tokens: {', '.join(MERGES)} (default {d.token_merge})",
    )
    group.add_argument("--dense", action="store_true", help="keep every image token and every neuron (the dense model)")


def config_from_args(args: argparse.Namespace, num_image_tokens: int | None = None) -> CoreMatchingConfig:
    """The config the flags describe; `--dense` needs the model's number of image tokens."""
    if args.dense:
        if num_image_tokens is None:
            raise ConfigError("--dense needs the model's number of image tokens")
        return CoreMatchingConfig.keep_all(num_image_tokens, prune_layer=args.prune_layer)
    return CoreMatchingConfig(
        token_budget=args.token_budget,
        token_ratio=args.token_ratio,
        neuron_ratio=args.neuron_ratio,
        prune_layer=args.prune_layer,
        neuron_layers=args.neuron_layers,
        token_selector=args.token_selector,
        token_merge=args.token_merge,
    )
