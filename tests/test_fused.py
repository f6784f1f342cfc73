"""The stacks' ONNX Runtime form (export/fused_ops.py): the contrib kernels against the custom ops' reference math,
and a fused stack against the portable one, prefill and decode, with the cache written in place."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch

from buildformat.geometry import Geometry
from export import fused_ops
from export.fused_ops import group_query_attention, key_bias, rotary_embedding
from export.modules import Decoder, embed_weight, stack_plans
from export.trace import _export, trace_stack
from models.presets import build_random_model

HEADS, KV_HEADS, HD, CAPACITY, POSITIONS = 4, 2, 16, 24, 64


class _Attention(torch.nn.Module):
    """One fused attention: optionally rotated first at gapped positions (as the upper stack is)."""

    def __init__(self, gapped: bool, bias: bool) -> None:
        super().__init__()
        self.gapped, self.bias = gapped, bias
        inv = 1.0 / (10000 ** (torch.arange(0, HD, 2).float() / HD))
        freqs = torch.arange(POSITIONS).float()[:, None] * inv[None]
        self.cos, self.sin = torch.nn.Parameter(freqs.cos()), torch.nn.Parameter(freqs.sin())

    def forward(self, q, k, v, past_k, past_v, past_length, positions, bias_past, bias_new):
        if self.gapped:
            q = rotary_embedding(q, positions, self.cos, self.sin, HEADS)
            k = rotary_embedding(k, positions, self.cos, self.sin, KV_HEADS)
        seq = q.shape[1]
        seqlens, total = (past_length + seq - 1).to(torch.int32), (past_length + seq).to(torch.int32).reshape(())
        bias = key_bias(bias_past, bias_new, total) if self.bias else None
        return group_query_attention(
            q, k, v, past_k, past_v, seqlens, total, self.cos, self.sin, positions, bias,
            HEADS, KV_HEADS, HD**-0.5, not self.gapped,
        )  # fmt: skip


NAMES = ["q", "k", "v", "past_k", "past_v", "past_length", "positions", "bias_past", "bias_new"]


@pytest.fixture(scope="module")
def attention_graphs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fused")
    graphs = {}
    for gapped, bias in ((False, False), (True, True)):
        s, b = torch.export.Dim("S", min=1, max=64), torch.export.Dim("B", min=1, max=64)
        args = (
            torch.zeros(1, 5, HEADS * HD),
            torch.zeros(1, 5, KV_HEADS * HD),
            torch.zeros(1, 5, KV_HEADS * HD),
            torch.zeros(1, KV_HEADS, 7, HD),
            torch.ones(1, KV_HEADS, 7, HD),
            torch.tensor([2]),
            torch.arange(5)[None],
            torch.zeros(7),
            torch.ones(5),
        )
        dynamic = ({1: s}, {1: s}, {1: s}, {2: b}, {2: b}, {}, {1: s}, {0: b}, {0: s})
        path = folder / f"attention-{gapped}-{bias}.onnx"
        _export(_Attention(gapped, bias), args, path, NAMES, ["out", "present_k", "present_v"], dynamic, 18,
                fused_ops.translations())  # fmt: skip
        graphs[gapped, bias] = (_Attention(gapped, bias), ort.InferenceSession(str(path)))
    return graphs


def _run_in_place(session, feeds, past_k, past_v):
    """Runs with the present outputs bound to the past buffers' memory, as the runtime does."""
    binding = session.io_binding()
    binding.bind_output("out", "cpu")
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    for name, buffer in (("past_k", past_k), ("past_v", past_v)):
        binding.bind_cpu_input(name, buffer)
        present = name.replace("past", "present")
        binding.bind_output(present, "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
    session.run_with_iobinding(binding)
    return binding.get_outputs()[0].numpy()


@pytest.mark.parametrize("gapped,bias", [(False, False), (True, True)], ids=["rotary-in-kernel", "gapped-bias"])
def test_the_contrib_kernels_match_the_reference_math_in_place(attention_graphs, gapped, bias):
    """A prompt into an empty buffer, then two single tokens, each against the buffer the previous run filled:
    the output and the written entries equal the custom op's math, and no slot past the used length changes."""
    module, session = attention_graphs[gapped, bias]
    rng = np.random.default_rng(0)
    past_k = np.zeros((1, KV_HEADS, CAPACITY, HD), np.float32)
    past_v = np.zeros_like(past_k)
    used = 0
    for seq in (9, 1, 1):
        # Gapped positions (kept tokens) where the stack takes them; a prompt at 0..S-1 otherwise.
        start = 0 if used == 0 else 20 + used
        positions = np.sort(rng.choice(40, seq, replace=False)) if gapped and used == 0 else np.arange(seq) + start
        feeds = {
            "q": rng.standard_normal((1, seq, HEADS * HD)).astype(np.float32),
            "k": rng.standard_normal((1, seq, KV_HEADS * HD)).astype(np.float32),
            "v": rng.standard_normal((1, seq, KV_HEADS * HD)).astype(np.float32),
            "past_length": np.array([used]),
            "positions": positions[None].astype(np.int64),
            "bias_past": rng.standard_normal(CAPACITY).astype(np.float32),
            "bias_new": rng.standard_normal(seq).astype(np.float32),
        }
        feeds = {name: value for name, value in feeds.items() if bias or not name.startswith("bias")}
        with torch.no_grad():
            args = {name: torch.from_numpy(value) for name, value in feeds.items()}
            args |= {"past_k": torch.from_numpy(past_k.copy()), "past_v": torch.from_numpy(past_v.copy())}
            args.setdefault("bias_past", torch.zeros(CAPACITY))
            args.setdefault("bias_new", torch.zeros(seq))
            want, want_k, want_v = module(*(args[name] for name in NAMES))
        got = _run_in_place(session, feeds, past_k, past_v)
        np.testing.assert_allclose(got, want.numpy(), atol=2e-5)
        np.testing.assert_allclose(past_k, want_k.numpy(), atol=2e-5)
        np.testing.assert_allclose(past_v, want_v.numpy(), atol=2e-5)
        assert not past_k[:, :, used + seq :].any(), "a slot past the used length was written"
        used += seq


def test_a_fused_stack_equals_the_portable_one_in_prefill_and_decode(tmp_path):
    """tiny-llama-gqa's decoder in both forms: the fused one writes its cache in place and returns the same
    logits as the portable one, whose new entries the caller writes."""
    model = build_random_model("tiny-llama-gqa")
    geometry = Geometry.from_hf_config(model.config)
    decoder = Decoder(model).eval()
    plan = stack_plans(geometry.num_layers, None)["decoder"]
    embed = embed_weight(model)
    trace_stack(decoder, plan, embed, geometry, None, tmp_path / "p.onnx", 18, torch.float32)
    fused_plan = dataclasses.replace(plan, fused=True)
    trace_stack(decoder, fused_plan, embed, geometry, None, tmp_path / "f.onnx", 18, torch.float32, POSITIONS)
    portable, fused = (ort.InferenceSession(str(tmp_path / f"{n}.onnx")) for n in ("p", "f"))
    assert any(node.op_type == "GroupQueryAttention" for node in _nodes(tmp_path / "f.onnx"))

    rng = np.random.default_rng(1)
    n_img, prompt = geometry.num_image_tokens, geometry.num_image_tokens + 6
    ids = rng.integers(0, 200, (1, prompt))
    ids[0, 2 : 2 + n_img] = model.config.image_token_id
    features = rng.standard_normal((1, n_img, geometry.hidden_size)).astype(np.float32)
    shape = (1, geometry.num_kv_heads, prompt + 4, geometry.head_dim)
    pasts = [f"past.{i}.{kind}" for i in range(geometry.num_layers) for kind in ("key", "value")]
    buffers_p = {name: np.zeros(shape, np.float32) for name in pasts}
    buffers_f = {name: np.zeros(shape, np.float32) for name in pasts}
    one_slot = {name: np.zeros((*shape[:2], 1, shape[3]), np.float32) for name in pasts}
    for step in range(4):
        length = 0 if step == 0 else prompt + step - 1
        tokens = ids if step == 0 else np.array([[7 + step]])
        feeds = {
            "input_ids": tokens,
            "image_features": features,
            "image_start": np.array([2]),
            "position_ids": np.arange(tokens.shape[1]) + length,
            "past_length": np.array([length]),
        }
        outputs = portable.run(None, feeds | (one_slot if step == 0 else buffers_p))
        out = dict(zip([o.name for o in portable.get_outputs()], outputs, strict=True))
        for name in pasts:
            new = out["new" + name[len("past") :]]
            buffers_p[name][:, :, length : length + new.shape[2]] = new
        binding = fused.io_binding()
        binding.bind_output("logits", "cpu")
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name, buffer in buffers_f.items():
            binding.bind_cpu_input(name, buffer)
            binding.bind_output("present" + name[len("past") :], "cpu", 0, np.float32, list(shape), buffer.ctypes.data)
        fused.run_with_iobinding(binding)
        np.testing.assert_allclose(binding.get_outputs()[0].numpy(), out["logits"], atol=1e-5)
        for name in pasts:
            np.testing.assert_allclose(buffers_f[name], buffers_p[name], atol=1e-5)


def _nodes(path):
    import onnx

    return onnx.load(path).graph.node


@pytest.mark.parametrize("mode", ["dense", "cm"])
def test_the_fused_form_reads_the_portable_forms_weights(built, mode):
    """weights.bin holds each weight once: the fused graphs point at the portable graphs' bytes, and only the
    rotary tables are their own."""
    manifest = built("llama-gqa", mode).manifest
    index = manifest.weights
    assert manifest.fused, "a build without attention selectors has the fused form"
    portable = {e.offset for name in manifest.graph_names for e in index.graphs[manifest.graph(name).file].values()}
    own = {
        weight
        for graph in manifest.fused.values()
        for weight, entry in index.graphs[graph.file].items()
        if entry.offset not in portable
    }
    assert own == {"cos_cache", "sin_cache"}, own
    for fused in (False, True):  # each form's graphs read each stored weight once
        files = [manifest.graph(name, fused=fused).file for name in manifest.graph_names]
        # The two fused stacks read the same rotary tables: one stored copy, one value given to both sessions.
        tables = ("cos_cache", "sin_cache")
        offsets = [e.offset for file in files for name, e in index.graphs[file].items() if name not in tables]
        offsets += [e.offset for e in index.bound.values()]
        assert len(offsets) == len(set(offsets)), fused
