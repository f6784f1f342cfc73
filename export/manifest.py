"""The build's manifest.json: what a build holds and how to check it (torch-free).

Format (version 2; version 1 builds have no token selector or merge and must be rebuilt)::

    {
      "format_version": 2,
      "created": "2026-11-24T06:40:00Z",
      "model": {"source", "text_model_type", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "head_dim", "vocab_size", "image_size", "patch_size", "num_image_tokens",
                "image_token_id", "bos_token_id", "eos_token_id", "pad_token_id"},
      "precision": "float32" | "float16",
      "opset": 18,
      "corematching": {"dense", "token_budget", "token_ratio", "neuron_ratio", "prune_layer", "neuron_layers",
                       "tokens_per_neuron_set", "core_neurons", "neuron_chunks", "auto_range",
                       "token_selector", "token_merge", "seed"},
      "dims": {"S": {"min", "opt", "max"}, ...},          # every symbolic dimension of the graphs
      "graphs": {"vision" | "embed" | "prefill" | "decode": {
          "file": "prefill.onnx", "external_data": "weights.bin",   # shared by all graphs
          "inputs": [{"name", "dtype", "shape": [1, "S", 64]}], "outputs": [...]}},
      "tensorrt": {"compatible": bool, "reason": str},
      "files": {"prefill.onnx": "<sha256>", ...},         # every file of the build but the manifest
      "tokenizer": {"tokenizer": "tokenizer.json", "chat_template": "chat_template.jinja",
                    "preprocessor": "preprocessor_config.json"},
      "weights": {"file": "weights.bin", "graphs": {"prefill.onnx": {name: [offset, dtype, shape]}}},
      "validation": {...}, "versions": {...},
      "engines": {...},                                   # added by `python -m export engine`
      "integrity": "<sha256>"                             # of this JSON without the field itself
    }

Shapes hold ints for static dimensions and the names of `dims` for dynamic ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

FORMAT_VERSION = 2
MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """A build directory is missing, incomplete, tampered with or of an unknown format."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(build_dir: str | Path) -> dict[str, Any]:
    """The manifest of a build, with its format version checked (files are not hashed here)."""
    build = Path(build_dir)
    path = build / MANIFEST
    if not build.is_dir():
        raise ManifestError(f"build directory {build} does not exist; run `python -m export build --out {build}`")
    if not path.is_file():
        raise ManifestError(f"{build} has no {MANIFEST}, so it is not a finished build; rebuild it")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON ({e}); rebuild the build directory") from e
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int):
        raise ManifestError(f"{path} has no format_version; rebuild the build directory")
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"{path} is format version {version}, newer than this tool's {FORMAT_VERSION}; update the project"
        )
    if version < FORMAT_VERSION:
        raise ManifestError(
            f"{path} is format version {version}, older than {FORMAT_VERSION} (builds now record their token "
            f"selector and merge); rebuild it with `python -m export build --out {build} --force`"
        )
    return manifest


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's content without its `integrity` field (canonical JSON)."""
    body = {key: value for key, value in manifest.items() if key != "integrity"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify_files(build_dir: str | Path, manifest: dict[str, Any], only: list[str] | None = None) -> None:
    """Checks the manifest's own digest and the sha256 of every file it lists (or of `only` those).

    Raises ManifestError naming the first file that was changed.
    """
    build = Path(build_dir)
    if manifest.get("integrity") != manifest_digest(manifest):
        raise ManifestError(f"{build / MANIFEST} was edited after the build (its integrity digest differs); rebuild it")
    files: dict[str, str] = manifest.get("files", {})
    for name in only if only is not None else sorted(files):
        if name not in files:
            raise ManifestError(f"{build / MANIFEST} does not list {name}; rebuild the build directory")
        path = build / name
        if not path.is_file():
            raise ManifestError(f"{path} is missing from the build; rebuild it")
        if sha256_file(path) != files[name]:
            raise ManifestError(f"{path} does not match its sha256 in {MANIFEST}: the file was changed; rebuild it")


def record_files(build_dir: str | Path, manifest: dict[str, Any], names: list[str]) -> None:
    """Stores the sha256 of each of `names` (paths relative to the build) in the manifest."""
    build = Path(build_dir)
    files = manifest.setdefault("files", {})
    for name in names:
        if not (build / name).is_file():
            raise ManifestError(f"{build / name} is missing; it cannot be recorded in {MANIFEST}")
        files[name] = sha256_file(build / name)


def write_manifest(build_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Writes manifest.json atomically (a temporary file renamed over the old one), with its digest."""
    build = Path(build_dir)
    manifest["integrity"] = manifest_digest(manifest)
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".json", dir=build)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())  # a power cut on a Jetson's eMMC must not leave an empty manifest
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a build is shared like any other file
        os.replace(tmp, build / MANIFEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def graph_files(manifest: dict[str, Any], graph: str) -> list[str]:
    """The files of one graph: the .onnx and, for large models, its external data."""
    if graph not in manifest.get("graphs", {}):
        raise ManifestError(f"the build has no {graph!r} graph; rebuild it with `python -m export build`")
    entry = manifest["graphs"][graph]
    return [entry["file"]] + ([entry["external_data"]] if entry.get("external_data") else [])
