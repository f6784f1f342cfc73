"""Applies the written rule of docs/evaluation/selection.md to a validation run's results.json.

    python scripts/choose_default.py docs/evaluation/validation/results.json

Ranks every selector+merge by its mean accuracy over the budgets, treats candidates within
--tie points of the best as tied, and breaks ties as the rule says: exact scores first, then the
merge that caches fewer tokens, then the accuracy at k = 64. Prints the ranking and the choice.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from coreMatching.selectors import SELECTORS

MERGE_CACHE = {"none": 0, "nearest": 0, "summary": 1}  # extra cached tokens per pruned layer


def rank(summaries: list[dict], budgets: tuple[int, ...], tie: float) -> tuple[list[dict], dict]:
    rows: dict[str, dict] = {}
    for s in summaries:
        setting = s["setting"]
        if setting["method"] == "dense" or setting["backend"] != "reference" or setting["budget"] not in budgets:
            continue
        row = rows.setdefault(
            setting["method"] + "/" + setting["merge"],
            {"selector": setting["method"], "merge": setting["merge"], "accuracy": {}},
        )
        row["accuracy"][setting["budget"]] = s["accuracy"]
    complete = [r for r in rows.values() if set(r["accuracy"]) == set(budgets)]
    for r in complete:
        r["mean"] = sum(r["accuracy"].values()) / len(budgets)
    complete.sort(key=lambda r: -r["mean"])
    best = complete[0]["mean"]
    tied = [r for r in complete if best - r["mean"] <= tie / 100]
    tied.sort(key=lambda r: (not SELECTORS[r["selector"]].exact, MERGE_CACHE[r["merge"]], -r["accuracy"].get(64, 0)))
    return complete, tied[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results.json of the validation run")
    parser.add_argument("--budgets", default="192,128,64,32")
    parser.add_argument("--tie", type=float, default=1.0, help="points within which candidates tie (default 1.0)")
    args = parser.parse_args(argv)
    try:
        summaries = json.loads(args.results.read_text())["summaries"]
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {args.results} is not an evaluation's results.json ({e})", file=sys.stderr)
        return 2
    budgets = tuple(int(b) for b in args.budgets.split(","))
    ranking, choice = rank(summaries, budgets, args.tie)
    print("| selector | merge | " + " | ".join(f"k = {b}" for b in budgets) + " | mean | exact |")
    print("|---|---|" + "---:|" * (len(budgets) + 1) + "---|")
    for r in ranking:
        cells = " | ".join(f"{100 * r['accuracy'][b]:.1f}" for b in budgets)
        exact = "yes" if SELECTORS[r["selector"]].exact else "no"
        print(f"| {r['selector']} | {r['merge']} | {cells} | {100 * r['mean']:.2f} | {exact} |")
    print(f"\nchoice: {choice['selector']} with merge {choice['merge']} (mean {100 * choice['mean']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
