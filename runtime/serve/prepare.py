"""A request's image and question made ready for the pipeline, off the event loop; user errors -> 400."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from runtime.pipeline import GenerationError, Pipeline, Prompt
from runtime.preprocess import ImageError, load_image
from runtime.serve.config import ServeConfig
from runtime.serve.errors import bad_request
from runtime.serve.protocol import ChatRequest
from runtime.text import PromptError


class Preparer:
    def __init__(self, pipeline: Pipeline, config: ServeConfig) -> None:
        self.pipeline = pipeline
        self.config = config
        # One thread decodes the images, in parallel with the running answer: a burst of requests
        # waits for it instead of decoding many images at once (memory), and Pillow's
        # decompression-bomb limit, a module global that load_image sets per call, is never raced.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        self._lock = threading.Lock()

    def max_tokens(self, chat: ChatRequest) -> int:
        """The answer length the request gets; its question checked (cheap: run before the queue admits it)."""
        pipeline = self.pipeline
        try:
            length = pipeline.tokenizer.encode(chat.question).shape[1]
        except PromptError as e:
            code = "prompt_too_long" if "longer than" in str(e) else "invalid_prompt"
            raise bad_request(str(e), code, "messages.content") from None
        room = pipeline.max_sequence - length
        max_tokens = chat.max_tokens if chat.max_tokens is not None else min(self.config.default_max_tokens, room)
        if max_tokens > room:
            raise bad_request(
                f"max_tokens {max_tokens} is beyond the cache: the {length}-token prompt leaves room for {room} "
                f"(the build's max sequence is {pipeline.max_sequence}); ask for at most {room}",
                "max_tokens_too_large",
                "max_tokens",
            )
        return max_tokens

    def __call__(self, chat: ChatRequest, max_tokens: int) -> Prompt:
        """The image decoded and the prompt made (on `executor`, after the queue admitted the request)."""
        try:
            with self._lock:
                image = load_image(chat.image, max_pixels=self.config.max_image_pixels)
                return self.pipeline.prepare(image, chat.question, max_tokens)
        except ImageError as e:
            code = "image_too_large" if "too large" in str(e) else "invalid_image"
            raise bad_request(str(e), code, "messages.content.image_url") from None
        except (PromptError, GenerationError) as e:
            raise bad_request(str(e), "invalid_prompt", "messages.content") from None
