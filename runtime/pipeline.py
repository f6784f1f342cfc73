"""`runtime.Pipeline`: answer questions about images with a build (README: Python API), torch-free.

    pipeline = Pipeline.load("builds/default")            # provider="auto": TensorRT, CUDA, then CPU
    answer = pipeline.answer("photo.jpg", "What is on the table?", max_new_tokens=64)
    answer.text, answer.token_ids, answer.kept_image_tokens, answer.timings

`stream(...)` yields (token id, new text) as the answer is generated and returns the finished
`Answer` (the generator's return value); `answer(..., on_text=print)` streams through a callback
and returns the `Answer`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import buildformat
from buildformat import Manifest, ManifestError
from runtime.backend import Backend, BackendError
from runtime.preprocess import ImageProcessor, load_image
from runtime.sampling import Sampler, Sampling
from runtime.text import PromptError, PromptTokenizer

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt")


class GenerationError(ValueError):
    """A generation setting the build cannot honour (e.g. an answer longer than its cache)."""


class AnswerTooLong(GenerationError):
    """max_new_tokens is beyond the room the prompt leaves in the build's cache."""


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    kept_image_tokens: list[int] | None  # None for dense builds (every image token is kept)
    num_image_tokens: int
    prompt_tokens: int
    backend: str
    # seconds: preprocess, vision, prefill, decode (a list, per step), decode_graph (the graph's share of each step)
    timings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "answer": self.text,
            "token_ids": self.token_ids,
            "kept_image_tokens": self.kept_image_tokens,
            "timings": self.timings,
            "backend": self.backend,
            "prompt_tokens": self.prompt_tokens,
            "num_image_tokens": self.num_image_tokens,
        }


@dataclass(frozen=True)
class Prompt:
    """An image and a question made ready for the graphs by `Pipeline.prepare` (checked, not yet run)."""

    pixel_values: np.ndarray  # [1, 3, H, W]
    input_ids: np.ndarray  # [1, S] int64
    max_new_tokens: int
    preprocess_seconds: float

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[1])


