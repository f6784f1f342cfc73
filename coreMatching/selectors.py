"""The registry of token selectors and merge steps: names, what each rule reads, what it supports.

A token selector is a named rule that, at the prune layer, picks which `k` image tokens the later
layers keep (docs/method.md). This module is torch-free: the configuration validates names against
it, the CLI lists it, and the torch rules (`coreMatching.rules`) and the graph rules
(`export.passes.selectors`) are registered under the same names (a test checks that the three agree).

Two kinds of rule:

- `score`: one score per image token; the top `k` are kept (ties to the lower index), and
  `token_budget="auto"` can take the elbow of the sorted scores;
- `greedy`: picks one token at a time, each pick depending on the earlier ones (coverage,
  diversity); unrolled for `k` steps in the graph, so it needs a static `k`.

A merge step runs after the selection and keeps what the pruned image tokens carried in
aggregate (the share of attention they drew), see `MERGES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SelectorKind = Literal["score", "greedy"]
Origin = Literal["method", "paper", "baseline"]


@dataclass(frozen=True)
class TokenSelector:
    """One named selection rule (its math lives in `coreMatching.rules` and `export.passes.selectors`).

    name: the stable name used by the config, the CLI, the manifest and the evaluation.
    kind: "score" (top-k of a per-token score) or "greedy" (k dependent picks; no "auto").
    origin: "method" (this project's rule), "paper" (the authors' rules) or "baseline".
    needs_attention: reads the prune layer's attention (not compatible with fused attention kernels).
    summary: one line for `--help` and the docs.
    ranks: its scores rank the tokens (an elbow of the sorted scores means something): "auto" works.
    exact: its scores are integer counts (or built from them) and exact in float32 whatever order a
        sum runs in, so every backend and precision keeps the reference's tokens; False: float sums.
    """

    name: str
    kind: SelectorKind
    origin: Origin
    needs_attention: bool
    summary: str
    ranks: bool = True
    exact: bool = True

    @property
    def supports_auto(self) -> bool:
        return self.kind == "score" and self.ranks


SELECTORS: dict[str, TokenSelector] = {}


def register(selector: TokenSelector) -> TokenSelector:
    if selector.name in SELECTORS:
        raise ValueError(f"token selector {selector.name!r} is already registered")
    SELECTORS[selector.name] = selector
    return selector


register(
    TokenSelector(
        "core-coverage",
        "greedy",
        "method",
        False,
        "greedy weighted coverage of the image tokens' core neurons; a neuron's weight starts higher when it is a core "
        "neuron of the query token and halves each time a kept token covers it",
    )
)
register(
    TokenSelector(
        "prompt-frequency",
        "score",
        "paper",
        False,
        "|C(j) ∩ C*| with C* counted over every prompt token (keeps the image's majority patch type)",
    )
)
register(
    TokenSelector(
        "query-overlap",
        "score",
        "paper",
        False,
        "overlap of each image token's active neurons (a > 0) with the query token's (the last prompt token)",
    )
)
register(
    TokenSelector(
        "fastv",
        "score",
        "baseline",
        True,
        "FastV: the attention the last prompt token pays each image token at the prune layer, mean over heads",
        exact=False,
    )
)
register(
    TokenSelector(
        "random",
        "score",
        "baseline",
        False,
        "a seeded random subset of the image tokens",
        ranks=False,
    )
)
register(
    TokenSelector(
        "max-min",
        "greedy",
        "baseline",
        False,
        "DivPrune-style max-min diversity: farthest-point picks under the cosine distance of the prune layer's "
        "FFN activations",
        exact=False,
    )
)

register(
    TokenSelector(
        "conditional-dpp",
        "greedy",
        "paper",
        False,
        "CDPruner-style conditional DPP: greedy MAP of a kernel that is the cosine similarity of the prune layer's "
        "FFN activations scaled by each token's relevance to the query (the share of its core neurons that are "
        "the query token's)",
        exact=False,
    )
)

MergeName = Literal["none", "summary", "nearest", "mass"]

# What happens to the image tokens a selector did not keep. Pruning them outright changes every later
# softmax's denominator: the kept tokens then draw the attention the background drew, which is what a
# count reads (docs/method.md). A merge keeps that mass: a merged key of multiplicity m gets log(m)
# added to its attention logits, so it weighs as m copies of itself (proportional attention).
MERGES: dict[str, str] = {
    "none": "the pruned image tokens are dropped",
    "summary": "one extra token after the kept image tokens: the mean of the pruned tokens' hidden states at their "
    "mean position, weighing as many tokens as were pruned",
    "nearest": "each pruned token is folded into the kept image token whose core neurons it shares most; a kept "
    "token becomes the mean of its group and weighs as many tokens as the group holds",
    "mass": "each pruned token gives its weight to the kept image token whose core neurons it shares most; a kept "
    "token keeps its own state and weighs as many tokens as its group holds",
}

# Merges that group the pruned tokens by their owner (the kept token sharing most core neurons).
GROUPING_MERGES = frozenset({"nearest", "mass"})

# The project's measured best (docs/evaluation/selection.md: chosen on the validation split).
DEFAULT_SELECTOR = "conditional-dpp"
DEFAULT_MERGE: MergeName = "mass"
