"""A follow-up question about another object of the same image, in a two-turn conversation.

The selectors condition the kept image tokens on the last prompt token (docs/method.md). A server that takes
whole conversations re-runs the prefill for every request, so each request selects anew for its last question,
the earlier turns before it. Here Q1 is an item's question and Q2 a question about other objects of its image
(`Question.objects` disjoint). Under dense and the default selector and merge at budget k: Q1 is answered alone
(A1), then Q2 in the conversation [user: image + Q1, assistant: A1, user: Q2] (the checkpoint's chat template)
and alone. At budget k, Q2's conversation is also answered with Q1's kept tokens imposed (what a server keeping
the first request's selection would hold), and the object patches each selection keeps are counted.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coreMatching import CoreMatchingConfig, CoreMatchingLlava
from coreMatching.errors import ConfigError
from coreMatching.rules import PruneLayerView
from coreMatching.selectors import DEFAULT_MERGE, DEFAULT_SELECTOR
from evaluation.evaluate import EvalConfig, Setting
from models.answer import build_prompt
from vqadata import shapes
from vqadata.data import is_correct, normalise
from vqadata.shapes import QUESTION_TYPES, SPLITS, DatasetError, Example, Question

log = logging.getLogger(__name__)

# The follow-up questions come from their own random stream, apart from the split's (keyed (split, index)).
FOLLOWUP_STREAM = 7
ATTEMPTS_PER_TYPE = 8  # draws of one question type before the next type is tried
SCAN_FACTOR = 4  # at most count * SCAN_FACTOR items are read to find count pairs
OUTPUTS = ("results.json", "README.md")
_defaults = EvalConfig()


# ----------------------------------------------------------------------------- pairs


def is_other_object(first: Question, second: Question) -> bool:
    """Both questions are about some object, and no object of the second is one of the first's."""
    return bool(first.objects) and bool(second.objects) and not set(first.objects) & set(second.objects)


@dataclass(frozen=True)
class FollowupPair:
    """An item of a split (its image and question, Q1) with a second question about other objects (Q2)."""

    example: Example
    second: Question

    def __post_init__(self) -> None:
        if not is_other_object(self.example.question, self.second):
            raise DatasetError(f"{self.example.image_id}: the second question shares an object with the first")

    @property
    def first(self) -> Question:
        return self.example.question

    def patches(self, question: Question) -> np.ndarray:
        """bool [576]: the patches of the question's objects."""
        return shapes.object_patches(self.example.scene, question.objects)


def followup_question(
    scene: shapes.Scene, first: Question, rng: np.random.Generator, preferred: str
) -> Question | None:
    """A question about other objects than `first`'s: of type `preferred` where the scene allows one, else of
    the next type that does (in QUESTION_TYPES order), else None."""
    start = QUESTION_TYPES.index(preferred)
    for offset in range(len(QUESTION_TYPES)):
        qtype = QUESTION_TYPES[(start + offset) % len(QUESTION_TYPES)]
        for _ in range(ATTEMPTS_PER_TYPE):
            second = shapes.ask(scene, qtype, rng)
            if second is not None and is_other_object(first, second):
                return second
    return None


