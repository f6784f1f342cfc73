"""How far token selection can take counting at a budget: the default rule against oracles that know where
the objects are (docs/evaluation/analysis.md).

    python scripts/count_oracle.py [--split test] [--budgets 64,128,192] [--count 1000]

On the shapes count questions of the first --count items, answers (first greedy token, the reference) with:

- `default`: the default selector and merge;
- `objects kept`: every patch of every object kept first (ranked above the default's picks), the default
  filling the rest of the budget, the default merge;
- `objects kept + object merge`: the same, and every pruned patch joins a kept token of its own object
  (background patches join the default merge's owner among the kept background tokens);
- `objects and their ring kept + object merge`: also the patches next to an object kept first.

The oracles read the scene (where the shapes are), which no deployable rule can: they bound what a
better selection or merge could reach at that budget.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import coreMatching.llava as reference_module
from coreMatching import CoreMatchingConfig, CoreMatchingLlava
from coreMatching.rules import PruneLayerView, token_scores
from coreMatching.selection import stable_topk
from vqadata import shapes
from vqadata.data import is_correct

GRID = 24


def ring(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one patch in the four directions. bool [576] -> [576]"""
    m = mask.reshape(GRID, GRID)
    out = m.copy()
    out[1:] |= m[:-1]
    out[:-1] |= m[1:]
    out[:, 1:] |= m[:, :-1]
    out[:, :-1] |= m[:, 1:]
    return out.reshape(-1)


class OracleReference(CoreMatchingLlava):
    """The reference with the kept set (and optionally the merge's owners) decided by the scene."""

    first: np.ndarray  # bool [n_img]: kept before anything else
    labels: torch.Tensor | None  # [n_img] object index, -1 for background; None: the default merge's owners

    def _select_image_tokens(self, view: PruneLayerView) -> tuple[torch.Tensor, torch.Tensor]:
        k = int(view.budgets.token_budget)
        scores = token_scores(view.budgets.token_selector, view, k)
        scores = scores + 1000.0 * torch.from_numpy(self.first).float()  # the oracle's patches first
        return stable_topk(scores, k).sort().values, scores


@contextmanager
def object_merge(oracle: OracleReference) -> Iterator[None]:
    """Pruned patches join a kept token of their own object (the default's overlaps break the rest)."""
    original = reference_module.merge_group_scores

    def groups(view: PruneLayerView, kept: torch.Tensor) -> torch.Tensor:
        overlap = original(view, kept)  # [n_img, k]
        if oracle.labels is None:
            return overlap
        same = (oracle.labels[:, None] == oracle.labels[kept][None, :]).float()
        return overlap + 1e4 * same

    reference_module.merge_group_scores = groups
    try:
        yield
    finally:
        reference_module.merge_group_scores = original


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="test")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--budgets", default="64,128,192")
    args = parser.parse_args(argv)
    from models import default_model_dir, load_llava
    from models.answer import build_prompt

    model, processor = load_llava(default_model_dir())
    model = model.float()
    examples = [e for e in shapes.examples(args.split, args.count) if e.question.type == "count"]
    print(f"{len(examples)} count questions of the first {args.count} {args.split} items")
    dense = CoreMatchingLlava(model, CoreMatchingConfig.keep_all(576))
    variants = ("default", "objects kept", "objects kept + object merge", "objects and their ring kept + object merge")
    rows: dict[str, dict[int, list[bool]]] = {v: {} for v in variants}
    dense_ok = []
    budgets = [int(b) for b in args.budgets.split(",")]
    references = {k: OracleReference(model, CoreMatchingConfig(token_budget=k)) for k in budgets}
    with torch.inference_mode():
        for example in examples:
            inputs = processor(
                images=example.image(), text=build_prompt(processor, example.question.text), return_tensors="pt"
            )
            ids, pixels = inputs["input_ids"], inputs["pixel_values"].float()
            token = dense.generate(ids, pixels, 1).tokens

            def correct(tokens: list[int], answers: tuple[str, ...] = example.answers) -> bool:
                return is_correct(processor.tokenizer.decode(tokens, skip_special_tokens=True), answers)

            dense_ok.append(correct(token))
            objects = [shapes.object_patches(example.scene, (j,)) for j in range(len(example.scene.shapes))]
            union = np.any(objects, axis=0) if objects else np.zeros(576, dtype=bool)
            labels = torch.full((576,), -1, dtype=torch.long)
            for j, mask in enumerate(objects):
                labels[torch.from_numpy(mask)] = j
            for k, oracle in references.items():
                plans = {
                    "default": (np.zeros(576, dtype=bool), None),
                    "objects kept": (union, None),
                    "objects kept + object merge": (union, labels),
                    "objects and their ring kept + object merge": (ring(union), labels),
                }
                for name, (first, merge_labels) in plans.items():
                    oracle.first, oracle.labels = first, merge_labels
                    with object_merge(oracle):
                        rows[name].setdefault(k, []).append(correct(oracle.generate(ids, pixels, 1).tokens))
    print(f"\ndense: {100 * np.mean(dense_ok):.1f}% of {len(dense_ok)}\n")
    print("| kept set and merge | " + " | ".join(f"k = {k}" for k in budgets) + " |")
    print("|---|" + "---:|" * len(budgets))
    for name in variants:
        print(f"| {name} | " + " | ".join(f"{100 * np.mean(rows[name][k]):.1f}" for k in budgets) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
