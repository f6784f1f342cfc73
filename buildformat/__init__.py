"""The build format: the typed manifest of a build directory and how to read, write and check it.

The ground floor that `export/` writes and `runtime/` reads; it needs only the standard library
(docs/build-format.md). The manifest's sections are records by concern: `model` (the checkpoint,
the budgets, the prompt format), `graphs`, `weights` (the weights file, quantization, a static
neuron set), `engines`, `validation`; `manifest` gathers them and `files` reads and writes them.
"""

from buildformat.engines import Engines
from buildformat.files import read, read_json, sha256_file, verify, with_files, write
from buildformat.graphs import Dim, GraphInfo, TensorSpec
from buildformat.jsonfields import ManifestError
from buildformat.manifest import FORMAT_VERSION, MANIFEST, Flops, Manifest
from buildformat.model import CoreMatchingInfo, ModelInfo, TokenizerInfo
from buildformat.validation import (
    ArithmeticCheck,
    Criteria,
    DistanceToFloat,
    QuantizationChecks,
    SkippedValidation,
    Validation,
    ValidationCase,
    ValidationRecord,
)
from buildformat.weights import Quantization, StaticNeuronsInfo, WeightEntry, WeightsIndex

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "ArithmeticCheck",
    "CoreMatchingInfo",
    "Criteria",
    "Dim",
    "DistanceToFloat",
    "Engines",
    "Flops",
    "GraphInfo",
    "Manifest",
    "ManifestError",
    "ModelInfo",
    "Quantization",
    "QuantizationChecks",
    "SkippedValidation",
    "StaticNeuronsInfo",
    "TensorSpec",
    "TokenizerInfo",
    "Validation",
    "ValidationCase",
    "ValidationRecord",
    "WeightEntry",
    "WeightsIndex",
    "read",
    "read_json",
    "sha256_file",
    "verify",
    "with_files",
    "write",
]
