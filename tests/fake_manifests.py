"""Hand-made manifests for tests that need a build directory's contract, not a real build."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import buildformat
from buildformat import FORMAT_VERSION, Manifest

MODEL: dict[str, Any] = {
    "source": "test",
    "text_model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 16,
    "vocab_size": 8,
    "image_size": 32,
    "patch_size": 8,
    "num_image_tokens": 16,
    "image_token_id": 5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
TOKENIZER = {
    "tokenizer": "tokenizer.json",
    "chat_template": "chat_template.jinja",
    "preprocessor": "preprocessor_config.json",
}


def manifest_json(**changes: Any) -> dict[str, Any]:
    """The JSON of a minimal dense build's manifest; `changes` replace top-level sections."""
    data: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "created": "2026-01-01T00:00:00Z",
        "model": dict(MODEL),
        "precision": "float32",
        "opset": 18,
        "corematching": {"dense": True},
        "dims": {},
        "decode_dims": {},
        "graphs": {},
        "tensorrt": {"compatible": True, "reason": ""},
        "tokenizer": dict(TOKENIZER),
        "files": {},
    }
    data.update(json.loads(json.dumps(changes)))
    return data


def write_manifest(build: Path, data: dict[str, Any], record: list[str] | None = None) -> Manifest:
    """Writes `data` as the build's manifest (with the sha256 of the `record` files and its digest)."""
    manifest = Manifest.from_json(data)
    if record:
        manifest = buildformat.with_files(build, manifest, record)
    buildformat.write(build, manifest)
    return manifest
