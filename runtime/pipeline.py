"""`runtime.Pipeline`: answer questions about images with a build (README: Python API), torch-free.

    pipeline = Pipeline.load("builds/default")            # provider="auto": TensorRT, CUDA, then CPU
    answer = pipeline.answer("photo.jpg", "What is on the table?", max_new_tokens=64)
    answer.text, answer.token_ids, answer.kept_image_tokens, answer.timings.prefill

`stream(...)` yields (token id, new text) as the answer is generated and returns the finished
`Answer` (the generator's return value); `answer(..., on_text=print)` streams through a callback
and returns the `Answer`. Where a question goes, a whole `Conversation` (runtime/chat.py: a system
prompt, earlier turns, the image in one user turn) may go instead; `stop` strings end an answer early.

`generate` is the one generation loop (vision, prefill, whose first stack embeds the ids and splices
the image features in at the prompt's `image_start`, decode steps, end of request): the demo, the server, Triton and the
export's validation all run it. A caller that needs more than the answer, such as the logits each
token was chosen from, passes a `GenerationTrace` for the loop to fill.
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
from runtime.backend import Backend, BackendError, PrefillResult
from runtime.chat import Conversation
from runtime.preprocess import ImageProcessor, load_image
from runtime.sampling import Sampler, Sampling
from runtime.stops import StopText
from runtime.text import EncodedPrompt, PromptError, PromptTokenizer

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt")


class GenerationError(ValueError):
    """A generation setting the build cannot honour (e.g. an answer longer than its cache)."""


class AnswerTooLong(GenerationError):
    """max_new_tokens is beyond the room the prompt leaves in the build's cache."""


@dataclass(frozen=True)
class Timings:
    """Seconds one answer took. `to_json` is the `timings` object of `Answer.to_json` (and of the demo's
    --json): `decode_graph` appears only where the backend measured it."""

    preprocess: float  # the image decoded and preprocessed (`with_image`)
    vision: float
    prefill: float  # the prompt through the stacks (embedding and image splice included)
    decode: tuple[float, ...] = ()  # per decode step, as the caller waited for it
    decode_graph: tuple[float, ...] | None = None  # of which the step's graph itself ran; None: not measured

    def __post_init__(self) -> None:
        if min(self.preprocess, self.vision, self.prefill, *self.decode, *(self.decode_graph or ())) < 0:
            raise ValueError(f"negative seconds in {self}")
        if self.decode_graph is not None and len(self.decode_graph) > len(self.decode):
            raise ValueError("more measured decode graphs than decode steps")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "preprocess": self.preprocess,
            "vision": self.vision,
            "prefill": self.prefill,
            "decode": list(self.decode),
        }
        if self.decode_graph is not None:
            out["decode_graph"] = list(self.decode_graph)
        return out


@dataclass(frozen=True)
class Answer:
    text: str
    token_ids: list[int]
    kept_image_tokens: list[int] | None  # None for dense builds (every image token is kept)
    num_image_tokens: int
    prompt_tokens: int
    backend: str
    timings: Timings
    # "stop": the model ended the answer (an end-of-sequence token) or a stop string did; "length": the
    # token limit did.
    finish_reason: str = "length"

    def to_json(self) -> dict[str, Any]:
        return {
            "answer": self.text,
            "finish_reason": self.finish_reason,
            "token_ids": self.token_ids,
            "kept_image_tokens": self.kept_image_tokens,
            "timings": self.timings.to_json(),
            "backend": self.backend,
            "prompt_tokens": self.prompt_tokens,
            "num_image_tokens": self.num_image_tokens,
        }


@dataclass(frozen=True)
class Prompt:
    """An image and a question made ready for the graphs by `Pipeline.prepare` (checked, not yet run).

    Validation makes one from the transformers processor's tensors instead: same fields, same checks.
    """

    pixel_values: np.ndarray  # [1, 3, H, W] float32
    input_ids: np.ndarray  # [1, S] integer ids, the image's tokens in place
    image_start: int  # where the image's tokens begin in input_ids[0]: the prompt builder put them there
    max_new_tokens: int
    preprocess_seconds: float = 0.0

    def __post_init__(self) -> None:
        ids = self.input_ids
        if ids.ndim != 2 or ids.shape[0] != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be [1, S] integer ids, got {ids.shape} {ids.dtype}")
        if not 0 <= self.image_start < ids.shape[1]:
            raise ValueError(f"image_start {self.image_start} is outside the {ids.shape[1]}-token prompt")
        if self.pixel_values.ndim != 4 or self.pixel_values.shape[:2] != (1, 3):
            raise ValueError(f"pixel_values must be [1, 3, H, W], got {self.pixel_values.shape}")
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[1])


