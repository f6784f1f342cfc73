"""runtime.chat (conversations through the checkpoint's chat template) and runtime.stops, against transformers."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_manifests import MODEL, TOKENIZER, manifest_json, write_manifest
from PIL import Image

from models import default_model_dir, load_llava
from models.answer import build_prompt
from runtime.chat import (
    ChatTemplate,
    Conversation,
    ConversationError,
    Message,
    MissingImage,
    TooManyImages,
)
from runtime.stops import StopError, StopText, check_stops
from runtime.text import PromptError, PromptTokenizer, PromptTooLong

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "shapes_red_circle.png"
# The template the llava-hf LLaVA-1.5 checkpoints ship: a `{% generation %}` block (transformers' own
# Jinja extension) around the assistant's text, and system messages without a role prefix.
HUB_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
CONVERSATIONS = {
    "system and three turns": Conversation(
        (
            Message("system", "You are a careful assistant. Answer in one word."),
            Message("user", "What colour is the circle?", image=True),
            Message("assistant", "Red."),
            Message("user", "  And how many squares are there?  "),
        )
    ),
    "the image in the second turn": Conversation(
        (
            Message("user", "Hello, I will show you a picture."),
            Message("assistant", "Please do."),
            Message("user", "Is there a star?", image=True),
        )
    ),
    "a user turn with only the image": Conversation(
        (Message("user", "", image=True), Message("assistant", "I see shapes."), Message("user", "Which ones?"))
    ),
    "one question": Conversation.question("What colour is the circle?"),
}


@pytest.fixture(scope="module")
def processor() -> Any:
    return load_llava(default_model_dir())[1]


def _build(processor: Any, out: Path, template: str | None = None, max_prompt_tokens: int = 1024) -> Path:
    """A build directory with only what tokenization reads (no graphs)."""
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja"):
        shutil.copy2(default_model_dir() / name, out / name)
    if template is not None:
        (out / "chat_template.jinja").write_text(template)
    model = MODEL | {"num_image_tokens": 576, "image_token_id": processor.image_token_id}
    tokenizer = TOKENIZER | {"prompt": build_prompt(processor, "{question}"), "image_token": processor.image_token}
    write_manifest(
        out,
        manifest_json(
            model=model,
            dims={"S": {"min": 577, "opt": min(600, max_prompt_tokens), "max": max_prompt_tokens}},
            tokenizer=tokenizer,
        ),
    )
    return out


@pytest.fixture(scope="module")
def tokenizer(processor: Any, tmp_path_factory: pytest.TempPathFactory) -> PromptTokenizer:
    import buildformat

    out = _build(processor, tmp_path_factory.mktemp("chat"))
    return PromptTokenizer.from_build(out, buildformat.read(out))


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_a_conversation_tokenizes_as_the_transformers_processor(processor, tokenizer, name) -> None:
    conversation = CONVERSATIONS[name]
    text = processor.apply_chat_template(conversation.template_messages(), add_generation_prompt=True)
    assert tokenizer.template.render(conversation) == text
    expected = processor(images=Image.open(EXAMPLE), text=text, return_tensors="np")["input_ids"]
    encoded = tokenizer.encode(conversation)
    assert (encoded.input_ids == expected).all()
    assert encoded.image_start == int(np.flatnonzero(expected[0] == processor.image_token_id)[0])
    if name == "the image in the second turn":  # the image's tokens come after the first turns' text
        assert encoded.image_start > 20


def test_a_string_question_is_the_one_turn_conversation(tokenizer) -> None:
    one = tokenizer.encode("What colour is the circle?")
    assert (one.input_ids == tokenizer.encode(CONVERSATIONS["one question"]).input_ids).all()


def test_the_hub_template_renders_as_transformers_renders_it(processor) -> None:
    """`{% generation %}`, `raise_exception` and whitespace control as transformers' Jinja environment has them."""
    from transformers.utils.chat_template_utils import render_jinja_template

    template = ChatTemplate(HUB_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>"})
    for conversation in CONVERSATIONS.values():
        messages = conversation.template_messages()
        expected = render_jinja_template(
            conversations=[messages], chat_template=HUB_TEMPLATE, add_generation_prompt=True
        )[0][0]
        assert template.render(conversation) == expected
    raising = ChatTemplate("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('user first') }}{% endif %}")
    with pytest.raises(ConversationError, match="user first"):
        raising.render([{"role": "assistant", "content": []}])


def test_a_build_whose_template_disagrees_with_its_recorded_prompt_fails_at_load(processor, tmp_path) -> None:
    import buildformat

    out = _build(processor, tmp_path, template=HUB_TEMPLATE.replace("ASSISTANT:", "BOT:"))
    with pytest.raises(ValueError, match="rebuild"):
        PromptTokenizer.from_build(out, buildformat.read(out))


def test_conversations_the_model_cannot_take_are_refused() -> None:
    image = Message("user", "What is this?", image=True)
    with pytest.raises(TooManyImages, match="at most 1"):
        Conversation((image, Message("assistant", "A circle."), image))
    with pytest.raises(MissingImage):
        Conversation((Message("user", "What is this?"),))
    with pytest.raises(ConversationError, match="end the conversation with the user"):
        Conversation((image, Message("assistant", "A circle.")))
    with pytest.raises(ConversationError, match="no text"):
        Conversation((Message("user", "  ", image=True),))
    with pytest.raises(ConversationError, match="unknown role"):
        Message("tool", "42")
    with pytest.raises(ConversationError, match="user message"):
        Message("assistant", "look", image=True)
    with pytest.raises(ConversationError, match="empty"):
        Conversation(())


def test_the_image_token_in_any_message_is_refused_and_length_is_checked(processor, tmp_path) -> None:
    import buildformat

    out = _build(processor, tmp_path, max_prompt_tokens=600)
    tokenizer = PromptTokenizer.from_build(out, buildformat.read(out))
    with pytest.raises(PromptError, match="assistant message contains the image token"):
        tokenizer.encode(
            Conversation((Message("user", "Hi", image=True), Message("assistant", "<image>"), Message("user", "?")))
        )
    history = [Message("user", "Describe it.", image=True)]
    for _ in range(3):
        history += [Message("assistant", "A red circle on a grey background. " * 3), Message("user", "And then?")]
    with pytest.raises(PromptTooLong, match=r"7 messages.*drop earlier turns"):
        tokenizer.encode(Conversation(tuple(history)))


def _through(stops: StopText, pieces: list[str]) -> str:
    *rest, last = pieces
    out = "".join(stops.push(p) for p in rest if not stops.stopped)
    return out if stops.stopped else out + stops.finish(last)


@pytest.mark.parametrize(
    ("pieces", "stops", "expected", "stopped"),
    [
        (["Hello", " wor", "ld. Bye"], ["world"], "Hello ", True),  # across two pieces
        (["a", "b", "c", "d"], ["bcd"], "a", True),  # across three
        (["The end", "."], ["\n\n"], "The end.", False),  # never found: held text comes back at the end
        (["one\n", "\n", "two"], ["\n\n", "tw"], "one", True),  # the first of several
        (["ab", "ab", "ac"], ["abac"], "ab", True),  # a false start then the real one
        (["x", "STOP", "y"], ["STOP"], "x", True),
        (["ST", "OR", "E"], ["STOP"], "STORE", False),  # a prefix held, then released
    ],
)
def test_stop_text_cuts_before_the_first_stop_string(pieces, stops, expected, stopped) -> None:
    text = StopText(stops)
    assert _through(text, pieces) == expected
    assert text.stopped is stopped
    whole = "".join(pieces)  # the same cut as searching the whole text at once
    first = min((i for i in (whole.find(s) for s in stops) if i >= 0), default=len(whole))
    assert expected == whole[:first]


def test_stop_strings_are_checked() -> None:
    assert check_stops(["a", "b"]) == ("a", "b")
    with pytest.raises(StopError, match="at most 4"):
        check_stops(["a", "b", "c", "d", "e"])
    with pytest.raises(StopError, match="non-empty"):
        check_stops([""])
