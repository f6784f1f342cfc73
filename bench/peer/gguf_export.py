"""The checkpoint's decoder as a llama.cpp model: a `llama`-architecture GGUF with f32 tensors.

Only the language model goes in (llama.cpp runs no vision tower here): token_embd, per layer attn_norm,
attn_q/attn_k/attn_v/attn_output, ffn_norm, ffn_gate/ffn_up/ffn_down, then output_norm and output (the
untied lm_head). Names and metadata keys are the `gguf` package's (llama.cpp's own writer); the layout
follows llama.cpp's HF converter (convert_hf_to_gguf.py, LlamaModel): weights stay [out, in] as HF stores
them, and q/k rows are permuted for llama.cpp's rope (`permute_rope_rows`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.peer.vocab import Vocabulary, id_only_vocabulary

log = logging.getLogger(__name__)

ARCH = "llama"


class GgufExportError(ValueError):
    """The checkpoint's decoder is not one this export can write (a bias, a rope scaling, an odd head width)."""


@dataclass(frozen=True)
class DecoderGeometry:
    """What the GGUF's metadata says of the decoder (read from the HF text config)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    context_length: int
    rope_theta: float
    rms_norm_eps: float
    bos_id: int
    eos_id: int

    def __post_init__(self) -> None:
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads")
        for name in (*sizes, "head_dim", "context_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise GgufExportError(f"DecoderGeometry.{name} must be a positive int, got {value!r}")
        if self.head_dim % 2:  # rope rotates pairs of dimensions
            raise GgufExportError(f"DecoderGeometry.head_dim must be even, got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise GgufExportError(f"{self.num_heads} heads are not a multiple of {self.num_kv_heads} kv heads")
        if not (self.rope_theta > 0 and self.rms_norm_eps > 0):
            raise GgufExportError("rope_theta and rms_norm_eps must be positive")

    @classmethod
    def from_text_config(cls, text: Any) -> DecoderGeometry:
        """From a transformers LlamaConfig; a rope scaling, a bias or a non-SiLU MLP is refused (llama.cpp
        would need more metadata than this export writes, and the comparison would no longer be like for like)."""
        # transformers 5 keeps the rope in `rope_parameters` (`rope_scaling` is its alias); 4.x had `rope_theta`
        # beside a `rope_scaling` that is None for the default rope.
        rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise GgufExportError(f"rope type {rope_type!r}: only the default rope is exported")
        if getattr(text, "attention_bias", False) or getattr(text, "mlp_bias", False):
            raise GgufExportError("attention or MLP biases are not exported")
        if getattr(text, "hidden_act", "silu") != "silu":
            raise GgufExportError(f"hidden_act {text.hidden_act!r}: llama.cpp's llama architecture is SwiGLU")
        theta = rope.get("rope_theta", getattr(text, "rope_theta", None))
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(
            vocab_size=text.vocab_size,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_layers=text.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            context_length=text.max_position_embeddings,
            rope_theta=float(theta),
            rms_norm_eps=float(text.rms_norm_eps),
            bos_id=text.bos_token_id,
            eos_id=text.eos_token_id,
        )


def permute_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """q or k [heads * head_dim, d] from HF's rope layout to llama.cpp's.

    HF rotates halves: dimension i of a head pairs with i + head_dim / 2. llama.cpp's LLAMA architecture
    (rope mode "normal") rotates adjacent pairs (2i, 2i + 1). Reordering each head's output rows from
    [first half, second half] to interleaved (row i then row i + head_dim / 2) makes the two agree; the
    attention scores are unchanged, since q and k are permuted alike (v and the output projection are not).
    -> the same shape, rows reordered
    """
    rows = weight.shape[0]
    half = rows // heads // 2
    # [heads, 2 (half), half_dim, d] -> [heads, half_dim, 2, d]: row (h, i, j) = HF's row h * hd + j * half + i
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _decoder(model: Any) -> tuple[Any, Any]:
    """(the Llama decoder, its lm_head) of a transformers LLaVA or Llama causal LM."""
    inner = getattr(model, "model", None)
    decoder = getattr(inner, "language_model", None) or inner
    if decoder is None or not hasattr(decoder, "layers") or not hasattr(model, "lm_head"):
        raise GgufExportError(f"{type(model).__name__}: no Llama decoder with an lm_head found")
    return decoder, model.lm_head


def _array(tensor: Any) -> np.ndarray:
    return tensor.detach().to(device="cpu").float().numpy()


def decoder_tensors(model: Any, geometry: DecoderGeometry) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF tensor name, f32 array) for every decoder weight, in llama.cpp's order and layout."""
    import gguf

    decoder, lm_head = _decoder(model)
    names = gguf.TENSOR_NAMES

    def name(kind: Any, bid: int | None = None) -> str:
        return names[kind].format(bid=bid) + ".weight"

    t = gguf.MODEL_TENSOR
    yield name(t.TOKEN_EMBD), _array(decoder.embed_tokens.weight)  # [vocab, d]
    for bid, layer in enumerate(decoder.layers):
        attn, mlp = layer.self_attn, layer.mlp
        yield name(t.ATTN_NORM, bid), _array(layer.input_layernorm.weight)  # [d]
        yield name(t.ATTN_Q, bid), permute_rope_rows(_array(attn.q_proj.weight), geometry.num_heads)  # [h*hd, d]
        yield name(t.ATTN_K, bid), permute_rope_rows(_array(attn.k_proj.weight), geometry.num_kv_heads)
        yield name(t.ATTN_V, bid), _array(attn.v_proj.weight)  # [kv*hd, d]
        yield name(t.ATTN_OUT, bid), _array(attn.o_proj.weight)  # [d, h*hd]
        yield name(t.FFN_NORM, bid), _array(layer.post_attention_layernorm.weight)
        yield name(t.FFN_GATE, bid), _array(mlp.gate_proj.weight)  # [ffn, d]
        yield name(t.FFN_UP, bid), _array(mlp.up_proj.weight)  # [ffn, d]
        yield name(t.FFN_DOWN, bid), _array(mlp.down_proj.weight)  # [d, ffn]
    yield name(t.OUTPUT_NORM), _array(decoder.norm.weight)
    yield name(t.OUTPUT), _array(lm_head.weight)  # [vocab, d]


