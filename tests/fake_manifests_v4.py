"""Hand-made format-4 manifests: the graph set of a build (vision and the decoder stacks, select and neurons for
CoreMatching builds), their I/O as `buildformat.names` declares it, prefill `dims` and the stacks' `decode_dims`.

Tiny sizes (tests/fake_manifests.py's model): d 64, 4 layers of 2 KV heads of 16, 16 image tokens, FFN width 128;
CoreMatching builds prune after layer 1 (lower: layers 0-1, upper: 2-3) and layer 2 is neuron-sparse per request
(32 core neurons), unless the build has static neurons. `make_build` writes such a build with JSON stand-ins for
its graphs (the engine builder's tests).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fake_manifests import manifest_json, write_manifest

from buildformat import names

D, N_KV, HD, FFN, CORE, N_IMG, VOCAB = 64, 2, 16, 128, 32, 16, 8
PRUNE, SPARSE = 1, 2
KEPT_IMAGE = 5  # the token budget

DIMS = {
    "S": {"min": 17, "opt": 20, "max": 64},
    "S_kept": {"min": 6, "opt": 9, "max": 53},
    "B": {"min": 1, "opt": 1, "max": 1},
    "B_kept": {"min": 1, "opt": 1, "max": 1},
    "W": {"min": FFN, "opt": FFN, "max": FFN},
}
DECODE_DIMS = {
    "S": {"min": 1, "opt": 1, "max": 1},
    "S_kept": {"min": 1, "opt": 1, "max": 1},
    "B": {"min": 17, "opt": 52, "max": 127},
    "B_kept": {"min": 6, "opt": 41, "max": 116},
    "W": {"min": CORE, "opt": CORE, "max": CORE},
}
CM = {
    "dense": False,
    "token_budget": KEPT_IMAGE,
    "token_ratio": 0.3,
    "neuron_ratio": 0.25,
    "prune_layer": PRUNE,
    "neuron_layers": [SPARSE],
    "tokens_per_neuron_set": 4,
    "core_neurons": CORE,
    "neuron_chunks": 1,
    "auto_range": [KEPT_IMAGE, KEPT_IMAGE],
    "token_selector": "core-coverage",
    "token_merge": "none",
    "seed": 0,
}


def _shape(name: str, seq: str, past: str) -> tuple[str, list[Any]]:
    """(dtype, shape) of a stack tensor by its name; `seq` is the new tokens' dim, `past` the buffers'."""
    if name in (names.INPUT_IDS,):
        return "int64", [1, seq]
    if name in (names.IMAGE_START, names.PAST_LENGTH):
        return "int64", [1]
    if name == names.POSITION_IDS:
        return "int64", [seq]
    if name == names.IMAGE_FEATURES:
        return "float32", [1, N_IMG, D]
    if name == names.HIDDEN:
        return "float32", [1, seq, D]
    if name == names.LOGITS:
        return "float32", [1, VOCAB]
    if names.is_past(name):
        return "float32", [1, N_KV, past, HD]
    if names.is_new(name):
        return "float32", [1, N_KV, seq, HD]
    if name.startswith("act."):
        return "float32", [seq, "W" if int(name.split(".")[1]) == SPARSE else FFN]
    if names.is_ffn(name):
        return "float32", ["W", D]  # neuron-major, every one
    raise AssertionError(name)


def _graph(file: str, inputs: list[tuple[str, str, list[Any]]], outputs: list[tuple[str, str, list[Any]]]) -> dict:
    def specs(items: list[tuple[str, str, list[Any]]]) -> list[dict[str, Any]]:
        return [{"name": n, "dtype": t, "shape": s} for n, t, s in items]

    return {"file": file, "external_data": "weights.bin", "inputs": specs(inputs), "outputs": specs(outputs)}


def _stack(graph: str, io: names.GraphNames, seq: str, past: str) -> dict:
    return _graph(
        f"{graph}.onnx",
        [(n, *_shape(n, seq, past)) for n in io.inputs],
        [(n, *_shape(n, seq, past)) for n in io.outputs],
    )


def graphs_v4(dense: bool = False, per_request_neurons: bool = True) -> dict[str, dict]:
    """The manifest's `graphs` section of such a build, in prefill order."""
    vision = _graph(
        "vision.onnx", [("pixel_values", "float32", [1, 3, 32, 32])], [("image_features", "float32", [1, N_IMG, D])]
    )
    if dense:
        io = names.stack_names(
            range(4), embeds=True, head=True, merge=False, bound_layers=(), act_layers=(), attention_layer=None
        )
        return {"vision": vision, "decoder": _stack("decoder", io, "S", "B")}
    sparse = (SPARSE,) if per_request_neurons else ()
    lower = names.stack_names(
        range(PRUNE + 1),
        embeds=True,
        head=False,
        merge=False,
        bound_layers=(),
        act_layers=(PRUNE,),
        attention_layer=None,
    )
    upper = names.stack_names(
        range(PRUNE + 1, 4), embeds=False, head=True, merge=False, bound_layers=sparse, act_layers=sparse,
        attention_layer=None,
    )  # fmt: skip
    select = _graph(
        "select.onnx",
        [
            ("hidden", "float32", [1, "S", D]),
            (names.activation_name(PRUNE), "float32", ["S", FFN]),
            ("image_start", "int64", [1]),
        ],
        [
            ("kept_hidden", "float32", [1, "S_kept", D]),
            ("kept_positions", "int64", ["S_kept"]),
            ("kept_image_tokens", "int64", [KEPT_IMAGE]),
        ],
    )  # fmt: skip
    graphs = {
        "vision": vision,
        "lower": _stack("lower", lower, "S", "B"),
        "select": select,
        "upper": _stack("upper", upper, "S_kept", "B_kept"),
    }
    if per_request_neurons:
        ffn = names.ffn_names(sparse)
        graphs["neurons"] = _graph(
            "neurons.onnx",
            [(names.activation_name(SPARSE), "float32", ["S_kept", FFN])] + [(n, "float32", [FFN, D]) for n in ffn],
            [(names.core_neurons_name(SPARSE), "int64", [CORE])]
            + [(names.compact_name(n), "float32", [CORE, D]) for n in ffn],
        )
    return graphs


