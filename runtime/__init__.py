"""The torch-free runtime: ONNX Runtime or TensorRT, numpy, tokenizers and Pillow only (docs/architecture.md).

from runtime import Pipeline
answer = Pipeline.load("builds/default").answer("photo.jpg", "What is on the table?")
"""

from runtime.backend import BackendError
from runtime.pipeline import Answer, GenerationError, Pipeline
from runtime.preprocess import ImageError
from runtime.sampling import Sampling, SamplingError
from runtime.text import PromptError

__all__ = [
    "Answer",
    "BackendError",
    "GenerationError",
    "ImageError",
    "Pipeline",
    "PromptError",
    "Sampling",
    "SamplingError",
]