def build_pairs(split: str, count: int, seed: int = 0, start: int = 0) -> list[FollowupPair]:
    """The first `count` items of `split` from `start` that have another object to ask about, each with its Q2.

    Q1 is the item's own question (the split cycles through the types); Q2's preferred type cycles once every
    five items, so 25 consecutive items propose every (Q1, Q2) type combination. Items with one object, or whose
    Q1 is about every object, have none and are skipped.
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    pairs: list[FollowupPair] = []
    for index in range(start, start + count * SCAN_FACTOR):
        if len(pairs) == count:
            break
        example = shapes.example(split, index)
        rng = np.random.default_rng((SPLITS[split], FOLLOWUP_STREAM, seed, index))
        preferred = QUESTION_TYPES[(index // len(QUESTION_TYPES) + seed) % len(QUESTION_TYPES)]
        second = followup_question(example.scene, example.question, rng, preferred)
        if second is not None:
            pairs.append(FollowupPair(example, second))
    if len(pairs) < count:
        raise DatasetError(f"only {len(pairs)} of {count} pairs in {count * SCAN_FACTOR} items of {split}")
    return pairs


def render_conversation(processor: Any, first_question: str, first_answer: str, second_question: str) -> str:
    """The checkpoint's chat template of [user: image + Q1, assistant: A1, user: Q2], ending with the assistant's
    turn (the one-turn form is `models.answer.build_prompt`)."""
    turns = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": first_question}]},
        {"role": "assistant", "content": [{"type": "text", "text": first_answer}]},
        {"role": "user", "content": [{"type": "text", "text": second_question}]},
    ]
    return processor.apply_chat_template(turns, add_generation_prompt=True)


# ----------------------------------------------------------------------------- configuration and results


@dataclass(frozen=True)
class FollowupConfig:
    split: str = "test"
    count: int = 500  # conversations
    seed: int = 0  # of the follow-up questions
    budget: int = 64  # image tokens the pruned setting keeps
    max_new_tokens: int = _defaults.max_new_tokens
    model_dir: Path | None = None  # None: the embedded default model

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ConfigError(f"unknown split {self.split!r}; known: {', '.join(SPLITS)}")
        if self.count < 1:
            raise ConfigError(f"count must be at least 1, got {self.count}")
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
            raise ConfigError(f"budget must be a positive integer, got {self.budget!r}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")

    @property
    def pruned(self) -> Setting:
        """The evaluation's default setting at this budget: the default selector with the default merge."""
        return Setting(DEFAULT_SELECTOR, self.budget, merge=DEFAULT_MERGE)

    def corematching(self, setting: Setting, num_image_tokens: int) -> CoreMatchingConfig:
        """The CoreMatchingConfig the evaluation gives the same setting (its prune layer, beta and seed)."""
        return EvalConfig(max_new_tokens=self.max_new_tokens).corematching(setting, num_image_tokens)


@dataclass(frozen=True)
class Answered:
    text: str
    correct: bool


@dataclass(frozen=True)
class SettingAnswers:
    """One pair under one setting."""

    setting: str
    first: Answered  # Q1 alone: its text is A1 of the conversation
    followup: Answered  # Q2 after Q1 and A1
    alone: Answered  # Q2 alone
    stale: Answered | None = None  # Q2 after Q1 and A1 with Q1's kept tokens (pruned settings only)


@dataclass(frozen=True)
class Coverage:
    """Shares of object patches among the kept tokens of the pruned setting."""

    second_by_followup: float  # Q2's patches, selection conditioned on Q2 in the conversation (the server)
    second_by_alone: float  # Q2's patches, selection conditioned on Q2 asked alone
    second_by_first: float  # Q2's patches, selection conditioned on Q1 (the first request's)
    first_by_first: float  # Q1's patches, Q1's selection
    first_by_followup: float  # Q1's patches, the follow-up's selection
    overlap: float  # share of the follow-up's kept tokens that Q1's selection kept too


@dataclass(frozen=True)
class PairRecord:
    id: str
    first: Question
    second: Question
    answers: tuple[SettingAnswers, ...]
    coverage: Coverage | None = None


@dataclass(frozen=True)
class Rate:
    correct: int
    total: int
    accuracy: float | None  # correct / total (None: nothing asked)

    @classmethod
    def of(cls, flags: Iterable[bool]) -> Rate:
        flags = list(flags)
        return cls(sum(flags), len(flags), sum(flags) / len(flags) if flags else None)


@dataclass(frozen=True)
class Rates:
    first: Rate  # Q1 alone
    followup: Rate  # Q2 in the conversation
    alone: Rate  # Q2 alone
    stale: Rate | None  # Q2 in the conversation with Q1's kept tokens (pruned settings)
    followup_on_type: Rate  # Q2 in the conversation answered with a word of Q2's kind (a colour for a colour...)


@dataclass(frozen=True)
class SettingSummary:
    setting: str
    overall: Rates
    by_type: dict[str, Rates]  # keyed by Q2's type


@dataclass(frozen=True)
class CoverageSummary:
    pairs: int
    mean: Coverage  # each share's mean over the pairs
    chance: float  # budget / n_img: the share a random selection keeps


@dataclass(frozen=True)
class FollowupReport:
    model: str
    config: FollowupConfig
    num_image_tokens: int
    items: tuple[int, int]  # the first and the last item of the split the pairs come from
    first_types: dict[str, int]
    second_types: dict[str, int]
    type_pairs: dict[str, int]  # "Q1 type -> Q2 type" -> pairs
    settings: tuple[SettingSummary, ...]
    coverage: CoverageSummary | None
    records: tuple[PairRecord, ...] = field(repr=False, default=())

    def summary(self, setting: str) -> SettingSummary:
        return next(s for s in self.settings if s.setting == setting)


