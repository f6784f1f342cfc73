"""The evaluation's outputs: results.json, a markdown table, the accuracy plot and a core-token grid.

Rows are named by selector and merge (`core-coverage+nearest`, `fastv`: no merge), columns by budget.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from coreMatching.selectors import DEFAULT_MERGE, DEFAULT_SELECTOR
from evaluation.evaluate import EvalResult, Record, Summary
from export.calibration import CALIBRATION_START
from vqadata.data import Item

log = logging.getLogger(__name__)

TARGET_DENSE = 0.95
# The default selector keeps this share of dense accuracy at each budget.
TARGET_RELATIVE = {64: 0.95, 32: 0.90}
TARGET_BUDGET = 64
TARGET_COUNT_GAP = 0.10  # count questions at TARGET_BUDGET within 10 points of dense
TARGET_AGREEMENT = 0.995  # the default's ONNX build gives the reference's answer
COMPARED_BUDGETS = (192, 128, 64, 32)  # where the default must beat every baseline
BASELINES = ("fastv", "random", "max-min")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _find(summaries: list[Summary], name: str, budget: object, backend: str = "reference") -> Summary | None:
    """The summary of a selector+merge name (or "dense") at a budget."""
    for s in summaries:
        same = (s.setting.name, s.setting.backend) == (name, backend)
        if same and (name == "dense" or s.setting.budget == budget):
            return s
    if budget == _full_budget(summaries) and name != "dense":
        # Every selector keeps every token there: one model, listed once under the first selector.
        return next(
            (
                s
                for s in summaries
                if s.setting.method != "dense" and s.setting.budget == budget and s.setting.backend == backend
            ),
            None,
        )
    return None


def _full_budget(summaries: list[Summary]) -> int | None:
    dense = next((s for s in summaries if s.setting.method == "dense"), None)
    return None if dense is None else int(dense.mean_kept)


def _names(result: EvalResult) -> list[str]:
    """Every selector+merge row, in the config's order."""
    names: list[str] = []
    for setting in result.settings:
        if setting.method != "dense" and setting.backend == "reference" and setting.name not in names:
            names.append(setting.name)
    return names


DEFAULT_NAME = f"{DEFAULT_SELECTOR}+{DEFAULT_MERGE}" if DEFAULT_MERGE != "none" else DEFAULT_SELECTOR


