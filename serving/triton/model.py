"""The Triton Python-backend model that `python -m serving.triton` writes (as `1/model.py`).

It runs inside Triton's Python stub, not in this project's process: it imports the runtime
packages copied next to it and the build in `1/build` (the manifest and every file's sha256 are
checked when an instance loads). A request asks a QUESTION, or sends a whole conversation in
MESSAGES (chat_messages.py, copied beside this file, parses it), about its IMAGE. Each request
streams one response per token (the model is decoupled), then a final one with the kept image
tokens and a JSON result; a bad request gets a Triton error and the instance goes on.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the runtime and buildformat packages and chat_messages.py, copied next to this file

from chat_messages import parse_stop, request_prompt  # noqa: E402

from runtime import REQUEST_ERRORS, USER_ERRORS, GenerationError, ImageError, Pipeline, Sampling  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _scalar(request, name: str, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise GenerationError(f"{name} must hold one value, got {values.size}")
    return values[0].item() if hasattr(values[0], "item") else values[0]


def _elements(request, name: str) -> list | None:
    """Every element of an optional input (None when the request leaves it out)."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else list(tensor.as_numpy().reshape(-1))


def _image(data: bytes) -> bytes:
    """The encoded image; through Triton's JSON (generate) endpoint it arrives as base64 text."""
    if data and re.fullmatch(rb"[A-Za-z0-9+/=\s]+", data):  # base64 text, not a binary file
        try:
            data = base64.b64decode(data, validate=False)
        except (binascii.Error, ValueError) as e:
            raise ImageError(f"IMAGE looks like base64 but does not decode ({e}); send the file's bytes") from None
    return data


def _outputs(text: str, token: int, kept: list[int], result: str) -> list:
    return [
        pb_utils.Tensor("TEXT", np.array([text.encode()], dtype=np.object_)),
        pb_utils.Tensor("TOKEN_ID", np.array([token], dtype=np.int64)),
        pb_utils.Tensor("KEPT_IMAGE_TOKENS", np.array(kept, dtype=np.int64)),
        pb_utils.Tensor("RESULT", np.array([result.encode()], dtype=np.object_)),
    ]


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        provider = config.get("parameters", {}).get("provider", {}).get("string_value", "auto")
        try:
            self.pipeline = Pipeline.load(HERE / "build", provider=provider)
        except USER_ERRORS as e:
            raise pb_utils.TritonModelException(f"cannot load the build: {e}") from None
        self.default_max_tokens = 64

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._answer(request, sender)
            except REQUEST_ERRORS as e:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))), flags=FINAL)
        return None  # decoupled: every response went through its sender

    def _answer(self, request, sender) -> None:
        pipeline = self.pipeline
        image = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)[0]
        # QUESTION or MESSAGES (a JSON message list): a str or a Conversation, which the pipeline takes alike.
        question = request_prompt(_scalar(request, "QUESTION", None), _scalar(request, "MESSAGES", None))
        stop = parse_stop(_elements(request, "STOP"))
        max_tokens = int(_scalar(request, "MAX_TOKENS", self.default_max_tokens))
        sampling = Sampling(
            float(_scalar(request, "TEMPERATURE", 0.0)),
            float(_scalar(request, "TOP_P", 1.0)),
            None if (seed := _scalar(request, "SEED", None)) is None else int(seed),
        )
        prompt = pipeline.prepare(_image(bytes(image)), question, max_tokens)
        tokens = pipeline.generate(prompt, sampling, stop=stop)
        try:
            while True:
                try:
                    token, text = next(tokens)
                except StopIteration as done:
                    answer = done.value
                    break
                sender.send(pb_utils.InferenceResponse(output_tensors=_outputs(text, token, [], "")))
                if getattr(sender, "is_cancelled", lambda: False)():  # the client left: stop before the next step
                    sender.send(flags=FINAL)
                    return
        finally:
            tokens.close()
        kept = list(range(answer.num_image_tokens)) if answer.kept_image_tokens is None else answer.kept_image_tokens
        result = json.dumps({**answer.to_json(), "instance": os.getpid()})  # each instance is its own process
        sender.send(pb_utils.InferenceResponse(output_tensors=_outputs("", -1, kept, result)), flags=FINAL)

    def finalize(self) -> None:
        self.pipeline = None
