"""Accuracy of the token selectors, with and without a merge, on the reference and on ONNX builds.

A *setting* is one way of answering: a registered token selector (`coreMatching.selectors`) with a
merge at one budget (kept image tokens, or "auto"), or dense, run by one backend (the PyTorch
reference, or an ONNX build through the runtime). Every item is answered greedily under every
setting and scored by exact match after normalisation (`vqadata.data.is_correct`).

- dense: every image token and every FFN neuron (equal to the stock transformers model);
- every selector decodes with the prompt's core neurons (beta, 0.4 by default), so the settings
  differ only in which image tokens the later layers see;
- at k = n_img every selector keeps every token (and nothing is merged): those settings are one
  model, answered once and reused;
- `auto` (the elbow of the sorted scores) runs for the ranking selectors, without a merge.

The vision tower runs once per item and its features are shared by every reference setting.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from coreMatching.config import DEFAULT_STATIC_WIDTH_RATIO, CoreMatchingConfig
from coreMatching.errors import ConfigError
from coreMatching.selectors import DEFAULT_MERGE, MERGES, SELECTORS
from coreMatching.static_neurons import DEFAULT_STATIC_CRITERION, StaticRecipe
from vqadata.data import Item, is_correct

log = logging.getLogger(__name__)

Budget = int | Literal["auto"]


@dataclass(frozen=True)
class Setting:
    method: str  # "dense" or a registered token selector
    budget: Budget  # kept image tokens ("auto": the elbow); n_img for dense
    backend: str = "reference"  # "reference" or "onnx"
    merge: str = "none"  # what became of the pruned image tokens (coreMatching.selectors.MERGES)

    @property
    def name(self) -> str:
        """The selector with its merge: `core-coverage+nearest`, `fastv` (no merge)."""
        return self.method if self.merge == "none" else f"{self.method}+{self.merge}"

    @property
    def label(self) -> str:
        where = "" if self.backend == "reference" else f" [{self.backend}]"
        return f"{self.name}@{self.budget}{where}" if self.method != "dense" else f"dense{where}"


@dataclass(frozen=True)
class EvalConfig:
    budgets: tuple[Budget, ...] = (576, 192, 128, 64, 32, "auto")
    methods: tuple[str, ...] = tuple(SELECTORS)
    merges: tuple[str, ...] = ("none", DEFAULT_MERGE)
    prune_layer: int = 2
    neuron_ratio: float = 0.4  # beta of every selector's decoding steps
    max_new_tokens: int = 4  # the answers are one word: a few tokens show any run-on
    seed: int = 0  # of the random selector
    static_calibration: int = 0  # > 0: each pruning setting also runs with a static neuron set counted over
    # that many validation items (evaluation.static); 0: per-request neurons only
    static_criterion: str = DEFAULT_STATIC_CRITERION  # how those sets rank each layer's neurons
    static_width_ratio: float = DEFAULT_STATIC_WIDTH_RATIO  # their neurons per layer, as a multiple of N

    def __post_init__(self) -> None:
        if self.static_calibration < 0:
            raise ConfigError(f"static_calibration must be 0 or more, got {self.static_calibration}")
        StaticRecipe(self.static_criterion, self.static_width_ratio)  # refuses an unknown criterion, a bad ratio
        for method in self.methods:
            if method not in SELECTORS:
                raise ConfigError(f"unknown method {method!r}; known: {', '.join(SELECTORS)}")
        for merge in self.merges:
            if merge not in MERGES:
                raise ConfigError(f"unknown merge {merge!r}; known: {', '.join(MERGES)}")
        for budget in self.budgets:
            if budget != "auto" and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
                raise ConfigError(f"budgets must be positive integers or 'auto', got {budget!r}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")

    @property
    def static_recipe(self) -> StaticRecipe:
        return StaticRecipe(self.static_criterion, self.static_width_ratio)

    def settings(self, num_image_tokens: int) -> list[Setting]:
        """dense first, then every selector with every merge at every budget it supports ('auto': the
        ranking selectors, without a merge; the full budget once per selector, without a merge)."""
        out = [Setting("dense", num_image_tokens)]
        for method in self.methods:
            for merge in self.merges:
                for budget in self.budgets:
                    if budget == "auto" and (merge != "none" or not SELECTORS[method].supports_auto):
                        continue
                    if budget != "auto" and budget > num_image_tokens:
                        raise ConfigError(f"budget {budget} is more than the model's {num_image_tokens} image tokens")
                    if budget == num_image_tokens and merge != "none":
                        continue  # nothing is pruned, so nothing is merged
                    out.append(Setting(method, budget, merge=merge))
        if self.static_calibration:
            out += [
                Setting(s.method, s.budget, backend="static", merge=s.merge)
                for s in out
                if s.method != "dense" and s.budget not in ("auto", num_image_tokens)
            ]
        return out

    def corematching(self, setting: Setting, num_image_tokens: int) -> CoreMatchingConfig:
        """The reference configuration of a setting."""
        if setting.method == "dense":
            return CoreMatchingConfig.keep_all(num_image_tokens, prune_layer=self.prune_layer)
        return CoreMatchingConfig(
            token_budget=setting.budget,
            neuron_ratio=self.neuron_ratio,
            prune_layer=self.prune_layer,
            token_selector=setting.method,
            token_merge=setting.merge,
            seed=self.seed,
        )


@dataclass
class Record:
    """One item answered under one setting."""

    setting: str
    item: str
    type: str
    prediction: str
    correct: bool
    kept: int  # image tokens kept at the prune layer
    recall: float | None = None  # share of the answer's object patches among the kept tokens
    rank: float | None = None  # mean percentile of those patches in the selector's order (1: first, 0.5: chance)
    kept_tokens: list[int] | None = None  # indices into the image tokens (None: every token)


@dataclass
class Summary:
    setting: Setting
    questions: int
    accuracy: float
    per_type: dict[str, float]
    mean_kept: float
    mean_recall: float | None
    mean_rank: float | None = None
    relative: float | None = None  # accuracy / dense accuracy (same backend)
    agreement: float | None = None  # ONNX: share of answers equal to the reference's for the same setting

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["setting"] = {**asdict(self.setting), "label": self.setting.label}
        return data


def _rank(scores: Any, relevant: np.ndarray | None) -> float | None:
    """Mean percentile of the relevant patches in the order the selector keeps tokens (ties: lower index)."""
    if relevant is None or not relevant.any() or relevant.shape[0] != scores.shape[0]:
        return None
    from coreMatching.selection import stable_topk

    n = scores.shape[0]
    order = stable_topk(scores, n).cpu().numpy()  # best first
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    return float(np.mean(1.0 - position[relevant] / (n - 1)))


def _recall(kept: list[int] | None, relevant: np.ndarray | None, num_image_tokens: int) -> float | None:
    if relevant is None or not relevant.any() or relevant.shape[0] != num_image_tokens:
        return None  # no regions known (real data), nothing to find (count of zero), or a CLS token
    if kept is None:
        return 1.0
    return float(relevant[np.asarray(kept, dtype=np.int64)].sum() / relevant.sum())


class ReferenceEvaluator:
    """Answers items with the PyTorch reference under every setting of a config."""

    def __init__(self, model: Any, processor: Any, config: EvalConfig) -> None:
        from coreMatching import CoreMatchingLlava
        from models.loading import num_image_tokens

        self.model, self.processor, self.config = model, processor, config
        self.num_image_tokens = num_image_tokens(model.config)
        self.settings = config.settings(self.num_image_tokens)
        self.references = {
            s.label: CoreMatchingLlava(model, config.corematching(s, self.num_image_tokens))
            for s in self.settings
            if s.backend == "reference"
        }
        for s in self.settings:
            if s.backend == "static":
                from evaluation.static import static_reference

                cm = config.corematching(s, self.num_image_tokens)
                self.references[s.label], _ = static_reference(
                    model, processor, cm, self.num_image_tokens, config.static_calibration, config.static_recipe
                )

    def _alias(self, setting: Setting) -> str | None:
        # Every selector that keeps every token is one model (the same neurons, no merge): answer it once.
        if setting.method == "dense" or setting.budget != self.num_image_tokens:
            return None
        first = next(s for s in self.settings if s.method != "dense" and s.budget == self.num_image_tokens)
        return None if first == setting else first.label

    def answer_item(self, item: Item) -> list[Record]:
        import torch

        from models.answer import build_prompt, load_image

        image = load_image(item.load_image())
        inputs = self.processor(images=image, text=build_prompt(self.processor, item.question), return_tensors="pt")
        dense = self.references[self.settings[0].label]
        features = dense.image_features(inputs["pixel_values"].to(self.model.dtype))  # [n_img, d], shared
        relevant = item.relevant_patches() if item.relevant_patches is not None else None
        tokenizer = self.processor.tokenizer
        records: dict[str, Record] = {}
        for setting in self.settings:
            alias = self._alias(setting)
            if alias is not None:
                records[setting.label] = Record(**{**asdict(records[alias]), "setting": setting.label})
                continue
            tokens: list[int] = []
            kept: list[int] | None = None
            rank: float | None = None
            with torch.inference_mode():
                stream = self.references[setting.label].stream(
                    inputs["input_ids"], None, self.config.max_new_tokens, image_features=features
                )
                for token, _logits, state in stream:
                    if not tokens and setting.method != "dense":
                        kept = state.kept_image_tokens.tolist()
                        rank = _rank(state.token_scores, relevant)
                    tokens.append(token)
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            records[setting.label] = Record(
                setting=setting.label,
                item=item.id,
                type=item.type,
                prediction=text,
                correct=is_correct(text, item.answers),
                kept=self.num_image_tokens if kept is None else len(kept),
                recall=_recall(kept, relevant, self.num_image_tokens),
                rank=rank,
                kept_tokens=kept,
            )
        return list(records.values())


def evaluate_reference(
    model: Any,
    processor: Any,
    items: Iterable[Item],
    config: EvalConfig,
    on_item: Callable[[int], None] | None = None,
) -> tuple[list[Setting], list[Record]]:
    """Every item under every setting of `config` with the reference; on_item(done) reports progress."""
    evaluator = ReferenceEvaluator(model, processor, config)
    records: list[Record] = []
    for done, item in enumerate(items, 1):
        records += evaluator.answer_item(item)
        if on_item is not None:
            on_item(done)
    return evaluator.settings, records


def evaluate_build(
    build_dir: Path,
    setting: Setting,
    items: Iterable[Item],
    max_new_tokens: int,
    on_item: Callable[[int], None] | None = None,
    provider: str = "cpu",
) -> list[Record]:
    """Every item answered by an ONNX build through the runtime (what a deployment answers)."""
    from runtime import Pipeline
    from runtime.preprocess import load_image

    pipeline = Pipeline.load(build_dir, provider=provider)
    n_img = pipeline.manifest.model.num_image_tokens
    records = []
    for done, item in enumerate(items, 1):
        answer = pipeline.answer(load_image(item.load_image()), item.question, max_new_tokens=max_new_tokens)
        kept = answer.kept_image_tokens
        relevant = item.relevant_patches() if item.relevant_patches is not None else None
        records.append(
            Record(
                setting=setting.label,
                item=item.id,
                type=item.type,
                prediction=answer.text,
                correct=is_correct(answer.text, item.answers),
                kept=n_img if kept is None else len(kept),
                recall=_recall(kept, relevant, n_img),
                kept_tokens=kept,
            )
        )
        if on_item is not None:
            on_item(done)
    return records


def summarise(settings: list[Setting], records: list[Record]) -> list[Summary]:
    """Accuracy (overall and per question type), mean kept tokens and object recall per setting."""
    by_setting: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_setting[r.setting].append(r)
    summaries: list[Summary] = []
    dense_accuracy: dict[str, float] = {}
    reference_answers: dict[str, dict[str, str]] = {}
    for setting in settings:
        rows = by_setting.get(setting.label, [])
        if not rows:
            continue
        types: dict[str, list[bool]] = defaultdict(list)
        for r in rows:
            types[r.type].append(r.correct)
        recalls = [r.recall for r in rows if r.recall is not None]
        ranks = [r.rank for r in rows if r.rank is not None]
        summary = Summary(
            setting=setting,
            questions=len(rows),
            accuracy=float(np.mean([r.correct for r in rows])),
            per_type={t: float(np.mean(v)) for t, v in sorted(types.items())},
            mean_kept=float(np.mean([r.kept for r in rows])),
            mean_recall=float(np.mean(recalls)) if recalls else None,
            mean_rank=float(np.mean(ranks)) if ranks else None,
        )
        if setting.method == "dense":
            dense_accuracy[setting.backend] = summary.accuracy
        # A static neuron set is the reference on a narrowed model: compared with the reference's dense.
        base = dense_accuracy.get("reference" if setting.backend == "static" else setting.backend)
        summary.relative = summary.accuracy / base if base else None
        if setting.backend == "reference":
            reference_answers[setting.label] = {r.item: r.prediction for r in rows}
        else:
            ref = reference_answers.get(Setting(setting.method, setting.budget, merge=setting.merge).label)
            if ref:
                summary.agreement = float(np.mean([ref.get(r.item) == r.prediction for r in rows]))
        summaries.append(summary)
    return summaries


@dataclass
class EvalResult:
    model: str
    data: str
    config: EvalConfig
    settings: list[Setting]
    records: list[Record]
    summaries: list[Summary] = field(default_factory=list)
    geometry: tuple[int, int, int] = (336, 14, 576)  # image size, patch size, image tokens
    fidelity: list[Any] = field(default_factory=list)  # evaluation.fidelity.Fidelity per beta
