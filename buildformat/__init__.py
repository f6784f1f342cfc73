"""The build format: the typed manifest of a build directory and how to read, write and check it.

The ground floor that `export/` writes and `runtime/` reads; it needs only the standard library
(docs/build-format.md).
"""

from buildformat.files import read, read_json, sha256_file, verify, with_files, write
from buildformat.manifest import (
    FORMAT_VERSION,
    GRAPHS,
    MANIFEST,
    CoreMatchingInfo,
    Dim,
    Engines,
    Flops,
    GraphInfo,
    Manifest,
    ManifestError,
    ModelInfo,
    Quantization,
    StaticNeuronsInfo,
    TensorSpec,
    TokenizerInfo,
    WeightEntry,
    WeightsIndex,
)

__all__ = [
    "FORMAT_VERSION",
    "GRAPHS",
    "MANIFEST",
    "CoreMatchingInfo",
    "Dim",
    "Engines",
    "Flops",
    "GraphInfo",
    "Manifest",
    "ManifestError",
    "ModelInfo",
    "Quantization",
    "StaticNeuronsInfo",
    "TensorSpec",
    "TokenizerInfo",
    "WeightEntry",
    "WeightsIndex",
    "read",
    "read_json",
    "sha256_file",
    "verify",
    "with_files",
    "write",
]
