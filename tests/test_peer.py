"""The llama.cpp comparison (bench/peer/) without llama.cpp: the GGUF's layout (a numpy forward of the written
file against the HF model), the configuration's checks, llama-bench's JSON, the report and the CLI's errors.
The last tests need a llama.cpp build (LLAMA_CPP_DIR: its bin directory) and are skipped without one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.__main__ import main
from bench.peer import gguf_export
from bench.peer.check import Agreement, LlamaCppMismatch, LogitsCheck, check_token_ids, compare, reference_logits
from bench.peer.config import PeerConfig
from bench.peer.footprint import gguf_step_weight_bytes, llama_cpp_kv_bytes
from bench.peer.gguf_export import GgufExportError, permute_rope_rows, write_gguf
from bench.peer.gguf_forward import GgufModel, forward
from bench.peer.llama_timing import time_gguf
from bench.peer.llamacpp import LlamaCppError, LlamaCppNotFound, LlamaCppTools, parse_bench_json
from bench.peer.records import PeerReport, PeerRow
from bench.peer.report import markdown, targets
from bench.peer.vocab import BYTE, CONTROL, VocabError, id_only_vocabulary
from bench.records import Machine, Versions
from models.presets import build_random_model

REPO = Path(__file__).resolve().parent.parent
LLAMA_CPP_DIR = os.environ.get("LLAMA_CPP_DIR")
needs_llama_cpp = pytest.mark.skipif(
    not LLAMA_CPP_DIR, reason="set LLAMA_CPP_DIR to a llama.cpp build's bin directory to run llama.cpp itself"
)

# What `llama-bench -o json` printed for a tiny model (llama.cpp b1, 0c1e570), fields it does not vary trimmed.
BENCH_JSON = """[
  {
    "build_commit": "0c1e570",
    "build_number": 1,
    "cpu_info": "Intel(R) Xeon(R) Processor",
    "backends": "CPU",
    "model_filename": "tiny-llama.Q4_0.gguf",
    "model_type": "llama ?B Q4_0",
    "model_size": 120640,
    "model_n_params": 214016,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "type_k": "f16",
    "type_v": "f16",
    "n_prompt": 16,
    "n_gen": 0,
    "n_depth": 0,
    "test_time": "2026-10-01T22:30:00Z",
    "avg_ns": 1000000,
    "stddev_ns": 100000,
    "avg_ts": 16000.0,
    "stddev_ts": 1600.0,
    "samples_ns": [ 900000, 1100000, 1000000 ],
    "samples_ts": [ 17777.8, 14545.5, 16000.0 ]
  },
  {
    "build_commit": "0c1e570",
    "build_number": 1,
    "n_threads": 2,
    "type_k": "f16",
    "type_v": "f16",
    "n_prompt": 16,
    "n_gen": 3,
    "n_depth": 0,
    "samples_ns": [ 2000000, 2200000, 2100000 ]
  }
]
"""


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-llama-gqa"])
def tiny_gguf(request, tmp_path_factory):
    """(HF model, the f32 GGUF of its decoder)."""
    model = build_random_model(request.param, seed=0)
    path = tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf"
    write_gguf(model, path)
    return model, path


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(input_ids=torch.tensor(ids)[None]).logits[0].double().numpy()


IDS = np.array([1, 17, 203, 9, 100, 13, 42, 8, 200, 31])


def test_gguf_forward_matches_the_hf_model(tiny_gguf):
    model, path = tiny_gguf
    ours, hf = forward(GgufModel.read(path), IDS), _hf_logits(model, IDS)
    assert ours.shape == hf.shape == (len(IDS), model.config.text_config.vocab_size)
    assert np.abs(ours - hf).max() < 1e-5 * np.abs(hf).max()


def test_unpermuted_qk_would_be_caught(tiny_gguf, tmp_path, monkeypatch):
    """The forward check is sensitive to the rope layout: without the q/k permutation the logits move by
    orders of magnitude more than the float error (random weights attend almost uniformly, so not far: ~1%)."""
    model, path = tiny_gguf
    hf = _hf_logits(model, IDS)
    error = np.abs(forward(GgufModel.read(path), IDS) - hf).max()
    monkeypatch.setattr(gguf_export, "permute_rope_rows", lambda weight, heads: weight)
    write_gguf(model, tmp_path / "unpermuted.gguf")
    unpermuted = np.abs(forward(GgufModel.read(tmp_path / "unpermuted.gguf"), IDS) - hf).max()
    assert unpermuted > 1e-3 * np.abs(hf).max() and unpermuted > 1000 * error


def test_gguf_metadata_tensors_and_vocabulary(tiny_gguf):
    import gguf

    model, path = tiny_gguf
    text = model.config.text_config
    reader = gguf.GGUFReader(path)

    def value(key: str):
        return reader.fields[key].contents()

    assert value("general.architecture") == "llama"
    assert value("llama.block_count") == text.num_hidden_layers
    assert value("llama.attention.head_count_kv") == text.num_key_value_heads
    assert value("llama.rope.dimension_count") == text.hidden_size // text.num_attention_heads
    assert value("llama.rope.freq_base") == pytest.approx(text.rope_parameters["rope_theta"])
    assert value("general.file_type") == gguf.LlamaFileType.ALL_F32
    assert value("tokenizer.ggml.model") == "llama"
    tokens, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == text.vocab_size == len(set(tokens))
    assert tokens[text.bos_token_id] == "<s>" and types[text.bos_token_id] == CONTROL
    assert types[tokens.index("<0x0A>")] == BYTE
    names = [t.name for t in reader.tensors]
    assert len(names) == 3 + 9 * text.num_hidden_layers
    assert names[0] == "token_embd.weight" and names[-1] == "output.weight"
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}


def test_permute_rope_rows_interleaves_each_heads_halves():
    heads, head_dim = 2, 4
    rows = np.arange(heads * head_dim, dtype=np.float32)[:, None]  # row i holds i
    # HF head 0: [0 1 | 2 3] (dim i pairs with i + 2) -> llama.cpp pairs adjacent rows: 0 2 1 3
    assert permute_rope_rows(rows, heads)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_step_bytes_of_a_gguf(tiny_gguf):
    model, path = tiny_gguf
    text = model.config.text_config
    parameters = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    embedding_rows = (text.vocab_size - 1) * text.hidden_size  # a step reads one row of the table
    assert gguf_step_weight_bytes(path) == 4 * (parameters - embedding_rows)
    assert llama_cpp_kv_bytes(2, 64, 10, "f16", "f16") == 2 * 2 * 10 * 64 * 2
    assert llama_cpp_kv_bytes(1, 64, 1, "q8_0", "f32") == 2 * 34 + 64 * 4


def test_export_refuses_what_it_cannot_write():
    model = build_random_model("tiny-llama", seed=0)
    text = model.config.text_config
    text.hidden_act = "gelu"
    with pytest.raises(GgufExportError, match="SwiGLU"):
        gguf_export.DecoderGeometry.from_text_config(text)


def test_vocabulary_needs_room_and_distinct_specials():
    assert id_only_vocabulary(300).tokens[:4] == ("<unk>", "<s>", "</s>", "<0x00>")
    with pytest.raises(VocabError, match="no room"):
        id_only_vocabulary(2)
    with pytest.raises(VocabError, match="different"):
        id_only_vocabulary(300, bos_id=1, eos_id=1)
    with pytest.raises(VocabError, match="<0x0A>"):
        id_only_vocabulary(10)  # 3 specials and 7 bytes: no newline


# -- configuration and tools ----------------------------------------------------------------------


@pytest.fixture
def fake_tools(tmp_path) -> Path:
    """A directory with (empty) llama-bench and llama-quantize: enough for the configuration's checks."""
    for tool in ("llama-bench", "llama-quantize"):
        (tmp_path / tool).write_text("")
    return tmp_path


