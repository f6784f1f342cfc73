"""A vocabulary llama.cpp accepts for a model that is only ever fed token ids.

The benchmark's checkpoints have random weights and a byte-level BPE tokenizer; llama.cpp never sees text
here (llama-bench draws random ids, the correctness check passes ids), so the GGUF needs a vocabulary only
because llama.cpp refuses or misbehaves without one: with `tokenizer.ggml.model = "none"` llama-bench draws
`rand() % n_vocab` with n_vocab 0. A sentencepiece ("llama") vocabulary is the simplest llama.cpp loads:
<unk>/<s>/</s> at the checkpoint's ids, byte tokens `<0xNN>` (typed BYTE: llama.cpp looks the newline up
as `<0x0A>` when it loads an SPM vocabulary and aborts without it), then one plain token per remaining id.
"""

from __future__ import annotations

from dataclasses import dataclass

# gguf.TokenType's values (llama.cpp's llama_token_type), written as plain ints so this module needs no gguf.
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6
NEWLINE = 0x0A


class VocabError(ValueError):
    """The vocabulary cannot be laid out (too few ids, or colliding special ids)."""


@dataclass(frozen=True)
class Vocabulary:
    """One entry per token id: its text, its sentencepiece score and its type (NORMAL/UNKNOWN/CONTROL/BYTE)."""

    tokens: tuple[str, ...]
    scores: tuple[float, ...]
    types: tuple[int, ...]
    unk_id: int
    bos_id: int
    eos_id: int

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if len(self.scores) != n or len(self.types) != n:
            raise VocabError(
                f"tokens, scores and types must have one entry per id, got {n}, {len(self.scores)}, {len(self.types)}"
            )
        if len(set(self.tokens)) != n:  # llama.cpp maps text -> id too, and asserts both maps have n entries
            raise VocabError("token texts must be unique")
        for name in ("unk_id", "bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < n:
                raise VocabError(f"{name} {getattr(self, name)} is outside the vocabulary (0..{n - 1})")
        if f"<0x{NEWLINE:02X}>" not in self.tokens:
            raise VocabError("the newline byte token <0x0A> is missing (llama.cpp's SPM loader needs it)")

    @property
    def size(self) -> int:
        return len(self.tokens)


def id_only_vocabulary(size: int, bos_id: int = 1, eos_id: int = 2) -> Vocabulary:
    """`size` tokens: <s> and </s> at the model's ids, <unk> at the lowest free id, as many of the 256 byte
    tokens as fit in the next free ids (in byte order, so <0x0A> is among them for size >= 14), then plain
    tokens `tok<id>`. Scores fall with the id (sentencepiece merges prefer higher scores; the order is
    arbitrary here, no text is tokenized)."""
    if bos_id == eos_id:
        raise VocabError(f"bos and eos must be different ids, got {bos_id}")
    texts: dict[int, tuple[str, int]] = {bos_id: ("<s>", CONTROL), eos_id: ("</s>", CONTROL)}
    free = (i for i in range(size) if i not in texts)
    unk_id = next(free, None)
    if unk_id is None or max(bos_id, eos_id) >= size:
        raise VocabError(f"a vocabulary of {size} ids has no room for <unk>, <s> = {bos_id} and </s> = {eos_id}")
    texts[unk_id] = ("<unk>", UNKNOWN)
    # zip stops at the shorter: a vocabulary of fewer than 259 ids gets as many bytes as fit.
    for byte, token_id in zip(range(256), free, strict=False):
        texts[token_id] = (f"<0x{byte:02X}>", BYTE)
    for token_id in free:  # what the bytes left
        texts[token_id] = (f"tok{token_id}", NORMAL)
    ordered = [texts[i] for i in range(size)]
    return Vocabulary(
        tokens=tuple(text for text, _ in ordered),
        scores=tuple(0.0 if kind != NORMAL else -float(i) for i, (_, kind) in enumerate(ordered)),
        types=tuple(kind for _, kind in ordered),
        unk_id=unk_id,
        bos_id=bos_id,
        eos_id=eos_id,
    )