def _metadata(writer: Any, geometry: DecoderGeometry, vocab: Vocabulary) -> None:
    import gguf

    g = geometry
    writer.add_context_length(g.context_length)
    writer.add_embedding_length(g.hidden_size)
    writer.add_block_count(g.num_layers)
    writer.add_feed_forward_length(g.intermediate_size)
    writer.add_head_count(g.num_heads)
    writer.add_head_count_kv(g.num_kv_heads)
    if g.head_dim != g.hidden_size // g.num_heads:  # llama.cpp assumes d / heads unless told
        writer.add_key_length(g.head_dim)
        writer.add_value_length(g.head_dim)
    writer.add_rope_dimension_count(g.head_dim)  # the whole head rotates
    writer.add_rope_freq_base(g.rope_theta)
    writer.add_layer_norm_rms_eps(g.rms_norm_eps)
    writer.add_vocab_size(g.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(list(vocab.tokens))
    writer.add_token_scores(list(vocab.scores))
    writer.add_token_types(list(vocab.types))
    writer.add_unk_token_id(vocab.unk_id)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)


def write_gguf(model: Any, path: Path) -> DecoderGeometry:
    """The decoder of `model` (a transformers LLaVA or Llama causal LM) as an f32 GGUF at `path`."""
    import gguf

    geometry = DecoderGeometry.from_text_config(getattr(model.config, "text_config", model.config))
    vocab = id_only_vocabulary(geometry.vocab_size, geometry.bos_id, geometry.eos_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # a killed run leaves no half-written GGUF at `path`
    writer = gguf.GGUFWriter(partial, ARCH)
    _metadata(writer, geometry, vocab)
    for name, array in decoder_tensors(model, geometry):
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(path)
    log.info("wrote %s (%d layers, f32)", path, geometry.num_layers)
    return geometry


def export_checkpoint(checkpoint: Path, path: Path) -> DecoderGeometry:
    """The llava-hf checkpoint directory's decoder as an f32 GGUF (`write_gguf`)."""
    from models import load_llava

    model, _ = load_llava(checkpoint)
    return write_gguf(model, path)
