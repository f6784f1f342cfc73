"""`python -m serving.triton BUILD --out REPO`: a Triton Inference Server model repository for a build.

Torch-free. The repository holds one Python-backend model (decoupled: one response per token)
that runs the project's runtime pipeline on the build, with the runtime packages copied next to
it, so Triton's Python needs only numpy, onnxruntime (or TensorRT), tokenizers, Pillow and Jinja2
(the build's chat template).
"""

from serving.triton.repository import TritonConfig, TritonConfigError, write_repository

__all__ = ["TritonConfig", "TritonConfigError", "write_repository"]
