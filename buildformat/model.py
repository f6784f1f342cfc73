"""The manifest's records of the checkpoint and the method: its geometry and special tokens, the
CoreMatching budgets it was traced with, and its prompt format and tokenizer files."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from buildformat.jsonfields import fail, take


@dataclass(frozen=True)
class ModelInfo:
    """The checkpoint's geometry and special tokens (the decoder's `text_config`, the vision tower's patches)."""

    source: str
    text_model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    image_size: int
    patch_size: int
    num_image_tokens: int
    image_token_id: int
    bos_token_id: int | None
    eos_token_id: int | tuple[int, ...] | None  # HF configs may list several
    pad_token_id: int | None

    @property
    def eos_token_ids(self) -> frozenset[int]:
        if self.eos_token_id is None:
            return frozenset()
        return frozenset((self.eos_token_id,) if isinstance(self.eos_token_id, int) else self.eos_token_id)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelInfo:
        where = "model"
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "eos_token_id":
                eos = data.get("eos_token_id")
                if isinstance(eos, list):
                    if not all(isinstance(e, int) for e in eos):
                        raise fail(f"{where}.eos_token_id", "should hold integers")
                    eos = tuple(eos)
                elif eos is not None and not isinstance(eos, int):
                    raise fail(f"{where}.eos_token_id", "should be an integer or a list of them")
                values[f.name] = eos
            elif f.name in ("source", "text_model_type"):
                values[f.name] = take(data, f.name, str, where)
            else:
                values[f.name] = take(data, f.name, int, where, optional=f.name in ("bos_token_id", "pad_token_id"))
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if isinstance(self.eos_token_id, tuple):
            out["eos_token_id"] = list(self.eos_token_id)
        return out


def _budget(value: Any) -> int | str:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise fail("corematching.token_budget", f"should be a positive integer or 'auto', not {value!r}")


@dataclass(frozen=True)
class CoreMatchingInfo:
    """The static budgets a CoreMatching build was traced with (absent for a dense build)."""

    token_budget: int | str  # image tokens kept after the prune layer, or "auto" (the count is data-dependent)
    token_ratio: float
    neuron_ratio: float
    prune_layer: int
    neuron_layers: tuple[int, ...]
    tokens_per_neuron_set: int
    core_neurons: int
    neuron_chunks: int
    auto_range: tuple[int, int]
    token_selector: str
    token_merge: str
    seed: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CoreMatchingInfo:
        where = "corematching"
        number = (int, float)
        return cls(
            token_budget=_budget(data.get("token_budget")),
            token_ratio=float(take(data, "token_ratio", number, where)),
            neuron_ratio=float(take(data, "neuron_ratio", number, where)),
            prune_layer=take(data, "prune_layer", int, where),
            neuron_layers=tuple(take(data, "neuron_layers", list, where)),
            tokens_per_neuron_set=take(data, "tokens_per_neuron_set", int, where),
            core_neurons=take(data, "core_neurons", int, where),
            neuron_chunks=take(data, "neuron_chunks", int, where),
            auto_range=tuple(take(data, "auto_range", list, where)),  # type: ignore[arg-type]
            token_selector=take(data, "token_selector", str, where),
            token_merge=take(data, "token_merge", str, where),
            seed=take(data, "seed", int, where),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dense": False}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class TokenizerInfo:
    tokenizer: str  # tokenizer.json
    chat_template: str
    preprocessor: str  # preprocessor_config.json: the image processor's settings
    # The chat template rendered around a marker, so the runtime needs no Jinja: replace `{question}`,
    # then repeat `image_token` num_image_tokens times, then tokenize. None: the runtime's own format.
    prompt: str | None = None
    image_token: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TokenizerInfo:
        where = "tokenizer"
        return cls(
            tokenizer=take(data, "tokenizer", str, where),
            chat_template=take(data, "chat_template", str, where),
            preprocessor=take(data, "preprocessor", str, where),
            prompt=take(data, "prompt", str, where, optional=True),
            image_token=take(data, "image_token", str, where, optional=True),
        )