class Pipeline:
    def __init__(self, build_dir: Path, manifest: Manifest, backend: Backend) -> None:
        self.build_dir = build_dir
        self.manifest = manifest
        self.backend = backend
        self.images = ImageProcessor.from_build(build_dir)
        self.tokenizer = PromptTokenizer.from_build(build_dir, manifest)
        self.num_image_tokens = manifest.model.num_image_tokens
        # The longest prompt + answer the cache buffers (and TensorRT profiles) admit.
        self.max_sequence = manifest.max_sequence

    @classmethod
    def load(cls, build_dir: str | Path, provider: str = "auto", backend: str = "auto") -> Pipeline:
        """Checks the manifest (format version, sha256 of every file) before loading anything."""
        build = Path(build_dir)
        manifest = buildformat.read(build)
        buildformat.verify(build, manifest)
        if backend not in BACKENDS:
            raise BackendError(f"unknown backend {backend!r}; use {', '.join(BACKENDS)}")
        engines = manifest.engines is not None
        if backend == "tensorrt" or (backend == "auto" and provider in ("auto", "tensorrt") and engines):
            try:
                from runtime.trt_backend import TrtBackend

                return cls(build, manifest, TrtBackend(build, manifest))
            except BackendError:
                if backend == "tensorrt":
                    raise
                log.warning(
                    "TensorRT engines cannot run here; using ONNX Runtime", exc_info=log.isEnabledFor(logging.DEBUG)
                )
        from runtime.ort_backend import OrtBackend

        return cls(build, manifest, OrtBackend(build, manifest, provider))

    def encode(self, question: str, max_new_tokens: int | None = 64) -> tuple[np.ndarray, int]:
        """input_ids [1, S] of the question's prompt and the answer length, checked against the cache.

        max_new_tokens None: all the room the prompt leaves. Raises PromptError / GenerationError.
        """
        if max_new_tokens is not None and max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        ids = self.tokenizer.encode(question)  # [1, S]
        prompt = ids.shape[1]
        room = self.max_sequence - prompt
        if max_new_tokens is None:
            return ids, room
        if max_new_tokens > room:
            raise AnswerTooLong(
                f"max_new_tokens {max_new_tokens} is beyond the cache: the {prompt}-token prompt leaves room for "
                f"{room} (the build's max sequence is {self.max_sequence}); ask for fewer, "
                "or rebuild with a larger --max-sequence"
            )
        return ids, max_new_tokens

    def with_image(
        self, image: Any, input_ids: np.ndarray, max_new_tokens: int, max_pixels: int | None = None
    ) -> Prompt:
        """The encoded prompt (`encode`) with its image decoded and preprocessed (ImageError otherwise)."""
        start = time.perf_counter()
        pixels = self.images(load_image(image, max_pixels))  # [1, 3, H, W]
        return Prompt(pixels, input_ids, max_new_tokens, time.perf_counter() - start)

    def prepare(self, image: Any, question: str, max_new_tokens: int = 64, max_pixels: int | None = None) -> Prompt:
        """Decodes and checks the image and the question (every user error is raised here, nothing runs)."""
        ids, max_new_tokens = self.encode(question, max_new_tokens)
        return self.with_image(image, ids, max_new_tokens, max_pixels)

    def stream(
        self,
        image: Any,
        question: str,
        max_new_tokens: int = 64,
        sampling: Sampling | None = None,
        stop_at_eos: bool = True,
    ) -> Generator[tuple[int, str], None, Answer]:
        """Yields (token id, new text) as tokens come; returns the finished Answer."""
        return self.generate(self.prepare(image, question, max_new_tokens), sampling, stop_at_eos)

    def generate(
        self, prepared: Prompt, sampling: Sampling | None = None, stop_at_eos: bool = True
    ) -> Generator[tuple[int, str], None, Answer]:
        """Runs a prepared prompt: yields (token id, new text) as tokens come; returns the finished Answer.

        Closing the generator early (`close()`) stops the answer before the next decode step.
        """
        ids, max_new_tokens = prepared.input_ids, prepared.max_new_tokens
        prompt = ids.shape[1]
        timings: dict[str, Any] = {"preprocess": prepared.preprocess_seconds}

        start = time.perf_counter()
        features = self.backend.vision(prepared.pixel_values)  # [1, n_img, d]
        timings["vision"] = time.perf_counter() - start

        start = time.perf_counter()
        embeds = self.backend.embed(ids)  # [1, S, d]
        image_start = self.tokenizer.image_start(ids)
        embeds[0, image_start : image_start + self.num_image_tokens] = features[0]
        result = self.backend.prefill(embeds, image_start, prompt + max_new_tokens)
        timings["prefill"] = time.perf_counter() - start

        sampler = Sampler(sampling or Sampling())
        eos = self.tokenizer.eos_token_ids if stop_at_eos else set()
        text = self.tokenizer.stream()
        tokens: list[int] = []
        decode: list[float] = []  # seconds per decode step, as the caller waits for it
        graph: list[float] = []  # of which the graph itself ran (where the backend measures it)
        timings["decode"] = decode
        logits = result.logits
        shown = False  # whether any text was yielded yet
        try:
            while True:
                token = sampler(logits)
                tokens.append(token)
                if token in eos:
                    break
                piece = text.push(token)
                if not shown:  # the answer's text is stripped: so is its stream's start
                    piece = piece.lstrip()
                    shown = bool(piece)
                if piece:
                    yield token, piece  # a caller that closes the generator here stops the answer
                if len(tokens) == max_new_tokens:
                    break
                start = time.perf_counter()
                logits = self.backend.decode(token)
                decode.append(time.perf_counter() - start)
                if self.backend.last_run_seconds is not None:
                    graph.append(self.backend.last_run_seconds)
        finally:
            # Finished, failed or abandoned: the request's cache and compacted weights go now, not at
            # the next prefill, so an idle pipeline holds only its weights.
            self.backend.end_request()
        tail = text.flush() if shown else text.flush().lstrip()
        if tail:
            yield tokens[-1], tail
        if graph:
            timings["decode_graph"] = graph
        text_out = self.tokenizer.decode(tokens).strip()
        return Answer(
            text_out, tokens, result.kept_image_tokens, self.num_image_tokens, prompt, self.backend.name, timings
        )

    def answer(
        self,
        image: Any,
        question: str,
        max_new_tokens: int = 64,
        sampling: Sampling | None = None,
        on_text: Callable[[str], None] | None = None,
        stop_at_eos: bool = True,
    ) -> Answer:
        tokens = self.stream(image, question, max_new_tokens, sampling, stop_at_eos)
        while True:
            try:
                _token, piece = next(tokens)
            except StopIteration as done:
                return done.value
            if on_text is not None:
                on_text(piece)


__all__ = [
    "Answer",
    "AnswerTooLong",
    "BackendError",
    "GenerationError",
    "ManifestError",
    "Pipeline",
    "Prompt",
    "PromptError",
]