def test_config_checks_the_llama_cpp_directory(tmp_path, fake_tools):
    with pytest.raises(LlamaCppNotFound, match="no such directory"):
        PeerConfig(llama_cpp=tmp_path / "missing")
    (fake_tools / "llama-quantize").unlink()
    with pytest.raises(LlamaCppNotFound, match="no llama-quantize"):
        PeerConfig(llama_cpp=fake_tools)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"repeats": 0}, "repeats"),
        ({"new_tokens": (1, 16)}, "new_tokens"),
        ({"new_tokens": (128, 16)}, "new_tokens"),
        ({"quants": ("Q5_K", "Q4_0")}, "quants"),
        ({"quants": ("Q8_0",)}, "Q4_0"),
        ({"threads": 0}, "threads"),
        ({"token_budget": True}, "token_budget"),
    ],
)
def test_config_validation(fake_tools, changes, message):
    PeerConfig(llama_cpp=fake_tools)  # the defaults are valid
    with pytest.raises(ValueError, match=message):
        PeerConfig(llama_cpp=fake_tools, **changes)


def test_parse_llama_bench_json():
    first, second = parse_bench_json("load_backend: loaded CPU backend\n" + BENCH_JSON)
    assert (first.n_prompt, first.n_gen, first.n_depth, first.n_threads) == (16, 0, 0, 2)
    assert first.seconds == (0.0009, 0.0011, 0.001) and first.model_type == "llama ?B Q4_0"
    assert (second.n_gen, second.type_k, second.build_commit) == (3, "f16", "0c1e570")
    with pytest.raises(LlamaCppError, match="no readable JSON"):
        parse_bench_json("[ {")
    with pytest.raises(LlamaCppError, match="no tests"):
        parse_bench_json("[]")
    with pytest.raises(LlamaCppError, match="samples_ns"):
        parse_bench_json('[{"n_prompt": 1, "n_gen": 0, "n_threads": 2}]')


