"""Applies the written rule of docs/evaluation/selection.md to validation runs' results.json files.

    python scripts/choose_default.py docs/evaluation/validation/results.json [MORE.json ...]
        [--weights 192:1,128:1,64:2,32:1] [--selectors a,b] [--merges none,nearest]

Ranks every selector+merge (the cells of every file together; a later file's cell replaces an
earlier one's) by its weighted mean accuracy over the budgets, treats candidates within --tie
points of the best as tied, and breaks ties as the rule says: exact scores first, then the merge
that caches fewer tokens, then the accuracy at k = 64. Prints the ranking and the choice.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from coreMatching.selectors import MERGES, SELECTORS

MERGE_CACHE = {"none": 0, "nearest": 0, "mass": 0, "summary": 1}  # extra cached tokens per pruned layer


def rank(
    summaries: list[dict], weights: dict[int, float], tie: float, selectors=None, merges=None
) -> tuple[list[dict], dict]:
    rows: dict[str, dict] = {}
    for s in summaries:
        setting = s["setting"]
        if setting["method"] == "dense" or setting["backend"] != "reference" or setting["budget"] not in weights:
            continue
        if (selectors and setting["method"] not in selectors) or (merges and setting["merge"] not in merges):
            continue
        row = rows.setdefault(
            setting["method"] + "/" + setting["merge"],
            {"selector": setting["method"], "merge": setting["merge"], "accuracy": {}},
        )
        row["accuracy"][setting["budget"]] = s["accuracy"]
    complete = [r for r in rows.values() if set(r["accuracy"]) == set(weights)]
    total = sum(weights.values())
    for r in complete:
        r["mean"] = sum(weights[b] * a for b, a in r["accuracy"].items()) / total
    complete.sort(key=lambda r: -r["mean"])
    best = complete[0]["mean"]
    tied = [r for r in complete if best - r["mean"] <= tie / 100]
    tied.sort(key=lambda r: (not SELECTORS[r["selector"]].exact, MERGE_CACHE[r["merge"]], -r["accuracy"].get(64, 0)))
    return complete, tied[0]


def parse_weights(text: str) -> dict[int, float]:
    """'192,128,64,32' (equal weights) or '192:1,128:1,64:2,32:1'."""
    out = {}
    for part in text.split(","):
        budget, _, weight = part.partition(":")
        out[int(budget)] = float(weight or 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="results.json of the validation runs")
    parser.add_argument(
        "--weights",
        "--budgets",
        dest="weights",
        default="192,128,64,32",
        help="budgets and their weights in the score: 192,128,64,32 or 192:1,128:1,64:2,32:1",
    )
    parser.add_argument("--selectors", default="", help="candidate selectors (default: every one in the files)")
    parser.add_argument("--merges", default="", help="candidate merges (default: every one in the files)")
    parser.add_argument("--tie", type=float, default=1.0, help="points within which candidates tie (default 1.0)")
    args = parser.parse_args(argv)
    summaries: list[dict] = []
    for path in args.results:
        try:
            summaries += json.loads(path.read_text())["summaries"]
        except (OSError, ValueError, KeyError) as e:
            print(f"error: {path} is not an evaluation's results.json ({e})", file=sys.stderr)
            return 2
    try:
        weights = parse_weights(args.weights)
    except ValueError:
        print(f"error: --weights {args.weights!r}: use budgets with optional weights, e.g. 192:1,64:2", file=sys.stderr)
        return 2
    selectors = {s for s in args.selectors.split(",") if s}
    merges = {m for m in args.merges.split(",") if m}
    unknown = (selectors - set(SELECTORS)) | (merges - set(MERGES))
    if unknown:
        print(
            f"error: unknown selector or merge {sorted(unknown)}; known: {', '.join([*SELECTORS, *MERGES])}",
            file=sys.stderr,
        )
        return 2
    ranking, choice = rank(summaries, weights, args.tie, selectors, merges)
    budgets = list(weights)
    print("| selector | merge | " + " | ".join(f"k = {b}" for b in budgets) + " | score | exact |")
    print("|---|---|" + "---:|" * (len(budgets) + 1) + "---|")
    for r in ranking:
        cells = " | ".join(f"{100 * r['accuracy'][b]:.1f}" for b in budgets)
        exact = "yes" if SELECTORS[r["selector"]].exact else "no"
        print(f"| {r['selector']} | {r['merge']} | {cells} | {100 * r['mean']:.2f} | {exact} |")
    print(f"\nchoice: {choice['selector']} with merge {choice['merge']} (score {100 * choice['mean']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
