"""Writing the model repository: config.pbtxt, the model, the build and the runtime packages, a README."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import buildformat
from serving.triton.interface import interface

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent  # the checkout: the runtime packages copied into the repository live here
PACKAGES = ("runtime", "buildformat")
# The model's own files, copied beside the packages: model.py imports chat_messages.py from there.
MODEL_FILES = ("model.py", "chat_messages.py")
PROVIDERS = ("auto", "tensorrt", "cuda", "cpu")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class TritonConfigError(ValueError):
    """A setting of `python -m serving.triton` is out of range; the message names the flag."""


@dataclass(frozen=True)
class TritonConfig:
    build: Path
    out: Path
    instances: int = 1
    max_batch: int = 1  # the runtime's graphs answer one request at a time
    name: str = "corematching"
    provider: str = "auto"
    link: bool = False  # symlink the build instead of copying it
    force: bool = False

    def __post_init__(self) -> None:
        if self.instances < 1:
            raise TritonConfigError(f"--instances must be at least 1, got {self.instances}")
        if self.max_batch != 1:
            raise TritonConfigError(
                f"--max-batch must be 1 (the build's graphs are batch 1, got {self.max_batch}); "
                "scale out with --instances"
            )
        if not _NAME.fullmatch(self.name):
            raise TritonConfigError(f"--name {self.name!r} is not a Triton model name (letters, digits, _ . -)")
        if self.provider not in PROVIDERS:
            raise TritonConfigError(f"--provider must be one of {', '.join(PROVIDERS)}, got {self.provider!r}")


def config_pbtxt(config: TritonConfig) -> str:
    """The model's configuration: decoupled (tokens stream), batch 1 per instance, N instances."""
    return f'''# Made by `python -m serving.triton`: the CoreMatching runtime pipeline on one build.
name: "{config.name}"
backend: "python"
# The graphs are batch 1: Triton queues requests and runs one per instance at a time.
max_batch_size: 0
# Decoupled: one response per generated token, then a final one with the kept tokens and timings.
model_transaction_policy {{ decoupled: true }}
input [
  {{ name: "IMAGE" data_type: TYPE_STRING dims: [ 1 ] }},  # the encoded PNG / JPEG (or its base64)
  # One of QUESTION (one question) and MESSAGES (a JSON list of chat messages, the image's place marked).
  {{ name: "QUESTION" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "MESSAGES" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  # Up to 4 stop strings, one per element (a list tensor, as TensorRT-LLM's stop_words).
  {{ name: "STOP" data_type: TYPE_STRING dims: [ -1 ] optional: true }},
  {{ name: "MAX_TOKENS" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "TEMPERATURE" data_type: TYPE_FP32 dims: [ 1 ] optional: true }},
  {{ name: "TOP_P" data_type: TYPE_FP32 dims: [ 1 ] optional: true }},
  {{ name: "SEED" data_type: TYPE_INT64 dims: [ 1 ] optional: true }}
]
output [
  {{ name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] }},  # the step's new text ("" in the final response)
  {{ name: "TOKEN_ID" data_type: TYPE_INT64 dims: [ 1 ] }},  # the step's token (-1 in the final response)
  {{ name: "KEPT_IMAGE_TOKENS" data_type: TYPE_INT64 dims: [ -1 ] }},  # final response: kept image tokens
  {{ name: "RESULT" data_type: TYPE_STRING dims: [ 1 ] }}  # final response: JSON answer, token ids, timings
]
# KIND_CPU: the pipeline picks its own execution provider (parameters.provider) inside each instance.
instance_group [ {{ count: {config.instances} kind: KIND_CPU }} ]
parameters: {{ key: "provider" value: {{ string_value: "{config.provider}" }} }}
'''


def _readme(config: TritonConfig, engines: bool) -> str:
    text = (HERE / "README.template.md").read_text()
    return (
        text.replace("{interface}", interface(config.name).strip())
        .replace("{name}", config.name)
        .replace("{instances}", str(config.instances))
        .replace("{engines}", "its TensorRT engines" if engines else "ONNX Runtime (the build has no engines)")
    )


def write_repository(config: TritonConfig) -> Path:
    """Writes the repository at `config.out` (built in a temporary directory, then renamed)."""
    manifest = buildformat.read(config.build)
    buildformat.verify(config.build, manifest)  # a broken build fails here, not in Triton's log
    out = config.out
    if out.exists() and not config.force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        version = staging / config.name / "1"
        version.mkdir(parents=True)
        (staging / config.name / "config.pbtxt").write_text(config_pbtxt(config))
        for name in MODEL_FILES:
            shutil.copy2(HERE / name, version / name)
        for package in PACKAGES:
            shutil.copytree(ROOT / package, version / package, ignore=shutil.ignore_patterns("__pycache__", "serve"))
        if config.link:
            os.symlink(config.build.resolve(), version / "build", target_is_directory=True)
        else:
            log.info("copying the build %s", config.build)
            shutil.copytree(config.build, version / "build")
        (staging / "README.md").write_text(_readme(config, manifest.engines is not None))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
