"""Runs a build's graphs in ONNX Runtime, greedy, for validation and tests (numpy only, no torch).

The decode loop here is the plain numpy one; the runtime's pipeline binds the
same buffers to the sessions without copies. Both follow the graph contract
of docs/architecture.md: vision -> embed -> splice the image features at `image_start` ->
prefill -> compacted FFN weights and KV cache -> decode steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from export.manifest import graph_files


@dataclass
class OrtGeneration:
    tokens: list[int]
    logits: np.ndarray  # [steps, V]: the logits each token was chosen from (row 0: prefill)
    image_features: np.ndarray  # [n_img, d]
    kept_image_tokens: list[int] | None  # None for dense builds
    core_neurons: dict[int, list[int]] = field(default_factory=dict)


class OrtBuild:
    """The four sessions of a build."""

    def __init__(
        self,
        build_dir: str | Path,
        manifest: dict[str, Any],
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
        level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    ) -> None:
        self.manifest = manifest
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.log_severity_level = 3
        build = Path(build_dir)
        self.sessions = {
            name: ort.InferenceSession(str(build / graph_files(manifest, name)[0]), options, providers=list(providers))
            for name in ("vision", "embed", "prefill", "decode")
        }
        self.decode_inputs = [i.name for i in self.sessions["decode"].get_inputs()]

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self.sessions[graph]
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feeds), strict=True))

    def greedy(self, input_ids: np.ndarray, pixel_values: np.ndarray, steps: int) -> OrtGeneration:
        """`steps` greedy tokens (no stop at end of sequence: validation compares a fixed count)."""
        model = self.manifest["model"]
        dtype = np.float16 if self.manifest["precision"] == "float16" else np.float32
        features = self.run("vision", {"pixel_values": pixel_values.astype(dtype)})["image_features"][0]
        embeds = self.run("embed", {"input_ids": input_ids.astype(np.int64)})["inputs_embeds"]
        image_start = int(np.flatnonzero(input_ids[0] == model["image_token_id"])[0])
        embeds[0, image_start : image_start + features.shape[0]] = features  # [1, S, d]

        feeds = {"inputs_embeds": embeds}
        if "image_start" in [i.name for i in self.sessions["prefill"].get_inputs()]:
            feeds["image_start"] = np.array([image_start], dtype=np.int64)
        out = self.run("prefill", feeds)
        # The cache: one zero-padded buffer per layer, sized once for the whole answer; each decode
        # step reads the buffers and writes only its own token's entries.
        buffers, lengths = {}, {}
        for name, value in out.items():
            if name.startswith("present."):
                key = f"past.{name[len('present.'):]}"
                buffers[key] = np.zeros((*value.shape[:2], value.shape[2] + steps, value.shape[3]), value.dtype)
                buffers[key][:, :, : value.shape[2]] = value
                lengths[key] = value.shape[2]
        # Request-long decode inputs: the compacted FFN weights (gathered once) and a merge's key bias.
        compact = {name: v for name, v in out.items() if name.startswith("ffn.") or name == "kept_bias"}
        compact["image_start"] = np.array([image_start], dtype=np.int64)
        logits = [out["logits"][0]]
        tokens = [int(np.argmax(logits[-1]))]  # first maximum, as torch.argmax
        position = input_ids.shape[1]
        kept_length = min(lengths.values())
        for _ in range(steps - 1):
            step_embeds = self.run("embed", {"input_ids": np.array([[tokens[-1]]], dtype=np.int64)})["inputs_embeds"]
            feeds = {"inputs_embeds": step_embeds, "position_ids": np.array([position], dtype=np.int64),
                     "past_kept_length": np.array([kept_length], dtype=np.int64), **buffers, **compact}  # fmt: skip
            step = self.run("decode", {name: feeds[name] for name in self.decode_inputs})
            for name, value in step.items():
                if name.startswith("new."):
                    key = f"past.{name[len('new.'):]}"
                    buffers[key][:, :, lengths[key]] = value[:, :, 0]
                    lengths[key] += 1
            logits.append(step["logits"][0])
            tokens.append(int(np.argmax(logits[-1])))
            position += 1
            kept_length += 1
        core = {
            int(name.split(".")[1]): value.tolist() for name, value in out.items() if name.startswith("core_neurons.")
        }
        kept = out.get("kept_image_tokens")
        return OrtGeneration(
            tokens=tokens,
            logits=np.stack(logits).astype(np.float32),
            image_features=features,
            kept_image_tokens=None if kept is None else kept.tolist(),
            core_neurons=core,
        )