def test_time_gguf_picks_each_test_and_takes_medians(fake_tools, monkeypatch):
    """The llama-bench flags for each figure and which of its results feed it (a fake llama-bench)."""
    calls = []

    def fake_run(self, model, args, repeats, threads):
        calls.append(args)
        if "-d" in args:  # 16 steps at depth 20: 16 ms, 32 ms, 16 ms
            tests = [{"n_prompt": 0, "n_gen": 16, "n_depth": 20, "samples_ns": [16e6, 32e6, 16e6]}]
        else:
            tests = [
                {"n_prompt": 20, "n_gen": 0, "samples_ns": [5e6, 6e6, 7e6]},
                {"n_prompt": 20, "n_gen": 1, "samples_ns": [9e6, 8e6, 7e6]},
                {"n_prompt": 20, "n_gen": 3, "samples_ns": [9e6, 9e6, 9e6]},
            ]
        body = [{"n_threads": threads, "n_depth": 0, "build_number": 1, "build_commit": "abc", **t} for t in tests]
        return parse_bench_json(json.dumps(body))

    monkeypatch.setattr(LlamaCppTools, "run_bench", fake_run)
    times = time_gguf(LlamaCppTools(fake_tools), Path("m.gguf"), 20, (2, 4), repeats=3, threads=2)
    assert calls == [["-p", "20", "-n", "0", "-pg", "20,1", "-pg", "20,3"], ["-p", "0", "-n", "16", "-d", "20"]]
    assert times.prefill == pytest.approx(6e-3) and times.decode_step == pytest.approx(1e-3)
    assert times.end_to_end == pytest.approx((8e-3, 9e-3)) and times.build == "b1 (abc)"


# -- the correctness comparison and the report ------------------------------------------------------


def test_compare_bounds_f32_tightly_and_quantized_loosely():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(2, 50))  # range ~5
    ids = [1, 5, 6]
    assert compare("f32", reference + 1e-3, reference, ids, 2).passed
    assert not compare("f32", reference + 0.05, reference, ids, 2).passed  # 0.05 > 2e-3 of the logits' range
    rounded = reference + 0.3 * rng.normal(size=reference.shape)  # the float model, weights rounded
    llama = rounded + 0.01 * rng.normal(size=reference.shape)  # llama.cpp on the rounded weights
    check = compare("Q4_0", llama, reference, ids, 2, dequantized=rounded)
    assert check.passed and check.vs_dequantized is not None and check.vs_dequantized.min_correlation > 0.999
    assert not compare("Q4_0", llama + 0.2 * rng.normal(size=reference.shape), reference, ids, 2, rounded).passed
    assert not compare("Q4_0", rng.normal(size=reference.shape), reference, ids, 2, rounded).passed
    with pytest.raises(ValueError, match="dequantized"):
        compare("Q8_0", llama, reference, ids, 2)
    with pytest.raises(LlamaCppMismatch, match="logits"):
        compare("f32", reference[:1], reference, ids, 2)