# ----------------------------------------------------------------------------- answering


class ImposedSelection(CoreMatchingLlava):
    """The reference with the kept image tokens given instead of selected: the prefill a server would hold for
    the follow-up had it kept the first request's selection. The image tokens' prune-layer activations depend
    only on the tokens before the image, the same in both prompts, so the merge groups are the first request's."""

    def __init__(self, model: Any, config: CoreMatchingConfig, kept: Sequence[int]) -> None:
        super().__init__(model, config)
        self.kept = list(kept)

    def _select_image_tokens(self, view: PruneLayerView) -> tuple[torch.Tensor, torch.Tensor]:
        device = view.activations.device
        kept = torch.tensor(sorted(self.kept), dtype=torch.long, device=device)  # [k] ascending
        return kept, torch.zeros(view.num_image_tokens, device=device)


def coverage_of(pair: FollowupPair, first: Sequence[int], followup: Sequence[int], alone: Sequence[int]) -> Coverage:
    """Each question's object patches among the kept tokens (indices into the image's 576) of Q1's selection,
    the follow-up's and Q2-alone's."""
    q1, q2 = pair.patches(pair.first), pair.patches(pair.second)  # bool [576] each

    def share(mask: np.ndarray, kept: Sequence[int]) -> float:
        return float(mask[np.asarray(kept, dtype=np.int64)].sum() / mask.sum())

    overlap = len(set(first) & set(followup)) / len(followup)
    return Coverage(
        share(q2, followup), share(q2, alone), share(q2, first), share(q1, first), share(q1, followup), overlap
    )