def targets(summaries: list[Summary]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for the selection work's targets; those whose settings did not run are left out."""
    dense = _find(summaries, "dense", None)
    default = _find(summaries, DEFAULT_NAME, TARGET_BUDGET)
    out: list[tuple[str, str, bool | None]] = []
    if dense:
        out.append(
            (f"dense accuracy >= {100 * TARGET_DENSE:.0f}%", f"{_pct(dense.accuracy)}%", dense.accuracy >= TARGET_DENSE)
        )
    for budget, share in TARGET_RELATIVE.items():
        kept = _find(summaries, DEFAULT_NAME, budget)
        if dense and kept and kept.relative is not None:
            out.append(
                (
                    f"default ({DEFAULT_NAME})@{budget} keeps >= {100 * share:.0f}% of dense",
                    f"{_pct(kept.relative)}% ({_pct(kept.accuracy)}% vs {_pct(dense.accuracy)}%)",
                    kept.relative >= share,
                )
            )
    if dense and default and "count" in dense.per_type and "count" in default.per_type:
        gap = dense.per_type["count"] - default.per_type["count"]
        out.append(
            (
                f"count questions at {TARGET_BUDGET} within {100 * TARGET_COUNT_GAP:.0f} points of dense",
                f"{_pct(default.per_type['count'])}% vs {_pct(dense.per_type['count'])}% ({-100 * gap:+.1f})",
                gap <= TARGET_COUNT_GAP,
            )
        )
    deployed = _find(summaries, DEFAULT_NAME, TARGET_BUDGET, backend="onnx")
    if deployed and deployed.agreement is not None:
        out.append(
            (
                f"the default's ONNX build gives the reference's answer on >= {100 * TARGET_AGREEMENT:.1f}%",
                f"{_pct(deployed.agreement)}% of {deployed.questions}",
                deployed.agreement >= TARGET_AGREEMENT,
            )
        )
    for baseline in BASELINES:
        for other_name in (baseline, f"{baseline}+{DEFAULT_MERGE}"):
            pairs = [(k, _find(summaries, DEFAULT_NAME, k), _find(summaries, other_name, k)) for k in COMPARED_BUDGETS]
            pairs = [(k, a, b) for k, a, b in pairs if a and b]
            if not pairs:
                continue
            margins = ", ".join(f"{k}: {100 * (a.accuracy - b.accuracy):+.1f}" for k, a, b in pairs)
            out.append(
                (
                    f"{DEFAULT_NAME} beats {other_name} at every budget {'/'.join(str(k) for k, _, _ in pairs)}",
                    f"margins (points) {margins}",
                    all(a.accuracy > b.accuracy for _, a, b in pairs),
                )
            )
    return out


def markdown(result: EvalResult, command: str) -> str:
    s = result.summaries
    budgets = [b for b in result.config.budgets]
    methods = ["dense", *_names(result)]
    dense = _find(s, "dense", None)
    n = dense.questions if dense else (s[0].questions if s else 0)
    lines = [
        "# Accuracy of the token selectors, with and without a merge",
        "",
        f"Model: `{result.model}`. Data: {result.data}, {n} questions. Greedy answers, exact match after "
        "normalisation (lower case, no punctuation or articles). Generated by:",
        "",
        f"    {command}",
        "",
        f"Budgets are image tokens kept (of {dense.mean_kept:.0f}) after the prune layer "
        f"({result.config.prune_layer}); every selector decodes with the prompt's core neurons "
        f"(beta = {result.config.neuron_ratio}), so the rows differ only in which image tokens later layers see. "
        "A row `NAME+MERGE` merges the pruned tokens (`summary`: one extra token; `nearest`: folded into the "
        "nearest kept token; `mass`: weighed into the nearest kept token, whose state stays its own). "
        f"With every token kept ({dense.mean_kept:.0f}) nothing is pruned or merged and "
        "every row is one model. `auto`: the elbow of the sorted scores, with the mean kept count in "
        f"parentheses. The default is `{DEFAULT_NAME}`. Relative accuracy (to dense) in the second table. "
        f"Dense: **{_pct(dense.accuracy)}%**."
        if dense
        else "",
        "",
        "## Accuracy (%)",
        "",
        "| method | " + " | ".join(str(b) for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]

    def row(method: str, value: Any) -> str:
        cells = []
        for b in budgets:
            if method == "dense":
                summary = dense if dense and b == dense.setting.budget else None
            else:
                summary = _find(s, method, b)
            cells.append(value(summary) if summary else "")
        return f"| {method} | " + " | ".join(cells) + " |"

    def acc(x: Summary) -> str:
        return _pct(x.accuracy) + (f" ({x.mean_kept:.0f})" if x.setting.budget == "auto" else "")

    lines += [row(m, acc) for m in methods]
    lines += [
        "",
        "## Relative to dense (%)",
        "",
        "| method | " + " | ".join(str(b) for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    lines += [row(m, lambda x: _pct(x.relative)) for m in methods if m != "dense"]

    types = sorted({t for x in s for t in x.per_type})
    lines += [
        "",
        "## Per question type (%)",
        "",
        "| setting | " + " | ".join(types) + " | all |",
        "|---|" + "---:|" * (len(types) + 1),
    ]
    for x in s:
        cells = [_pct(x.per_type.get(t)) for t in types]
        lines.append(f"| {x.setting.label} | " + " | ".join(cells) + f" | {_pct(x.accuracy)} |")

    if any(x.mean_recall is not None for x in s if x.setting.method != "dense"):
        lines += [
            "",
            "## Where the kept tokens land",
            "",
            "Share of the patches covered by the objects the answer depends on that the selector kept "
            "(mean over questions that name an object; a patch counts when 10% of it is covered).",
            "",
            "| method | " + " | ".join(str(b) for b in budgets) + " |",
            "|---|" + "---:|" * len(budgets),
        ]
        # A merge does not change which tokens are kept: one row per selector.
        selectors = [m for m in methods if m != "dense" and "+" not in m] or [m for m in methods if m != "dense"]
        lines += [row(m, lambda x: _pct(x.mean_recall)) for m in selectors]
        lines += [
            "",
            "Mean percentile of those patches in each selector's ranking of the image tokens (100: ranked "
            "first, 50: chance; a ranking selector's order does not depend on the budget; a greedy one's is the "
            "order of its k picks, the tokens it did not pick tied last):",
            "",
            "| method | " + " | ".join(str(b) for b in budgets) + " |",
            "|---|" + "---:|" * len(budgets),
        ]
        lines += [row(m, lambda x: _pct(x.mean_rank)) for m in selectors]

    static = [x for x in s if x.setting.backend == "static"]
    if static:
        lines += [
            "",
            "## Static neuron set (the reference on a narrowed FFN, no per-request neurons)",
            "",
            f"Each setting's set narrows every neuron-sparse layer but the prune layer to "
            f"{result.config.static_width_ratio:g} x N neurons ranked by `{result.config.static_criterion}`, "
            f"calibrated on {result.config.static_calibration} items of the shapes validation split from item "
            f"{CALIBRATION_START} on, under that setting's token selection; prefill and decoding both run the "
            "narrowed FFN.",
            "",
            "| setting | per-request | static | difference | same answer as per-request |",
            "|---|---:|---:|---:|---:|",
        ]
        for x in static:
            per = _find(s, x.setting.name, x.setting.budget)
            per_acc = per.accuracy if per is not None else None
            diff = "-" if per_acc is None else f"{100 * (x.accuracy - per_acc):+.1f}"
            lines.append(
                f"| {x.setting.name}@{x.setting.budget} | {_pct(per_acc)} | {_pct(x.accuracy)} | {diff} | "
                f"{_pct(x.agreement)} |"
            )

    onnx = [x for x in s if x.setting.backend == "onnx"]
    if onnx:
        lines += [
            "",
            "## Deployed graphs (ONNX builds answered by the runtime, ONNX Runtime CPU)",
            "",
            "| build | accuracy | relative to dense | same answer as the reference | mean kept |",
            "|---|---:|---:|---:|---:|",
        ]
        for x in onnx:
            lines.append(
                f"| {x.setting.label} | {_pct(x.accuracy)} | {_pct(x.relative)} | {_pct(x.agreement)} | "
                f"{x.mean_kept:.1f} |"
            )

    if result.fidelity:
        f0 = result.fidelity[0]
        lines += [
            "",
            "## Decode fidelity (neuron-sparse decoding, teacher-forced)",
            "",
            f"{f0.questions} questions; the dense model writes {f0.steps + 1} greedy tokens, every setting "
            f"is fed them and its {f0.steps} decode steps are compared with dense (every image token kept, so "
            "only the decode steps' core neurons differ).",
            "",
            "| beta | top-1 agreement with dense (%) | mean KL(dense ‖ sparse) per step (nats) |",
            "|---:|---:|---:|",
        ]
        lines += [f"| {f.beta} | {_pct(f.top1)} | {f.kl:.4f} |" for f in result.fidelity]

    checks = targets(s)
    if checks:
        lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {'yes' if ok else 'no'} |" for t, m, ok in checks]
    return "\n".join(lines) + "\n"


def write_json(result: EvalResult, path: Path) -> None:
    data = {
        "model": result.model,
        "data": result.data,
        "config": asdict(result.config),
        "summaries": [x.to_json() for x in result.summaries],
        "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in targets(result.summaries)],
        "decode_fidelity": [asdict(f) for f in result.fidelity],
    }
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def write_records(records: list[Record], path: Path) -> None:
    """Every answer (JSONL): what the tables are counted from."""
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(asdict(r)) + "\n")


def plot_accuracy(result: EvalResult, path: Path) -> None:
    """Accuracy against mean kept tokens, one line per method (auto and ONNX builds as single points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = _find(result.summaries, "dense", None)
    if dense:
        ax.axhline(100 * dense.accuracy, color="0.3", ls="--", lw=1, label=f"dense ({_pct(dense.accuracy)}%)")
    markers = {
        "core-coverage": "o",
        "fastv": "s",
        "random": "^",
        "max-min": "v",
        "query-overlap": "P",
        "prompt-frequency": "X",
        "conditional-dpp": "D",
    }
    full = _full_budget(result.summaries)
    for i, method in enumerate(_names(result)):
        fixed = sorted(
            (
                x
                for x in result.summaries
                if x.setting.name == method
                and x.setting.backend == "reference"
                and x.setting.budget not in ("auto", full)
            ),
            key=lambda x: x.mean_kept,
        )
        dashed = "--" if "+" not in method else "-"
        if fixed:
            ax.plot(
                [x.mean_kept for x in fixed],
                [100 * x.accuracy for x in fixed],
                marker=markers.get(method.split("+")[0], "o"),
                ls=dashed,
                color=f"C{i % 10}",
                label=method,
            )
        auto = _find(result.summaries, method, "auto")
        if auto:
            ax.plot(
                auto.mean_kept,
                100 * auto.accuracy,
                marker="*",
                ms=14,
                color=f"C{i % 10}",
                ls="none",
                label=f"{method} auto (mean {auto.mean_kept:.0f})",
            )
        for x in result.summaries:
            if x.setting.name == method and x.setting.backend == "onnx":
                ax.plot(x.mean_kept, 100 * x.accuracy, marker="D", mfc="none", ms=9, color=f"C{i % 10}", ls="none")
    if any(x.setting.backend == "onnx" for x in result.summaries):
        ax.plot([], [], marker="D", mfc="none", color="0.3", ls="none", label="ONNX build (runtime)")
    ax.set_xscale("log", base=2)
    ticks = sorted({b for b in result.config.budgets if b not in ("auto", full)})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("image tokens kept after the prune layer")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{result.data}: accuracy against kept image tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_core_tokens(
    result: EvalResult,
    items: list[Item],
    path: Path,
    budget: int = TARGET_BUDGET,
    image_size: int = 336,
    patch_size: int = 14,
    num_image_tokens: int = 576,
) -> None:
    """A grid: each row one question; the image, then the patches each selector kept at `budget`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from runtime.overlay import core_token_picture
    from runtime.preprocess import load_image

    index = {(r.setting, r.item): r for r in result.records}
    preferred = [DEFAULT_NAME, *(f"{b}+{DEFAULT_MERGE}" for b in BASELINES), *BASELINES]
    methods = [m for m in preferred if any(r.setting == f"{m}@{budget}" for r in result.records)][:4]
    fig, axes = plt.subplots(len(items), 1 + len(methods), figsize=(3 * (1 + len(methods)), 3.3 * len(items)))
    axes = axes.reshape(len(items), 1 + len(methods))
    for row, item in enumerate(items):
        image = load_image(item.load_image())
        dense = index.get(("dense", item.id))
        axes[row, 0].imshow(image)
        said = dense.prediction if dense else "?"
        axes[row, 0].set_title(f"{item.question}\nanswer: {item.answers[0]}; dense: {said}", fontsize=7)
        for col, method in enumerate(methods, 1):
            r = index[(f"{method}@{budget}", item.id)]
            axes[row, col].imshow(core_token_picture(image, r.kept_tokens, image_size, patch_size, num_image_tokens))
            mark = "right" if r.correct else "wrong"
            axes[row, col].set_title(f"{method}@{budget}: {r.prediction!r} ({mark})", fontsize=8)
        for ax in axes[row]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)