def test_dequantized_forward_reads_a_quantized_gguf(tiny_gguf, tmp_path):
    """A Q8_0 GGUF (written with gguf's own quantizer, as llama-quantize lays it out) runs in the numpy forward."""
    import gguf
    from gguf.quants import quantize

    from bench.peer.check import dequantized_logits

    model, path = tiny_gguf
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(tmp_path / "q8.gguf", "llama")
    for field in reader.fields.values():
        if field.name.startswith(("llama.", "tokenizer.")) and field.types:
            kind = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else field.types[0]
            sub = kind if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        data = np.asarray(t.data)
        if data.ndim == 2:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(t.name, quantize(data, q8), raw_shape=quantize(data, q8).shape, raw_dtype=q8)
        else:
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ids = [1, 17, 203, 9, 100]
    rounded = dequantized_logits(tmp_path / "q8.gguf", ids, 4)
    exact = _hf_logits(model, np.array(ids))[3:]
    assert rounded.shape == exact.shape and 0 < np.abs(rounded - exact).max() < 0.05 * np.ptp(exact)


def test_reference_logits_are_the_probes_positions():
    model = build_random_model("tiny-llama", seed=0)
    ids = check_token_ids(256, [255], bos_id=1, count=9)
    assert ids[0] == 1 and 255 not in ids and len(set(ids)) == 9
    logits = reference_logits(model, ids, prompt_ids=8)
    full = _hf_logits(model, np.array(ids))
    assert logits.shape == (2, 256) and np.allclose(logits, full[7:], atol=1e-5)


def _row(name: str, engine: str, weights: str, step: float, ends: tuple[float, float]) -> PeerRow:
    return PeerRow(
        name=name,
        engine=engine,
        weights=weights,
        correct=True,
        vision_ms=None if engine == "llama.cpp" else 50.0,
        prefill_ms=1000.0,
        decode_step_ms=step,
        end_to_end_ms=ends,
        decode_step_samples_ms=(step,),
        step_weight_bytes=10**8,
        step_kv_bytes=10**6,
        floor_ms=step / 1.2,
        step_over_floor=1.2,
    )


def _report(rows: tuple[PeerRow, ...]) -> PeerReport:
    check = LogitsCheck(
        "f32", (1, 2, 3), 2, 2, Agreement(1e-4, 1.0, 1.0, 2), None, "max abs diff <= 2e-3 x range", True
    )
    return PeerReport(
        command="python -m bench --llama-cpp bin --peer-only",
        machine=Machine("cpu", 2, 2**34, "3.12", "Linux", Versions("1.2", "2.0", "5.23", "2.0")),
        llama_cpp_build="b1 (abc)",
        preset="llava-7b-shape",
        prompt_tokens=623,
        threads=2,
        repeats=3,
        new_tokens=(16, 128),
        kv_cache_llama_cpp="f16/f16",
        bandwidth_bytes_per_s=1e10,
        checks=(check,),
        rows=rows,
        targets=targets(rows, (16, 128), "ours dense fp32", "ours dense int4", "ours k int4"),
    )


ROWS = (
    _row("llama.cpp f32", "llama.cpp", "f32", 100.0, (3000.0, 15000.0)),
    _row("llama.cpp Q4_0", "llama.cpp", "Q4_0", 40.0, (2000.0, 7000.0)),
    _row("ours dense fp32", "onnxruntime", "fp32", 90.0, (3500.0, 14000.0)),
    _row("ours dense int4", "onnxruntime", "int4", 50.0, (2500.0, 9000.0)),
    _row("ours k int4", "onnxruntime", "int4", 20.0, (500.0, 4000.0)),
)