@dataclass
class GenerationTrace:
    """What `generate` computed on the way to an answer, for a caller that checks a build against a
    reference (export/validate.py). Hand an empty one to `generate` (or `run`): the loop fills it as
    the request runs, so it is a recorder, not a frozen value; without one nothing is recorded.

    `tokens[i]` was chosen from `logits[i]`: row 0 is the prefill's, row i the decode step fed
    `tokens[i - 1]`. The loop stops after the last token, so there are as many rows as tokens.
    """

    image_features: np.ndarray | None = None  # [n_img, d]: the vision graph's output, as spliced in
    prefill: PrefillResult | None = None  # the prompt's kept image tokens and core neurons
    tokens: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)  # [V] float32 each

    def record(self, token: int, logits: np.ndarray) -> None:
        self.tokens.append(token)
        self.logits.append(np.array(logits, dtype=np.float32))  # a copy: a backend may reuse its buffer

    @property
    def step_logits(self) -> np.ndarray:
        """[T, V] float32: the logits of every step, stacked."""
        return np.stack(self.logits)

    @property
    def kept_image_tokens(self) -> list[int] | None:
        return None if self.prefill is None else self.prefill.kept_image_tokens

    @property
    def core_neurons(self) -> dict[int, list[int]]:
        return {} if self.prefill is None else self.prefill.core_neurons


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
    def load(
        cls, build_dir: str | Path, provider: str = "auto", backend: str = "auto", accuracy_level: int = 1
    ) -> Pipeline:
        """Checks the manifest (format version, sha256 of every file) before loading anything. accuracy_level:
        ONNX Runtime's MatMulNBits arithmetic for quantized builds (1: fp32, what the build validated; 4: int8
        activations, faster, measured beside it in the build's validation record)."""
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

        return cls(build, manifest, OrtBackend(build, manifest, provider, accuracy_level=accuracy_level))

    def encode(self, question: str | Conversation, max_new_tokens: int | None = 64) -> tuple[EncodedPrompt, int]:
        """The question's (or conversation's) prompt (input_ids [1, S] and where the image goes) and the
        answer length, checked against the cache. max_new_tokens None: all the room the prompt leaves.
        Raises PromptError / GenerationError.
        """
        if max_new_tokens is not None and max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        encoded = self.tokenizer.encode(question)
        prompt = encoded.prompt_tokens
        room = self.max_sequence - prompt
        if max_new_tokens is None:
            return encoded, room
        if max_new_tokens > room:
            raise AnswerTooLong(
                f"max_new_tokens {max_new_tokens} is beyond the cache: the {prompt}-token prompt leaves room for "
                f"{room} (the build's max sequence is {self.max_sequence}); ask for fewer, "
                "or rebuild with a larger --max-sequence"
            )
        return encoded, max_new_tokens

    def with_image(
        self, image: Any, encoded: EncodedPrompt, max_new_tokens: int, max_pixels: int | None = None
    ) -> Prompt:
        """The encoded prompt (`encode`) with its image decoded and preprocessed (ImageError otherwise)."""
        start = time.perf_counter()
        pixels = self.images(load_image(image, max_pixels))  # [1, 3, H, W]
        return Prompt(
            pixel_values=pixels,
            input_ids=encoded.input_ids,
            image_start=encoded.image_start,
            max_new_tokens=max_new_tokens,
            preprocess_seconds=time.perf_counter() - start,
        )

    def prepare(
        self, image: Any, question: str | Conversation, max_new_tokens: int = 64, max_pixels: int | None = None
    ) -> Prompt:
        """Decodes and checks the image and the question (every user error is raised here, nothing runs)."""
        encoded, max_new_tokens = self.encode(question, max_new_tokens)
        return self.with_image(image, encoded, max_new_tokens, max_pixels)

    def stream(
        self,
        image: Any,
        question: str | Conversation,
        max_new_tokens: int = 64,
        sampling: Sampling | None = None,
        stop_at_eos: bool = True,
        stop: tuple[str, ...] = (),
    ) -> Generator[tuple[int, str], None, Answer]:
        """Yields (token id, new text) as tokens come; returns the finished Answer."""
        return self.generate(self.prepare(image, question, max_new_tokens), sampling, stop_at_eos, stop=stop)

    def generate(
        self,
        prepared: Prompt,
        sampling: Sampling | None = None,
        stop_at_eos: bool = True,
        trace: GenerationTrace | None = None,
        stop: tuple[str, ...] = (),
    ) -> Generator[tuple[int, str], None, Answer]:
        """Runs a prepared prompt: yields (token id, new text) as tokens come; returns the finished Answer.

        Closing the generator early (`close()`) stops the answer before the next decode step. `trace`, when
        given, is filled with the image features, the prefill's result and every token's logits. `stop`:
        up to 4 strings; the answer ends before the first of them (finish_reason "stop"), and the text that
        might begin one is held back until the next token settles it.
        """
        stops = StopText(stop) if stop else None  # checked before anything runs
        ids, max_new_tokens, image_start = prepared.input_ids, prepared.max_new_tokens, prepared.image_start
        prompt = prepared.prompt_tokens

        start = time.perf_counter()
        self.backend.vision(prepared.pixel_values)  # the features stay where the graphs run
        vision_seconds = time.perf_counter() - start

        start = time.perf_counter()
        # The lower stack embeds the ids and splices the image features in at image_start itself.
        result = self.backend.prefill(ids, image_start, prompt + max_new_tokens)
        prefill_seconds = time.perf_counter() - start
        if trace is not None:
            trace.image_features, trace.prefill = self.backend.image_features()[0], result

        sampler = Sampler(sampling or Sampling())
        eos = self.tokenizer.eos_token_ids if stop_at_eos else set()
        text = self.tokenizer.stream()
        tokens: list[int] = []
        decode: list[float] = []  # seconds per decode step, as the caller waits for it
        graph: list[float] = []  # of which the graph itself ran (where the backend measures it)
        logits = result.logits  # [V]
        shown = False  # whether the answer's text has begun (its leading whitespace is dropped)
        finish = "length"
        try:
            while True:
                token = sampler(logits)
                tokens.append(token)
                if trace is not None:
                    trace.record(token, logits)
                if token in eos:
                    finish = "stop"
                    break
                piece = text.push(token)
                if not shown:  # the answer's text is stripped: so is its stream's start
                    piece = piece.lstrip()
                    shown = bool(piece)
                if stops is not None:
                    piece = stops.push(piece)
                if piece:
                    yield token, piece  # a caller that closes the generator here stops the answer
                if stops is not None and stops.stopped:
                    finish = "stop"
                    break
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
        if stops is None or not stops.stopped:  # the text still held back, through the stop strings
            tail = text.flush() if shown else text.flush().lstrip()
            if stops is not None:
                tail = stops.finish(tail)
                finish = "stop" if stops.stopped else finish
            if tail:
                yield tokens[-1], tail
        timings = Timings(
            preprocess=prepared.preprocess_seconds,
            vision=vision_seconds,
            prefill=prefill_seconds,
            decode=tuple(decode),
            decode_graph=tuple(graph) if graph else None,
        )
        # The whole answer decoded at once; a stop string cuts it where the stream was cut (the stream's
        # text is this text's start).
        text_out = self.tokenizer.decode(tokens).lstrip()
        if stops is not None and stops.stopped:
            text_out = text_out[: stops.first(text_out)]
        text_out = text_out.strip()
        return Answer(
            text_out,
            tokens,
            result.kept_image_tokens,
            self.num_image_tokens,
            prompt,
            self.backend.name,
            timings,
            finish,
        )

    def run(
        self,
        prepared: Prompt,
        sampling: Sampling | None = None,
        stop_at_eos: bool = True,
        on_text: Callable[[str], None] | None = None,
        trace: GenerationTrace | None = None,
        stop: tuple[str, ...] = (),
    ) -> Answer:
        """`generate` to its end: the Answer; `on_text` gets each new piece of text as it comes."""
        tokens = self.generate(prepared, sampling, stop_at_eos, trace, stop)
        while True:
            try:
                _token, piece = next(tokens)
            except StopIteration as done:
                return done.value
            if on_text is not None:
                on_text(piece)

    def answer(
        self,
        image: Any,
        question: str | Conversation,
        max_new_tokens: int = 64,
        sampling: Sampling | None = None,
        on_text: Callable[[str], None] | None = None,
        stop_at_eos: bool = True,
        stop: tuple[str, ...] = (),
    ) -> Answer:
        return self.run(self.prepare(image, question, max_new_tokens), sampling, stop_at_eos, on_text, stop=stop)


__all__ = [
    "Answer",
    "AnswerTooLong",
    "BackendError",
    "GenerationError",
    "GenerationTrace",
    "ManifestError",
    "Pipeline",
    "Prompt",
    "PromptError",
    "Timings",
]
