"""OpenAI response bodies: a completion, its stream chunks, the model card; the project's extras
live under the `corematching` key (kept image tokens, timings, backend)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from runtime.pipeline import Answer, Pipeline
from serving.http.config import ServeConfig

EXTRA = "corematching"


def chunk(body: dict[str, Any]) -> bytes:
    """One server-sent event."""
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


@dataclass
class Completion:
    """One answer as it is built, token by token."""

    id: str
    model: str
    created: int
    pipeline: Pipeline
    text: str = ""
    first_token: float | None = None  # monotonic time of the first token
    answer: Answer | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    def role_chunk(self) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""})

    def add(self, token: Any) -> dict[str, Any]:
        """The chunk of a new token's text (the pipeline yields only non-empty pieces)."""
        if self.first_token is None:
            self.first_token = time.monotonic()
        self.text += token.text
        return self._chunk({"content": token.text})

    @property
    def finish_reason(self) -> str:
        """ "stop" (the model's end of sequence, or a stop string) or "length" (the token limit)."""
        assert self.answer is not None
        return self.answer.finish_reason

    def finish(self, answer: Answer, job: Any) -> None:
        self.answer = answer
        t = answer.timings
        decode = t.decode
        kept = answer.kept_image_tokens
        self.extra = {
            "kept_image_tokens": kept,
            "num_kept_image_tokens": answer.num_image_tokens if kept is None else len(kept),
            "num_image_tokens": answer.num_image_tokens,
            "backend": answer.backend,
            "timings": {
                "time_to_first_token": None if self.first_token is None else self.first_token - job.arrived,
                "total": time.monotonic() - job.arrived,
                "preprocess": t.preprocess,
                "vision": t.vision,
                "prefill": t.prefill,
                "decode": sum(decode),
                "decode_steps": len(decode),
                "decode_tokens_per_second": len(decode) / sum(decode) if decode and sum(decode) > 0 else None,
            },
        }

    def usage(self) -> dict[str, int]:
        assert self.answer is not None
        prompt, completion = self.answer.prompt_tokens, len(self.answer.token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def final_chunk(self) -> dict[str, Any]:
        body = self._chunk({}, self.finish_reason)
        body[EXTRA] = self.extra
        return body

    def usage_chunk(self) -> dict[str, Any]:
        body = self._chunk({})
        body["choices"] = []
        body["usage"] = self.usage()
        return body


def completion_body(completion: Completion) -> dict[str, Any]:
    assert completion.answer is not None
    return {
        "id": completion.id,
        "object": "chat.completion",
        "created": completion.created,
        "model": completion.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": completion.answer.text},
                "finish_reason": completion.finish_reason,
            }
        ],
        "usage": completion.usage(),
        EXTRA: completion.extra,
    }


def model_card(model_id: str, created: int, pipeline: Pipeline, config: ServeConfig) -> dict[str, Any]:
    """GET /v1/models: the model and what the build was made with (budgets, precision, geometry)."""
    manifest = pipeline.manifest
    model, cm = manifest.model, manifest.corematching
    quant = manifest.quantization
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "corematching-edge",
        EXTRA: {
            "source": model.source,
            "backend": pipeline.backend.name,
            "method": "dense" if cm is None else "corematching",
            "token_budget": None if cm is None else cm.token_budget,
            "token_selector": None if cm is None else cm.token_selector,
            "token_merge": None if cm is None else cm.token_merge,
            "neuron_ratio": None if cm is None else cm.neuron_ratio,
            "static_neurons": manifest.static_neurons is not None,
            "precision": manifest.precision,
            "weights": manifest.precision if quant is None else quant.weights,
            "num_image_tokens": model.num_image_tokens,
            "image_size": model.image_size,
            "patch_size": model.patch_size,
            "max_sequence": pipeline.max_sequence,
            "max_prompt_tokens": pipeline.tokenizer.max_prompt_tokens,
            "default_max_tokens": config.default_max_tokens,
        },
    }
