"""The torch-free runtime: ONNX Runtime or TensorRT, numpy, tokenizers and Pillow only (docs/architecture.md).

from runtime import Pipeline
answer = Pipeline.load("builds/default").answer("photo.jpg", "What is on the table?")
"""

from buildformat import ManifestError
from runtime.backend import BackendError
from runtime.chat import Conversation, ConversationError, Message, MissingImage, TooManyImages
from runtime.pipeline import Answer, AnswerTooLong, GenerationError, Pipeline
from runtime.preprocess import ImageError, ImageTooLarge
from runtime.sampling import Sampling, SamplingError
from runtime.stops import StopError
from runtime.text import PromptError, PromptTooLong

# What a request can get wrong (the image, the question, the settings): reported to its sender.
REQUEST_ERRORS = (ConversationError, GenerationError, ImageError, PromptError, SamplingError, StopError)
# Also what a user can get wrong when starting: a broken build, a backend this machine lacks.
USER_ERRORS = (BackendError, ManifestError, *REQUEST_ERRORS)

__all__ = [
    "REQUEST_ERRORS",
    "USER_ERRORS",
    "Answer",
    "AnswerTooLong",
    "BackendError",
    "Conversation",
    "ConversationError",
    "GenerationError",
    "ImageError",
    "ImageTooLarge",
    "Message",
    "MissingImage",
    "Pipeline",
    "PromptError",
    "PromptTooLong",
    "Sampling",
    "SamplingError",
    "StopError",
    "TooManyImages",
]
