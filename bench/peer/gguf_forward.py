"""A numpy forward pass of a llama GGUF, computed the way llama.cpp computes it.

It reads the file back with `gguf.GGUFReader` (names, shapes and metadata as llama.cpp would see them) and
applies llama.cpp's rope to the stored q/k: adjacent pairs (2i, 2i + 1) rotate together. If the export
forgot or botched the q/k permutation, or wrote a tensor transposed, or a wrong head count, its logits
differ from the HF model's; so this checks the GGUF's layout without llama.cpp (tests/test_peer.py).
A quantized GGUF's tensors are dequantized (`gguf.quants`): the forward is then the exact model llama.cpp
runs from that file, which the llama.cpp check holds llama.cpp's quantized kernels to (bench/peer/check.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ARCH = "llama"


@dataclass(frozen=True)
class GgufModel:
    """A llama GGUF's metadata and tensors (float32 numpy arrays in the written shapes, [out, in]; a quantized
    tensor dequantized)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tensors: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads or self.head_dim % 2:
            raise ValueError(f"bad head geometry: {self.num_heads} heads, {self.num_kv_heads} kv, {self.head_dim}")
        missing = {"token_embd.weight", "output_norm.weight", "output.weight"} - set(self.tensors)
        if missing:
            raise ValueError(f"GGUF lacks {sorted(missing)}")

    @classmethod
    def read(cls, path: Path) -> GgufModel:
        import gguf
        from gguf.quants import dequantize

        reader = gguf.GGUFReader(path)

        def value(key: str) -> Any:
            return reader.fields[f"{ARCH}.{key}"].contents()

        tensors = {}
        for t in reader.tensors:
            if t.tensor_type == gguf.GGMLQuantizationType.F32:
                tensors[t.name] = np.asarray(t.data, dtype=np.float32)
            else:  # blocks of integers and scales -> the values llama.cpp's kernels compute with
                tensors[t.name] = dequantize(t.data, t.tensor_type).astype(np.float32)
        heads, d = int(value("attention.head_count")), int(value("embedding_length"))
        head_dim = int(value("attention.key_length")) if f"{ARCH}.attention.key_length" in reader.fields else d // heads
        return cls(
            num_layers=int(value("block_count")),
            num_heads=heads,
            num_kv_heads=int(value("attention.head_count_kv")),
            head_dim=head_dim,
            rope_theta=float(value("rope.freq_base")),
            rms_norm_eps=float(value("attention.layer_norm_rms_epsilon")),
            tensors=tensors,
        )


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _rope_pairs(x: np.ndarray, theta: float) -> np.ndarray:
    """llama.cpp's "normal" rope on [S, heads, head_dim]: dims (2i, 2i + 1) rotate by pos * theta^(-2i/hd)."""
    seq, _, dim = x.shape
    freqs = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)  # [hd / 2]
    angles = np.arange(seq, dtype=np.float64)[:, None] * freqs  # [S, hd / 2]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def forward(model: GgufModel, ids: np.ndarray) -> np.ndarray:
    """Logits [S, vocab] of token ids [S] (causal, from position 0), in float64 for a clean reference (each
    weight converted as it is used: a 7B-shaped model's weights are not all held twice)."""

    def w(name: str) -> np.ndarray:
        return model.tensors[name].astype(np.float64)

    seq, hd, heads, kv = len(ids), model.head_dim, model.num_heads, model.num_kv_heads
    x = w("token_embd.weight")[ids]  # [S, d]
    mask = np.triu(np.full((seq, seq), -np.inf), k=1)  # [S, S]
    for b in range(model.num_layers):
        p = f"blk.{b}."
        h = _rms_norm(x, w(p + "attn_norm.weight"), model.rms_norm_eps)
        q = _rope_pairs((h @ w(p + "attn_q.weight").T).reshape(seq, heads, hd), model.rope_theta)
        k = _rope_pairs((h @ w(p + "attn_k.weight").T).reshape(seq, kv, hd), model.rope_theta)
        v = (h @ w(p + "attn_v.weight").T).reshape(seq, kv, hd)
        group = heads // kv  # query head i reads kv head i // group
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # [S, heads, hd]
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask  # [heads, S, S]
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        attn = np.einsum("hqk,khd->qhd", probs, v).reshape(seq, heads * hd)
        x = x + attn @ w(p + "attn_output.weight").T
        h = _rms_norm(x, w(p + "ffn_norm.weight"), model.rms_norm_eps)
        gate = h @ w(p + "ffn_gate.weight").T  # [S, ffn]
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w(p + "ffn_up.weight").T)) @ w(p + "ffn_down.weight").T
    return _rms_norm(x, w("output_norm.weight"), model.rms_norm_eps) @ w("output.weight").T
