"""Prompt tokenization and streaming detokenization for the torch-free runtime (tokenizers only).

A conversation (runtime/chat.py) is rendered with the checkpoint's chat template, which the build
carries; the single image token is repeated `num_image_tokens` times (as transformers' LlavaProcessor
expands it), and tokenizer.json, whose post-processor prepends `<s>`, tokenizes the result. The ids
equal the transformers processor's `input_ids` for the same conversation. The tokenizer's character
offsets give where the image's tokens begin (`EncodedPrompt.image_start`): the template placed them,
so nothing searches the ids for them. The build's manifest also records the one-turn prompt that
transformers rendered around a `{question}` marker; the Jinja rendering is checked against it when
the tokenizer loads, so a template this runtime renders differently fails then, not in an answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from buildformat import Manifest
from runtime.chat import ChatTemplate, Conversation

QUESTION_MARKER = "{question}"
REPLACEMENT_CHAR = "\ufffd"


class PromptError(ValueError):
    """A question cannot be turned into a prompt for this build; the message names the fix."""


class PromptTooLong(PromptError):
    """The prompt is longer than the build's maximum prompt length."""


@dataclass(frozen=True)
class EncodedPrompt:
    """A question's prompt, tokenized: its ids and where the image's tokens begin in them."""

    input_ids: np.ndarray  # [1, S] int64
    image_start: int  # index of the first of the image's num_image_tokens tokens in input_ids[0]

    def __post_init__(self) -> None:
        ids = self.input_ids
        if ids.ndim != 2 or ids.shape[0] != 1 or ids.dtype != np.int64:
            raise ValueError(f"input_ids must be [1, S] int64, got {ids.shape} {ids.dtype}")
        if not 0 <= self.image_start < ids.shape[1]:
            raise ValueError(f"image_start {self.image_start} is outside the {ids.shape[1]}-token prompt")

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[1])


class PromptTokenizer:
    """The build's prompt format and tokenizer: question -> input_ids, generated ids -> text."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        image_token: str,
        image_token_id: int,
        num_image_tokens: int,
        max_prompt_tokens: int,
        eos_token_ids: Sequence[int],
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.image_token = image_token
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self._eos_token_ids = tuple(eos_token_ids)

    @classmethod
    def from_build(cls, build_dir: str | Path, manifest: Manifest) -> PromptTokenizer:
        section, model = manifest.tokenizer, manifest.model
        path = Path(build_dir) / section.tokenizer
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; the build is incomplete, rebuild it")
        image_token = section.image_token
        if image_token is None or "S" not in manifest.dims:
            raise ValueError("the build's manifest has no image token or no prompt length; rebuild it")
        image_token_id, num_image_tokens = model.image_token_id, model.num_image_tokens
        max_prompt_tokens = manifest.dims["S"].max
        eos_ids = sorted(model.eos_token_ids)
        tokenizer = Tokenizer.from_file(str(path))
        if tokenizer.token_to_id(image_token) != image_token_id:
            raise ValueError(
                f"{path} gives {image_token} the id {tokenizer.token_to_id(image_token)}, the model expects "
                f"{image_token_id}; rebuild the build directory"
            )
        template = ChatTemplate.from_build(build_dir, section.chat_template)
        if section.prompt is not None:
            # The one-turn prompt transformers rendered at build time: the Jinja rendering must agree.
            rendered = template.render(Conversation.question(QUESTION_MARKER))
            if rendered != section.prompt:
                raise ValueError(
                    f"the build's chat template renders {rendered!r} here, but transformers rendered "
                    f"{section.prompt!r} at build time; rebuild with this project's version"
                )
        return cls(tokenizer, template, image_token, image_token_id, num_image_tokens, max_prompt_tokens, eos_ids)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The ids that end an answer (the manifest's eos_token_id, one or several)."""
        return self._eos_token_ids

    def encode(self, conversation: Conversation | str) -> EncodedPrompt:
        """The prompt for a conversation (or one question about the image): input_ids [1, S] int64 and
        where its image's tokens begin."""
        if isinstance(conversation, str):
            if not conversation.strip():
                raise PromptError("the question is empty; ask something about the image")
            conversation = Conversation.question(conversation)
        for message in conversation.messages:
            if self.image_token in message.text:
                # transformers refuses it too (more image tokens than images); the model takes one image.
                raise PromptError(f"a {message.role} message contains the image token {self.image_token}; remove it")
        text = self.template.render(conversation)
        if text.count(self.image_token) != 1:
            raise PromptError(
                f"the chat template rendered {text.count(self.image_token)} image tokens for one image; "
                "rebuild the build directory with the checkpoint's template"
            )
        image_char = text.index(self.image_token)
        text = text.replace(self.image_token, self.image_token * self.num_image_tokens)
        encoding = self.tokenizer.encode(text, add_special_tokens=True)
        ids = encoding.ids
        start = encoding.char_to_token(image_char)  # an added token: one token whose offsets are exact
        images = sum(1 for i in ids if i == self.image_token_id)
        n = self.num_image_tokens
        if start is None or images != n or ids[start : start + n] != [self.image_token_id] * n:
            raise PromptError(
                f"the prompt has {images} image tokens, the model expects {self.num_image_tokens} in one run; "
                "rephrase the question or rebuild the build directory"
            )
        if len(ids) > self.max_prompt_tokens:
            turns = len(conversation.messages)
            raise PromptTooLong(
                f"the prompt is {len(ids)} tokens ({self.num_image_tokens} of them for the image"
                + (f", {turns} messages" if turns > 1 else "")
                + f"), longer than the build's maximum of {self.max_prompt_tokens}; "
                + ("drop earlier turns or " if turns > 1 else "ask a shorter question, or ")
                + "rebuild with a larger --max-prompt-tokens (python -m export build --max-prompt-tokens N)"
            )
        return EncodedPrompt(np.asarray([ids], dtype=np.int64), start)

    def decode(self, ids: np.ndarray | Sequence[int]) -> str:
        """Text of token ids, special tokens skipped."""
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)

    def stream(self) -> TextStream:
        """A fresh incremental detokenizer for one answer."""
        return TextStream(self.decode)


class TextStream:
    """Incremental detokenizer: push generated ids one by one, get the newly completed text.

    A token can end inside a UTF-8 character (byte-level BPE pieces, SentencePiece byte fallback), and
    decoders such as SentencePiece's strip a leading space from the first token of a sequence. So every
    step decodes a window that starts at the previous emission's first token and returns what the new ids
    add to it, holding text back while it ends in an incomplete character (U+FFFD). The concatenated
    output of `push` and `flush` equals `decode(all ids)`.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # ids before this are emitted

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        return self._step(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end is emitted as decode gives it)."""
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        emitted = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(emitted) or (text.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(emitted) :]
