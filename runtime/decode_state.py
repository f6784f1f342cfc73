"""One request's decode bookkeeping, the same for every backend (ONNX Runtime on CPU or GPU, TensorRT).

In prefill the stacks give `new.{i}.key/value` [1, n_kv, L_i, hd] (L_i: the prompt, or the kept tokens
for the layers after the prune layer), which the backend writes into cache buffers sized once for
the whole answer. Each decode step runs the same stacks on one token: `input_ids` (the lower stack),
`position_ids` (the token's position: the full layers' length) and `past_length` (how many entries
of that stack's buffers hold tokens: the position for the full layers, the kept length for the
pruned ones), and gets `new.{i}.*` [1, n_kv, 1, hd], which the backend writes at each buffer's
current length. The backends own the storage (host arrays or device buffers); this class owns the
lengths, capacities and positions, by the names that `buildformat.names` declares.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import numpy as np

from buildformat.names import INPUT_IDS, PAST_LENGTH, POSITION_IDS, new_name, past_name
from runtime.backend import BackendError


@dataclass
class DecodeState:
    lengths: dict[str, int]  # past name -> positions written
    capacity: dict[str, int]  # past name -> positions its buffer holds
    position: int  # the next token's position id: the full layers' cached tokens
    image_start: int

    @classmethod
    def start(
        cls,
        new_lengths: Mapping[str, int],
        prompt: int,
        answer: int,
        image_start: int,
        size: Callable[[str, int, int], int] | None = None,
    ) -> DecodeState:
        """After prefill: `new_lengths` maps each new.* output of the stacks to its L; `answer` is the
        longest answer; `size(past name, L, answer)` is the buffer's capacity (default L + answer)."""
        if not new_lengths:
            raise BackendError("the prefill gave no cache outputs; rebuild the build directory")
        lengths = {past_name(name): length for name, length in new_lengths.items()}
        sizing = size or (lambda _name, length, more: length + more)
        capacity = {name: sizing(name, length, answer) for name, length in lengths.items()}
        return cls(lengths, capacity, prompt, image_start)

    def step_inputs(self, token_id: int, pasts: list[str], wanted: Collection[str]) -> dict[str, np.ndarray]:
        """The inputs of one stack that change every step: the token (the stack with the embedding), its
        position, and the valid length of the stack's buffers `pasts` (all of one length)."""
        values = {
            INPUT_IDS: np.array([[token_id]], dtype=np.int64),
            POSITION_IDS: np.array([self.position], dtype=np.int64),
            PAST_LENGTH: np.array([self.lengths[pasts[0]]], dtype=np.int64),
        }
        return {name: value for name, value in values.items() if name in wanted}

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
