"""OpenAI-style chat message lists -> a `Conversation` and the image part: the one parser that the HTTP
server (`messages` of a chat completion) and the Triton model (its MESSAGES input) share.

    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:..."}},
                                  {"type": "text", "text": "What colour is the star?"}]},
     {"role": "assistant", "content": "Red."},
     {"role": "user", "content": "And the circle?"}]

A content is a string or a list of parts: `text` parts are joined with a space, and an image part
(`image_url`, or `image` where the image's bytes come separately) marks the message the image belongs
to. `developer` is OpenAI's newer name for `system`. Each error names the message (`where[i]`) and the
fix, and its class says what kind of fault it is (the server turns that into its error code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runtime.chat import MAX_IMAGES, Conversation, ConversationError, Message, MissingImage, TooManyImages

ROLE_ALIASES = {"developer": "system"}
IMAGE_PARTS = ("image", "image_url")
ROLES_HINT = "use system (or developer), user or assistant"


class MessagesError(ConversationError):
    """A message list the model cannot take; `param` says where (`messages[2].content`)."""


class UnsupportedMessage(MessagesError):
    """A message this model has no format for: tool results, tool calls, an unknown role."""


class InvalidContent(MessagesError):
    """A content that is neither a string nor a list of text and image parts."""


@dataclass(frozen=True)
class ChatMessages:
    conversation: Conversation
    image: Any  # the image part's payload: an image_url part's `image_url` value; None for {"type": "image"}


def _content(content: Any, where: str) -> tuple[str, list[Any]]:
    """A message's text (its text parts joined) and its image parts' payloads."""
    if isinstance(content, str):
        return content.strip(), []
    if not isinstance(content, list):
        raise InvalidContent(
            f"{where}: content must be a string or a list of parts, got {type(content).__name__}", f"{where}.content"
        )
    texts, images = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise InvalidContent(f'{where}, part {j}: a text part needs "text": a string', f"{where}.content")
            texts.append(part["text"].strip())
        elif kind in IMAGE_PARTS:
            images.append(part.get("image_url"))
        else:
            raise InvalidContent(
                f'{where}, part {j}: unknown part {kind!r}; use {{"type": "text", "text": ...}} and one image part',
                f"{where}.content",
            )
    # The chat template writes a message's text parts one after the other: one text, spaces between.
    return " ".join(t for t in texts if t), images


def _message(item: Any, where: str) -> tuple[Message, list[Any]]:
    if not isinstance(item, dict) or "role" not in item:
        raise MessagesError(f'{where} must be an object with "role" and "content"', where)
    role = item["role"]
    if not isinstance(role, str):
        raise MessagesError(f"{where}: role must be a string, got {type(role).__name__}", f"{where}.role")
    if item.get("tool_calls") or item.get("function_call"):
        raise UnsupportedMessage(f"{where} holds tool calls; this model has no tools", where)
    role = ROLE_ALIASES.get(role, role)
    if role not in ("system", "user", "assistant"):
        raise UnsupportedMessage(f"{where}: unknown role {role!r}; {ROLES_HINT} (no tool messages)", f"{where}.role")
    if "content" not in item:
        raise InvalidContent(f'{where} must be an object with "role" and "content"', f"{where}.content")
    text, images = _content(item["content"], where)
    try:
        return Message(role, text, image=bool(images)), images
    except ConversationError as e:  # an image in a system or assistant message
        raise MessagesError(f"{where}: {e}", f"{where}.content") from None


def parse_messages(items: Any, where: str = "messages", image_part: str = "an image_url part") -> ChatMessages:
    """The message list as a Conversation and its one image part. `where` names the list in errors;
    `image_part` says, in the missing-image error, how this interface sends an image."""
    if not isinstance(items, list) or not items:
        raise MessagesError(
            f'{where} must be a non-empty JSON list of {{"role": ..., "content": ...}} objects, with at least the '
            "user's question",
            where,
        )
    messages, images = [], []
    for i, item in enumerate(items):
        message, found = _message(item, f"{where}[{i}]")
        messages.append(message)
        images += found
    if len(images) > MAX_IMAGES:
        raise TooManyImages(
            f"{where} holds {len(images)} image parts; LLaVA-1.5 takes {MAX_IMAGES} per conversation (send the other "
            "image in a new conversation)",
            where,
        )
    if not images:  # said here, where the interface's way of sending an image is known
        raise MissingImage(
            f"the conversation has no image (no message in {where} holds one); add {image_part} to the user "
            "message it is about",
            where,
        )
    # The conversation's own rules (the last message the user's, with a question) raise from here.
    return ChatMessages(Conversation(tuple(messages)), images[0])