def test_targets_and_report():
    report = _report(ROWS)
    met = {t.target: t.met for t in report.targets}
    assert met["ours dense fp32 step / llama.cpp f32 step"]  # 0.9x
    assert not met["ours dense int4 step / llama.cpp Q4_0 step"]  # 1.25x
    assert met["ours k int4 step / llama.cpp Q4_0 step"]  # 0.5x
    assert met["llama.cpp Q4_0 end to end / ours k int4, 16 new tokens"]  # 4x
    assert not met["llama.cpp Q4_0 end to end / ours k int4, 128 new tokens"]  # 1.75x
    assert sum("its floor" in t for t in met) == len(ROWS)
    text = markdown(report)
    assert "| ours dense int4 | int4 | yes | 50.0 |" in text and "1.25x" in text
    assert "## Building llama.cpp for the comparison" in text
    tables = [line for line in text.splitlines() if line.startswith("|")]
    widths = {line.count("|") for line in tables}
    assert len(widths) == 3  # the rows, the targets and the checks tables: no stray "|" inside a cell
    assert "| ours dense fp32 step / llama.cpp f32 step | 0.90x | <= 1.00x | yes |" in text
    assert "| llama.cpp Q4_0 end to end / ours k int4, 128 new tokens | 1.75x | >= 2.00x | **no** |" in text
    for word in ("farm", "library", "helper"):  # the docs name no tool of the place they were written in
        assert word not in text.lower()
    data = json.loads(json.dumps(asdict(report)))
    assert data["rows"][0]["vision_ms"] is None and data["new_tokens"] == [16, 128]


def test_report_refuses_a_failed_check_and_mismatched_rows():
    with pytest.raises(ValueError, match="vision_ms"):
        replace(ROWS[0], vision_ms=10.0)
    with pytest.raises(ValueError, match="end-to-end"):
        replace(_report(ROWS), rows=(*ROWS[:-1], replace(ROWS[-1], end_to_end_ms=(1.0,))))
    failed = replace(_report(ROWS).checks[0], passed=False)
    with pytest.raises(ValueError, match="check failed"):
        replace(_report(ROWS), checks=(failed,))


# -- the command line ---------------------------------------------------------------------------------


def test_cli_missing_llama_cpp_directory_is_one_error_line(tmp_path, capsys):
    assert main(["--llama-cpp", str(tmp_path / "nowhere"), "--peer-only", "--work", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --llama-cpp") and "no such directory" in err and len(err.splitlines()) == 1
    assert main(["--llama-cpp", str(tmp_path), "--peer-only", "--work", str(tmp_path)]) == 2
    assert "no llama-bench or llama-quantize" in capsys.readouterr().err
    assert main(["--peer-only"]) == 2
    assert capsys.readouterr().err.strip() == "error: --peer-only needs --llama-cpp DIR"


def test_cli_error_as_a_subprocess(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--llama-cpp", str(tmp_path / "nowhere"), "--peer-only"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error:") and "Traceback" not in done.stderr


# -- llama.cpp itself -----------------------------------------------------------------------------------


@pytest.mark.llama_cpp
@needs_llama_cpp
def test_llama_cpp_agrees_with_pytorch_on_the_gguf(tiny_gguf, tmp_path):
    from bench.peer.check import build_probe, check_gguf

    model, path = tiny_gguf
    bin_dir = Path(LLAMA_CPP_DIR or "")
    tools = LlamaCppTools(bin_dir)
    probe = build_probe(bin_dir, tmp_path / "llama-logits")
    ids = check_token_ids(model.config.text_config.vocab_size, [model.config.image_token_id], bos_id=1)
    reference = reference_logits(model, ids, prompt_ids=8)
    check_gguf(probe, path, "f32", reference, ids, 8, threads=2)
    for kind in ("Q8_0", "Q4_0"):
        quantized = tools.quantize(path, tmp_path / f"{kind}.gguf", kind, threads=2)
        check_gguf(probe, quantized, kind, reference, ids, 8, threads=2)
    times = time_gguf(tools, tmp_path / "Q4_0.gguf", 24, (2, 4), repeats=1, threads=2)
    assert times.type_k == "f16" and len(times.end_to_end) == 2
