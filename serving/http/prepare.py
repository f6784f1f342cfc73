"""A request's conversation and image made ready for the pipeline; user errors -> 400 with their codes."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from runtime import AnswerTooLong, GenerationError, ImageError, ImageTooLarge, Pipeline, PromptError, PromptTooLong
from runtime.chat import ConversationError
from runtime.pipeline import Prompt
from runtime.text import EncodedPrompt
from serving.http.config import ServeConfig
from serving.http.errors import bad_request
from serving.http.protocol import ChatRequest


class Preparer:
    def __init__(self, pipeline: Pipeline, config: ServeConfig) -> None:
        self.pipeline = pipeline
        self.config = config
        # One thread decodes the images, in parallel with the running answer: a burst of requests
        # waits for it instead of decoding many images at once (memory), and Pillow's
        # decompression-bomb limit, a module global that load_image sets per call, is never raced.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")

    def encode(self, chat: ChatRequest) -> tuple[EncodedPrompt, int]:
        """The prompt (its ids, where the image goes) and the answer length (cheap: run before the queue
        admits the request)."""
        try:
            encoded, tokens = self.pipeline.encode(chat.conversation, chat.max_tokens)  # None: all the room
        except PromptTooLong as e:
            raise bad_request(str(e), "prompt_too_long", "messages") from None
        except PromptError as e:
            raise bad_request(str(e), "invalid_prompt", "messages") from None
        except ConversationError as e:  # the chat template's own refusal
            raise bad_request(str(e), "invalid_messages", "messages") from None
        except AnswerTooLong as e:
            raise bad_request(str(e), "max_tokens_too_large", "max_tokens") from None
        except GenerationError as e:
            raise bad_request(str(e), "invalid_value", "max_tokens") from None
        # Without max_tokens the answer may take the server's default, within the room the cache leaves.
        return encoded, tokens if chat.max_tokens is not None else min(self.config.default_max_tokens, tokens)

    def __call__(self, chat: ChatRequest, encoded: EncodedPrompt, max_tokens: int) -> Prompt:
        """The image decoded and preprocessed (on `executor`, after the queue admitted the request)."""
        try:
            return self.pipeline.with_image(chat.image, encoded, max_tokens, self.config.max_image_pixels)
        except ImageTooLarge as e:
            raise bad_request(str(e), "image_too_large", "messages.content.image_url") from None
        except ImageError as e:
            raise bad_request(str(e), "invalid_image", "messages.content.image_url") from None
