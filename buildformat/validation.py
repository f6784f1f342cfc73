"""The manifest's validation record: what a build was checked against, by which criteria, and how.

`python -m export build` (and `validate`) fill it (export/validate.py, docs/architecture.md,
Validation); a build made with `--no-validate` records `SkippedValidation` instead. The JSON is
the one the manifest has always held, field for field, so reading and writing it back gives the
same object: `ValidationRecord.from_json(record.to_json()) == record`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from buildformat.jsonfields import fail, take

REFERENCES = ("transformers", "coreMatching")  # dense builds, CoreMatching builds
WHERE = "validation"
NUMBER = (int, float)


def _number(data: Mapping[str, Any], key: str, where: str, optional: bool = False) -> float | None:
    value = take(data, key, NUMBER, where, optional)
    if isinstance(value, bool):  # JSON true is not a measure
        raise fail(f"{where}.{key}", f"should be a number, not {value!r}")
    return None if value is None else float(value)


def _records(data: Mapping[str, Any], key: str, where: str) -> list[Mapping[str, Any]]:
    items = take(data, key, list, where)
    if not all(isinstance(item, dict) for item in items):
        raise fail(f"{where}.{key}", "holds an entry that is not an object")
    return items


@dataclass(frozen=True)
class Criteria:
    """What a build must meet. The logit tolerance of a case is `absolute + relative * max |reference logit|`."""

    absolute: float
    relative: float
    min_overlap: float  # share of the reference's kept tokens / core neurons the build must also select
    near_ties: bool  # greedy tokens may part only where the reference's top two logits are within tolerance
    # A kept token the reference did not keep still counts as shared when its reference score is within
    # this share of the score range below the reference's k-th score (a near-tie at the cut); 0: none.
    score_band: float = 0.0
    # The logit tolerance is multiplied by this where the build's kept tokens or core neurons differ
    # from the reference's (within min_overlap): the two sides then run slightly different sparse models.
    selection_slack: float = 1.0

    def __post_init__(self) -> None:
        where = f"{WHERE}.criteria"
        if self.absolute < 0 or self.relative < 0 or self.score_band < 0:
            raise fail(where, "has a negative tolerance or score band")
        if not 0 <= self.min_overlap <= 1:
            raise fail(f"{where}.min_overlap", f"is {self.min_overlap}, not a share in [0, 1]")
        if self.selection_slack < 1:
            raise fail(f"{where}.selection_slack", f"is {self.selection_slack}, below 1 (it widens the tolerance)")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Criteria:
        where = f"{WHERE}.criteria"
        return cls(
            absolute=_number(data, "absolute", where),  # type: ignore[arg-type]
            relative=_number(data, "relative", where),  # type: ignore[arg-type]
            min_overlap=_number(data, "min_overlap", where),  # type: ignore[arg-type]
            near_ties=take(data, "near_ties", bool, where),
            score_band=_number(data, "score_band", where),  # type: ignore[arg-type]
            selection_slack=_number(data, "selection_slack", where),  # type: ignore[arg-type]
        )

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class ValidationCase:
    """One prompt run through the build and through the reference (a case fails when `problems` is not empty)."""

    name: str
    question: str
    prompt_tokens: int
    steps: int  # greedy tokens compared
    max_logit_diff: float  # over the steps both sides were fed the same tokens
    tolerance: float
    max_vision_diff: float
    equal_tokens: int  # leading greedy tokens that agree
    kept_equal: bool | None  # None for dense builds
    core_equal: bool | None
    kept_overlap: float | None  # share of the reference's kept tokens the build kept
    core_overlap: float | None  # the same for core neurons, in the worst layer
    kept_image_tokens: int | None  # how many the build kept; None: dense (all)
    problems: tuple[str, ...] = ()  # one line per failed check

    def __post_init__(self) -> None:
        if not 0 <= self.equal_tokens <= self.steps:
            raise fail(f"{WHERE}.cases.{self.name}.equal_tokens", f"is {self.equal_tokens}, not in 0..{self.steps}")

    @property
    def passed(self) -> bool:
        return not self.problems

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ValidationCase:
        where = f"{WHERE}.cases.{data.get('name', '?')}"
        problems = take(data, "problems", list, where)
        if not all(isinstance(p, str) for p in problems):
            raise fail(f"{where}.problems", "should hold strings")
        case = cls(
            name=take(data, "name", str, where),
            question=take(data, "question", str, where),
            prompt_tokens=take(data, "prompt_tokens", int, where),
            steps=take(data, "steps", int, where),
            max_logit_diff=_number(data, "max_logit_diff", where),  # type: ignore[arg-type]
            tolerance=_number(data, "tolerance", where),  # type: ignore[arg-type]
            max_vision_diff=_number(data, "max_vision_diff", where),  # type: ignore[arg-type]
            equal_tokens=take(data, "equal_tokens", int, where),
            kept_equal=take(data, "kept_equal", bool, where, optional=True),
            core_equal=take(data, "core_equal", bool, where, optional=True),
            kept_overlap=_number(data, "kept_overlap", where, optional=True),
            core_overlap=_number(data, "core_overlap", where, optional=True),
            kept_image_tokens=take(data, "kept_image_tokens", int, where, optional=True),
            problems=tuple(problems),
        )
        if data.get("passed") is not case.passed:
            raise fail(f"{where}.passed", "disagrees with the case's problems")
        return case

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return out | {"problems": list(self.problems), "passed": self.passed}


@dataclass(frozen=True)
class DistanceToFloat:
    """What quantizing the weights costs the reference itself, on one case (reported, not a criterion)."""

    case: str
    equal_tokens: int  # leading greedy tokens of the float and the fake-quantized reference that agree
    steps: int
    max_logit_diff: float
    relative_logit_diff: float  # max_logit_diff over the float reference's largest |logit|
    first_token_equal: bool

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DistanceToFloat:
        where = f"{WHERE}.quantization.distance_to_float"
        return cls(
            case=take(data, "case", str, where),
            equal_tokens=take(data, "equal_tokens", int, where),
            steps=take(data, "steps", int, where),
            max_logit_diff=_number(data, "max_logit_diff", where),  # type: ignore[arg-type]
            relative_logit_diff=_number(data, "relative_logit_diff", where),  # type: ignore[arg-type]
            first_token_equal=take(data, "first_token_equal", bool, where),
        )

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class ArithmeticCheck:
    """The build at another MatMulNBits accuracy level against the reference, on one case (measured only)."""

    case: str
    max_logit_diff: float
    equal_tokens: int
    steps: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> ArithmeticCheck:
        return cls(
            case=take(data, "case", str, where),
            max_logit_diff=_number(data, "max_logit_diff", where),  # type: ignore[arg-type]
            equal_tokens=take(data, "equal_tokens", int, where),
            steps=take(data, "steps", int, where),
        )

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


ACCURACY_LEVEL = "accuracy_level_"  # the JSON key of the measured level's checks: accuracy_level_<level>


@dataclass(frozen=True)
class QuantizationChecks:
    """A quantized build's checks beyond its cases (docs/quantization.md, validation)."""

    weights: str  # "int8" or "int4"
    block_size: int | None  # int4's; None for int8
    validated_at: str  # the arithmetic and the criteria the cases were held to, in words
    distance_to_float: tuple[DistanceToFloat, ...]
    fast_accuracy_level: int  # the MatMulNBits accuracy level measured besides the validated one
    fast: tuple[ArithmeticCheck, ...]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QuantizationChecks:
        where = f"{WHERE}.quantization"
        levels = [key for key in data if key.startswith(ACCURACY_LEVEL)]
        if len(levels) != 1 or not levels[0].removeprefix(ACCURACY_LEVEL).isdigit():
            raise fail(where, f"should hold one {ACCURACY_LEVEL}<level> list, not {levels}")
        key = levels[0]
        return cls(
            weights=take(data, "weights", str, where),
            block_size=take(data, "block_size", int, where, optional=True),
            validated_at=take(data, "validated_at", str, where),
            distance_to_float=tuple(DistanceToFloat.from_json(d) for d in _records(data, "distance_to_float", where)),
            fast_accuracy_level=int(key.removeprefix(ACCURACY_LEVEL)),
            fast=tuple(ArithmeticCheck.from_json(c, f"{where}.{key}") for c in _records(data, key, where)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "weights": self.weights,
            "block_size": self.block_size,
            "validated_at": self.validated_at,
            "distance_to_float": [d.to_json() for d in self.distance_to_float],
            f"{ACCURACY_LEVEL}{self.fast_accuracy_level}": [c.to_json() for c in self.fast],
        }


@dataclass(frozen=True)
class ValidationRecord:
    """A build's validation: the reference, the criteria, the ONNX Runtime level it ran at, every case."""

    reference: str  # "transformers" (dense builds) or "coreMatching"
    precision: str  # the build's, whose criteria apply
    criteria: Criteria
    optimization_level: str  # ONNX Runtime's graph optimization level, e.g. "ORT_ENABLE_ALL"
    cases: tuple[ValidationCase, ...]
    quantization: QuantizationChecks | None = None  # a quantized build's further checks

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise fail(f"{WHERE}.reference", f"is {self.reference!r}, not one of {', '.join(REFERENCES)}")
        if not self.cases:
            raise fail(f"{WHERE}.cases", "is empty")

    @property
    def passed(self) -> bool:
        return all(case.passed for case in self.cases)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ValidationRecord:
        record = cls(
            reference=take(data, "reference", str, WHERE),
            precision=take(data, "precision", str, WHERE),
            criteria=Criteria.from_json(take(data, "criteria", dict, WHERE)),
            optimization_level=take(data, "optimization_level", str, WHERE),
            cases=tuple(ValidationCase.from_json(c) for c in _records(data, "cases", WHERE)),
            quantization=(
                QuantizationChecks.from_json(take(data, "quantization", dict, WHERE))
                if data.get("quantization") is not None
                else None
            ),
        )
        if data.get("passed") is not record.passed:
            raise fail(f"{WHERE}.passed", "disagrees with its cases")
        return record

    def to_json(self) -> dict[str, Any]:
        out = {
            "passed": self.passed,
            "reference": self.reference,
            "precision": self.precision,
            "criteria": self.criteria.to_json(),
            "optimization_level": self.optimization_level,
            "cases": [case.to_json() for case in self.cases],
        }
        return out | ({"quantization": self.quantization.to_json()} if self.quantization is not None else {})


@dataclass(frozen=True)
class SkippedValidation:
    """A build made without validation (`--no-validate`): its `passed` is None, neither passed nor failed."""

    reason: str = "--no-validate"

    @property
    def passed(self) -> None:
        return None

    def to_json(self) -> dict[str, Any]:
        return {"passed": None, "skipped": self.reason}


Validation = ValidationRecord | SkippedValidation


def validation_from_json(data: Mapping[str, Any]) -> Validation:
    """The manifest's `validation` object: a skipped validation, or a record."""
    if data.get("skipped") is not None:
        if data.get("passed") is not None:
            raise fail(f"{WHERE}.passed", "is set for a skipped validation")
        return SkippedValidation(take(data, "skipped", str, WHERE))
    return ValidationRecord.from_json(data)