class FollowupRunner:
    """Answers pairs under dense and the pruned setting of a config with the PyTorch reference."""

    def __init__(self, model: Any, processor: Any, config: FollowupConfig) -> None:
        from models.loading import num_image_tokens

        self.model, self.processor, self.config = model, processor, config
        self.num_image_tokens = num_image_tokens(model.config)
        self.pruned_config = config.corematching(config.pruned, self.num_image_tokens)
        dense = config.corematching(Setting("dense", self.num_image_tokens), self.num_image_tokens)
        self.references = {
            "dense": CoreMatchingLlava(model, dense),
            config.pruned.label: CoreMatchingLlava(model, self.pruned_config),
        }

    def _encode(self, image: Any, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.processor(images=image, text=prompt, return_tensors="pt")
        return inputs["input_ids"], inputs["pixel_values"]  # [1, S], [1, 3, H, W]

    def _generate(
        self, reference: CoreMatchingLlava, input_ids: torch.Tensor, features: torch.Tensor, gold: str
    ) -> tuple[Answered, list[int] | None]:
        """Greedy answer, scored; and the kept image tokens (None: every token)."""
        tokens: list[int] = []
        kept: list[int] | None = None
        stream = reference.stream(input_ids, None, self.config.max_new_tokens, image_features=features)
        for token, _logits, state in stream:
            if not tokens and state.kept_image_tokens.numel() < self.num_image_tokens:
                kept = state.kept_image_tokens.tolist()
            tokens.append(token)
        text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return Answered(text, is_correct(text, (gold,))), kept

    def answer(self, pair: FollowupPair) -> PairRecord:
        image = pair.example.image()
        first_ids, pixels = self._encode(image, build_prompt(self.processor, pair.first.text))
        second_ids, _ = self._encode(image, build_prompt(self.processor, pair.second.text))
        features = self.references["dense"].image_features(pixels.to(self.model.dtype))  # [n_img, d], shared
        answers: list[SettingAnswers] = []
        coverage: Coverage | None = None
        for name, reference in self.references.items():
            first, first_kept = self._generate(reference, first_ids, features, pair.first.answer)
            prompt = render_conversation(self.processor, pair.first.text, first.text, pair.second.text)
            conversation_ids, _ = self._encode(image, prompt)
            followup, followup_kept = self._generate(reference, conversation_ids, features, pair.second.answer)
            alone, alone_kept = self._generate(reference, second_ids, features, pair.second.answer)
            stale = None
            if first_kept is not None and followup_kept is not None and alone_kept is not None:
                imposed = ImposedSelection(self.model, self.pruned_config, first_kept)
                stale, _ = self._generate(imposed, conversation_ids, features, pair.second.answer)
                if pair.patches(pair.second).shape[0] == self.num_image_tokens:  # a test model's may differ
                    coverage = coverage_of(pair, first_kept, followup_kept, alone_kept)
            answers.append(SettingAnswers(name, first, followup, alone, stale))
        return PairRecord(pair.example.image_id, pair.first, pair.second, tuple(answers), coverage)


def answer_pairs(
    model: Any,
    processor: Any,
    pairs: Sequence[FollowupPair],
    config: FollowupConfig,
    on_pair: Callable[[int], None] | None = None,
    model_name: str = "",
) -> FollowupReport:
    """Every pair answered under dense and the config's pruned setting; on_pair(done) reports progress."""
    runner = FollowupRunner(model, processor, config)
    records: list[PairRecord] = []
    with torch.inference_mode():
        for done, pair in enumerate(pairs, 1):
            records.append(runner.answer(pair))
            if on_pair is not None:
                on_pair(done)
    items = (pairs[0].example.index, pairs[-1].example.index) if pairs else (0, -1)
    report = summarise(records, config, runner.num_image_tokens, items, model_name)
    log.info("answered %d follow-up conversations (items %d to %d)", len(records), *items)
    return report


def run_followup(config: FollowupConfig, on_pair: Callable[[int], None] | None = None) -> FollowupReport:
    """Load the model (the embedded default unless config.model_dir), build the pairs, answer them."""
    from models import default_model_dir, load_llava

    model, processor = load_llava(config.model_dir or default_model_dir())
    pairs = build_pairs(config.split, config.count, config.seed)
    name = "embedded default (models/default)" if config.model_dir is None else str(config.model_dir)
    return answer_pairs(model, processor, pairs, config, on_pair, name)


# ----------------------------------------------------------------------------- summaries and report


# The words that answer each type of question: a follow-up answered outside its type's words was misread.
ANSWER_WORDS: dict[str, frozenset[str]] = {
    "colour": frozenset(shapes.COLOURS),
    "shape": frozenset(shapes.SHAPES),
    "count": frozenset(shapes.NUMBERS),
    "presence": frozenset({"yes", "no"}),
    "position": frozenset({"left", "right", "above", "below"}),
}


def _rates(rows: Sequence[tuple[Question, SettingAnswers]]) -> Rates:
    stale = [a.stale.correct for _, a in rows if a.stale is not None]
    return Rates(
        first=Rate.of(a.first.correct for _, a in rows),
        followup=Rate.of(a.followup.correct for _, a in rows),
        alone=Rate.of(a.alone.correct for _, a in rows),
        stale=Rate.of(stale) if stale and len(stale) == len(rows) else None,
        followup_on_type=Rate.of(normalise(a.followup.text) in ANSWER_WORDS[q.type] for q, a in rows),
    )


def summarise(
    records: Sequence[PairRecord], config: FollowupConfig, n_img: int, items: tuple[int, int], model: str = ""
) -> FollowupReport:
    settings: list[SettingSummary] = []
    for i, name in enumerate(a.setting for a in (records[0].answers if records else ())):
        rows = [(r.second, r.answers[i]) for r in records]
        types = [t for t in QUESTION_TYPES if any(q.type == t for q, _ in rows)]
        by_type = {t: _rates([(q, a) for q, a in rows if q.type == t]) for t in types}
        settings.append(SettingSummary(name, _rates(rows), by_type))
    covered = [r.coverage for r in records if r.coverage is not None]
    coverage = None
    if covered:
        mean = Coverage(**{f.name: float(np.mean([getattr(c, f.name) for c in covered])) for f in fields(Coverage)})
        coverage = CoverageSummary(len(covered), mean, config.budget / n_img)
    firsts, seconds = Counter(r.first.type for r in records), Counter(r.second.type for r in records)
    first_types, second_types = ({t: c[t] for t in QUESTION_TYPES if c[t]} for c in (firsts, seconds))
    combos = dict(sorted(Counter(f"{r.first.type} -> {r.second.type}" for r in records).items()))
    return FollowupReport(
        model, config, n_img, items, first_types, second_types, combos, tuple(settings), coverage, tuple(records)
    )


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def _rate(rate: Rate | None, counts: bool = True) -> str:
    if rate is None or rate.accuracy is None:
        return ""
    return f"{_pct(rate.accuracy)} ({rate.correct}/{rate.total})" if counts else _pct(rate.accuracy)


def _ratio(rate: Rate | None, dense: Rate) -> str:
    return "" if rate is None or rate.accuracy is None or not dense.accuracy else _pct(rate.accuracy / dense.accuracy)


def markdown(report: FollowupReport, command: str) -> str:
    cfg, n, (first, last) = report.config, len(report.records), report.items
    dense, pruned = report.summary("dense"), report.summary(cfg.pruned.label)
    d, p = dense.overall, pruned.overall
    lines = [
        "# A follow-up question about another object of the same image",
        "",
        f"Generated by:\n\n    {command}\n",
        f"Model: `{report.model}`, PyTorch reference. Data: shapes dataset, {cfg.split} split, {n} two-turn "
        f"conversations from items {first} to {last} of the split (the {last - first + 1 - n} others have one "
        f"object, or their question is about every object), follow-up seed {cfg.seed}. Q1 is the item's "
        "question; Q2 is about objects of the same image none of which Q1 is about (`Question.objects` "
        "disjoint, both non-empty). A1 is the setting's own greedy answer to Q1 asked alone; the conversation "
        "[user: image + Q1, assistant: A1, user: Q2] is rendered by the checkpoint's chat template and its "
        f"whole prefill re-run, as the server does. Pruned: `{cfg.pruned.label}` (the default selector and "
        f"merge, prune layer {_defaults.prune_layer}, beta {_defaults.neuron_ratio}). Greedy, at most "
        f"{cfg.max_new_tokens} new tokens, exact match after normalisation. *In kind*: the follow-up was "
        "answered with a word of its type (a colour for a colour question...), right or wrong.",
        "",
        "## Accuracy (%)",
        "",
        "| setting | Q1 alone | Q2 in the conversation | Q2 alone | conversation - alone (points) | in kind |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in report.settings:
        r = s.overall
        gap = f"{100 * ((r.followup.accuracy or 0) - (r.alone.accuracy or 0)):+.1f}"
        row = [s.setting, _rate(r.first), _rate(r.followup), _rate(r.alone), gap, _rate(r.followup_on_type)]
        lines.append("| " + " | ".join(row) + " |")
    if p.stale is not None:
        lines.append(f"| {pruned.setting} with Q1's kept tokens | | {_rate(p.stale)} | | | |")
    shares = [_ratio(p.first, d.first), _ratio(p.followup, d.followup), _ratio(p.alone, d.alone)]
    lines.append(f"| {pruned.setting}, share of dense | " + " | ".join(shares) + " | | |")
    if report.coverage is not None:
        c, chance = report.coverage.mean, report.coverage.chance
        lines += [
            "",
            f"## Object patches among the {cfg.budget} kept tokens (%)",
            "",
            f"Mean over {report.coverage.pairs} conversations of the share of a question's object patches (those at "
            f"least 10% covered) that a selection keeps; a random selection keeps {_pct(chance)}.",
            "",
            "| selection conditioned on | Q2's objects | Q1's objects |",
            "|---|---:|---:|",
            f"| Q2 in the conversation (the server re-selects) | {_pct(c.second_by_followup)} | "
            f"{_pct(c.first_by_followup)} |",
            f"| Q2 asked alone | {_pct(c.second_by_alone)} | |",
            f"| Q1 (the first request's selection, kept) | {_pct(c.second_by_first)} | {_pct(c.first_by_first)} |",
            "",
            f"The follow-up's selection and Q1's have {_pct(c.overlap)}% of their kept tokens in common.",
        ]
    head = ["Q2 type", "pairs", "dense: conversation", "alone", "in kind", f"{pruned.setting}: conversation"]
    head += ["alone", "with Q1's kept tokens", "in kind"]
    lines += ["", "## By type of the follow-up question (%)", ""]
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for t, count in report.second_types.items():
        dt, pt = dense.by_type[t], pruned.by_type[t]
        cells = [dt.followup, dt.alone, dt.followup_on_type, pt.followup, pt.alone, pt.stale, pt.followup_on_type]
        lines.append(f"| {t} | {count} | " + " | ".join(_rate(r, counts=False) for r in cells) + " |")
    lines += ["", "## Question types", "", "| type | as Q1 | as Q2 |", "|---|---:|---:|"]
    for t in QUESTION_TYPES:
        lines.append(f"| {t} | {report.first_types.get(t, 0)} | {report.second_types.get(t, 0)} |")
    return "\n".join(lines) + "\n"


def write_report(report: FollowupReport, out_dir: Path, command: str) -> list[Path]:
    """results.json (every conversation and the summaries) and README.md (the tables) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / name for name in OUTPUTS]
    paths[0].write_text(json.dumps(asdict(report), indent=1, default=str) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(report, command), encoding="utf-8")
    return paths
