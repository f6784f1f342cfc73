"""Conversations: typed messages, and the checkpoint's chat template rendered as transformers renders it.

    conversation = Conversation((
        Message("system", "Answer in one word."),
        Message("user", "What colour is the star?", image=True),
        Message("assistant", "Red."),
        Message("user", "And the circle?"),
    ))
    text = ChatTemplate.from_build("builds/default").render(conversation)

The build carries the checkpoint's template (`chat_template.jinja`). It is rendered with Jinja the way
`apply_chat_template` does (a sandboxed environment, trim_blocks and lstrip_blocks, the loop-control
and `{% generation %}` extensions, `raise_exception`, `tojson`, `strftime_now`, the special tokens),
so a conversation's prompt is the one the transformers processor gives, and the build's recorded
one-turn prompt is checked against it when the tokenizer loads (runtime/text.py).

LLaVA-1.5 takes one image per conversation: exactly one user message holds it, and its place in the
prompt is where the template renders it. Each message's text loses its surrounding whitespace, as the
one-turn prompt always did.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant")
MAX_IMAGES = 1  # LLaVA-1.5 was trained on one image per conversation
TEMPLATE_FILE = "chat_template.jinja"


class ConversationError(ValueError):
    """A conversation the model cannot take (a role, the images, the order); the message names the fix.
    `param`: where in a request the fault is, where the conversation came from one (runtime/messages.py)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class TooManyImages(ConversationError):
    """More images than the model takes per conversation."""


class MissingImage(ConversationError):
    """No message holds the image."""


class EmptyQuestion(ConversationError):
    """The last user message has no text: there is no question to answer."""


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    text: str
    image: bool = False  # this message holds the conversation's image (a user message only)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConversationError(f"unknown role {self.role!r}; use {', '.join(ROLES)}")
        if not isinstance(self.text, str):
            raise ConversationError(f"a {self.role} message's text must be a string, got {type(self.text).__name__}")
        if self.image and self.role != "user":
            raise ConversationError(f"a {self.role} message holds an image; put the image in a user message")


@dataclass(frozen=True)
class Conversation:
    """The messages so far; the last is the user's question the answer is for."""

    messages: tuple[Message, ...]

    def __post_init__(self) -> None:
        if not self.messages:
            raise ConversationError("the conversation is empty; send at least one user message with the image")
        last = self.messages[-1]
        if last.role != "user":
            raise ConversationError(
                f"the last message is from the {last.role}; end the conversation with the user's question"
            )
        if not last.text.strip():
            raise EmptyQuestion(
                "the question is empty (the last user message has no text); ask something about the image",
                f"messages[{len(self.messages) - 1}].content",
            )
        images = sum(m.image for m in self.messages)
        if images > MAX_IMAGES:
            raise TooManyImages(
                f"the conversation holds {images} images; LLaVA-1.5 takes at most {MAX_IMAGES} per conversation "
                "(start a new conversation for another image)"
            )
        if images == 0:
            raise MissingImage("the conversation has no image; add one image to a user message")

    @classmethod
    def question(cls, question: str) -> Conversation:
        """One user turn: the image, then the question (the one-turn prompt)."""
        return cls((Message("user", question, image=True),))

    @property
    def last_question(self) -> str:
        return self.messages[-1].text.strip()

    def template_messages(self) -> list[dict[str, Any]]:
        """The messages as chat templates read them: content parts, the image part before the text."""
        out = []
        for message in self.messages:
            parts: list[dict[str, Any]] = [{"type": "image"}] if message.image else []
            text = message.text.strip()
            if text:
                parts.append({"type": "text", "text": text})
            out.append({"role": message.role, "content": parts})
        return out


def _environment() -> ImmutableSandboxedEnvironment:
    # A chat template from a checkpoint is untrusted code: it runs sandboxed, as transformers runs it.

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering
        only needs its body."""

        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """A checkpoint's chat template, compiled once."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None) -> None:
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise ConversationError(f"the build's chat template does not compile ({e}); rebuild it") from None
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_build(cls, build_dir: str | Path, name: str = TEMPLATE_FILE) -> ChatTemplate:
        """The template the build copied from its checkpoint, with the tokenizer's special tokens
        (`bos_token`, `eos_token`, ...: what apply_chat_template passes a template)."""
        build = Path(build_dir)
        path = build / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; the build is incomplete, rebuild it")
        special: dict[str, str] = {}
        config = build / "tokenizer_config.json"
        if config.is_file():
            data = json.loads(config.read_text())
            for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
                value = data.get(key)
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str):
                    special[key] = value
        return cls(path.read_text(), special)

    def render(self, conversation: Conversation | Sequence[dict[str, Any]]) -> str:
        """The prompt text of a conversation, ready for the assistant's answer (add_generation_prompt)."""
        messages = conversation.template_messages() if isinstance(conversation, Conversation) else conversation
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=True, **self.special_tokens)
        except jinja2.TemplateError as e:  # the template's own raise_exception: an order it does not render
            raise ConversationError(f"the model's chat template refuses the conversation: {e}") from None