def manifest_v4_json(dense: bool = False, per_request_neurons: bool = True, **changes: Any) -> dict[str, Any]:
    """The JSON of a format-4 manifest (tests/fake_manifests.py's model); `changes` replace top-level sections."""
    dims = {k: v for k, v in DIMS.items() if not dense or k in ("S", "B")}
    decode = {k: v for k, v in DECODE_DIMS.items() if not dense or k in ("S", "B")}
    if not per_request_neurons:
        dims.pop("W", None)
        decode.pop("W", None)
    sections: dict[str, Any] = {
        "dims": dims,
        "decode_dims": decode,
        "graphs": graphs_v4(dense, per_request_neurons),
    }
    if not dense:
        sections["corematching"] = CM
    return manifest_json(**(sections | changes))


def make_build(tmp_path: Path, dense: bool = False, per_request_neurons: bool = True, **changes: Any) -> Path:
    """A build directory of such a manifest whose .onnx files are JSON stand-ins that tests/fake_tensorrt.py's
    parser reads (the network's input shapes, -1 on dynamic axes)."""
    build = tmp_path / "build"
    build.mkdir(parents=True)
    manifest = manifest_v4_json(dense, per_request_neurons, **changes)
    for entry in manifest["graphs"].values():
        shapes = {s["name"]: [-1 if isinstance(d, str) else d for d in s["shape"]] for s in entry["inputs"]}
        (build / entry["file"]).write_text(json.dumps({"inputs": shapes}))
    (build / "weights.bin").write_bytes(b"\0" * 64)
    (build / "tokenizer.json").write_text("{}")
    graphs = [entry["file"] for entry in manifest["graphs"].values()]
    write_manifest(build, manifest, [*graphs, "weights.bin", "tokenizer.json"])
    return build
