"""One weight file for every graph of a build.

Each weight is in one graph (the stacks serve both phases), and the build writes
every initializer into `weights.bin` (64-byte aligned, deduplicated by name and
content), pointing the graphs' initializers at it as ONNX external data
(location, offset, length): the graphs stay standard ONNX that onnx, ONNX
Runtime and TensorRT's parser read as they are. The per-request neuron-sparse
layers' full FFN weights, which no graph holds (the runtime binds them,
`export.bound`), go into the same file. The manifest indexes it, so the
torch-free runtime can memory-map it once and hand each session views of the
pages (`runtime.ort_backend`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from buildformat import WeightEntry, WeightsIndex

WEIGHTS = "weights.bin"
ALIGN = 64
# Smaller tensors (shapes, scalars) stay inside the graph: ONNX Runtime needs those for shape inference.
MIN_BYTES = 1024


def share_weights(build: Path, graphs: list[str], bound: dict[str, np.ndarray] | None = None) -> WeightsIndex:
    """Moves the initializers of `graphs` (file names in `build`) into one weights.bin, then writes the `bound`
    tensors; returns the index (graph file -> initializer -> offset, dtype, shape; bound name -> ...) that the
    manifest records."""
    stored: dict[tuple[str, str], int] = {}  # (name, sha256) -> offset
    index: dict[str, dict[str, WeightEntry]] = {}
    held: dict[str, WeightEntry] = {}
    with (build / WEIGHTS).open("wb") as blob:
        for name, array in (bound or {}).items():
            blob.write(b"\0" * (-blob.tell() % ALIGN))
            held[name] = WeightEntry(blob.tell(), array.dtype.name, tuple(array.shape))
            blob.write(np.ascontiguousarray(array).tobytes())
        for graph in graphs:
            path = build / graph
            model = onnx.load(path, load_external_data=True)
            entries: dict[str, WeightEntry] = {}
            for tensor in model.graph.initializer:
                data, dtype = _stored_bytes(tensor)
                if len(data) < MIN_BYTES:
                    continue
                key = (tensor.name, hashlib.sha256(data).hexdigest())
                if key not in stored:
                    blob.write(b"\0" * (-blob.tell() % ALIGN))
                    stored[key] = blob.tell()
                    blob.write(data)
                offset = stored[key]
                _point_at(tensor, offset, len(data))
                entries[tensor.name] = WeightEntry(offset, dtype, tuple(tensor.dims))
            onnx.save_model(model, path)
            stale = build / f"{graph}.data"
            if stale.exists():
                stale.unlink()
            index[graph] = entries
    return WeightsIndex(file=WEIGHTS, graphs=index, bound=held)


def _stored_bytes(tensor: onnx.TensorProto) -> tuple[bytes, str]:
    """The bytes ONNX external data holds for `tensor`, and its dtype name. int4 has no numpy type: its
    packed bytes (two values per byte) are taken as they are and named "int4"."""
    if tensor.data_type == onnx.TensorProto.INT4:
        return tensor.raw_data, "int4"
    array = numpy_helper.to_array(tensor)
    return np.ascontiguousarray(array).tobytes(), array.dtype.name


def _point_at(tensor: onnx.TensorProto, offset: int, length: int) -> None:
    """Makes `tensor` an external-data reference into weights.bin (the ONNX external data fields)."""
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    for key, value in (("location", WEIGHTS), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL
