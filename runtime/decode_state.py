"""One request's decode bookkeeping, the same for every backend (ONNX Runtime on CPU or GPU, TensorRT).

The prefill graph gives `present.{i}.key/value` [1, n_kv, L_i, hd] (L_i: the prompt, or the kept
tokens after the prune layer) and the request-long decode inputs (the compacted FFN weights
`ffn.*`, a merge's `kept_bias`). Each decode step reads `past.{i}.*` buffers sized once for the
whole answer, takes `position_ids` (the full layers' length) and `past_kept_length` (the pruned
layers'), and gives `new.{i}.*` [1, n_kv, 1, hd], the new token's entries only, which the
backend writes at each buffer's current length. The backends own the storage (host arrays or
device buffers); this class owns the lengths, capacities and positions, by the names that
`buildformat.names` declares.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from buildformat.names import PAST_KEPT_LENGTH, POSITION_IDS, STEP_INPUTS, new_name, past_name
from runtime.backend import BackendError


@dataclass
class DecodeState:
    lengths: dict[str, int]  # past name -> positions written
    capacity: dict[str, int]  # past name -> positions its buffer holds
    position: int  # the next token's position id: the full layers' cached tokens
    kept_length: int  # the pruned layers' cached tokens (the full layers' for dense builds)
    image_start: int

    @classmethod
    def start(
        cls,
        present_lengths: Mapping[str, int],
        prompt: int,
        answer: int,
        image_start: int,
        size: Callable[[str, int, int], int] | None = None,
    ) -> DecodeState:
        """After prefill: `present_lengths` maps each present.* output to its L; `answer` is the
        longest answer; `size(past name, L, answer)` is the buffer's capacity (default L + answer)."""
        if not present_lengths:
            raise BackendError("the prefill gave no cache outputs; rebuild the build directory")
        lengths = {past_name(name): length for name, length in present_lengths.items()}
        sizing = size or (lambda _name, length, more: length + more)
        capacity = {name: sizing(name, length, answer) for name, length in lengths.items()}
        return cls(lengths, capacity, prompt, min(lengths.values()), image_start)

    def step_inputs(self, wanted: Iterator[str] | set[str] | list[str]) -> dict[str, np.ndarray]:
        """The step's position inputs, for those of STEP_INPUTS the decode graph takes."""
        values = {POSITION_IDS: self.position, PAST_KEPT_LENGTH: self.kept_length}
        return {name: np.array([values[name]], dtype=np.int64) for name in STEP_INPUTS if name in wanted}

    def check_room(self) -> None:
        """Refuses a step that would write past a buffer's end (the capacity was chosen at prefill)."""
        for name, length in self.lengths.items():
            if length >= self.capacity[name]:
                raise BackendError(
                    f"the answer outgrew the cache: {name} holds {self.capacity[name]} positions (sized at "
                    "prefill); ask for fewer new tokens"
                )

    def writes(self) -> list[tuple[str, str, int]]:
        """(past name, new name, index) of every entry the step just computed, in buffer order."""
        return [(name, new_name(name), length) for name, length in self.lengths.items()]

    def advance(self) -> None:
        """One token more in every buffer."""
        for name in self.lengths:
            self.lengths[name] += 1
        self.position += 1
        self.kept_length += 1
