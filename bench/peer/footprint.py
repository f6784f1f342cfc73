"""What a decode step must read, and how fast this machine reads: the floor under a decode step.

A decode step of one token is memory bound: it streams every weight once (but one row of the token
embedding table) and the KV cache. bytes / bandwidth is the time a step cannot beat; a step's time over
that floor says how far an engine is from the machine's limit.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

EMBEDDING = "token_embd.weight"


def memory_bandwidth(size: int = 1 << 30, tries: int = 5) -> float:
    """Bytes per second: the best of `tries` numpy copies of a `size`-byte array, counting the bytes read and
    the bytes written (2 x size per copy). One thread (numpy copies on one): what one core's stream gets,
    a floor a multi-threaded engine may beat a little on a machine whose one core cannot saturate memory."""
    source = np.ones(size // 8, dtype=np.float64)  # written once, so every page is really there
    target = np.zeros_like(source)
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.nbytes / best


def gguf_step_weight_bytes(path: Path) -> int:
    """The GGUF's tensor bytes a decode step reads: every tensor but the embedding table, of which one row."""
    import gguf

    total = 0
    for tensor in gguf.GGUFReader(path).tensors:
        if tensor.name == EMBEDDING:
            rows = int(tensor.shape[-1])  # ggml's shape is [d, vocab]: the last dimension counts the rows
            total += int(tensor.n_bytes) // rows
        else:
            total += int(tensor.n_bytes)
    return total


def ggml_type_bytes(name: str, elements: int) -> int:
    """Bytes of `elements` values of a ggml type named as llama-bench prints it ("f16", "q8_0", ...)."""
    import gguf

    try:
        kind = gguf.GGMLQuantizationType[name.upper()]
    except KeyError:
        raise ValueError(f"unknown ggml type {name!r}") from None
    block, size = gguf.GGML_QUANT_SIZES[kind]
    return elements // block * size


def llama_cpp_kv_bytes(num_layers: int, kv_width: int, length: int, type_k: str, type_v: str) -> int:
    """llama.cpp's KV cache of `length` tokens: every layer holds K and V of kv_width (kv heads x head dim)."""
    elements = num_layers * length * kv_width
    return ggml_type_bytes(type_k, elements) + ggml_type_bytes(type_v, elements)
