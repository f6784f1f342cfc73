"""The torch-free runtime against the reference, and its handling of bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CM
from PIL import Image

import buildformat
from buildformat import ManifestError
from coreMatching import CoreMatchingLlava
from models import load_llava
from models.answer import build_prompt
from runtime import GenerationError, Pipeline, PromptError, Sampling
from runtime.chat import ChatTemplate
from runtime.ort_sessions import ProviderError, choose_providers
from runtime.pipeline import GenerationTrace, Prompt, Timings
from runtime.text import PromptTokenizer

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "shapes_red_circle.png"
DEMO = REPO / "runtime" / "demo.py"


def reference_tokens(model_dir: Path, mode: str, image: Path, question: str, steps: int):
    model, processor = load_llava(model_dir)
    inputs = processor(
        images=Image.open(image).convert("RGB"), text=build_prompt(processor, question), return_tensors="pt"
    )
    if mode == "dense":
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        return out[0, inputs["input_ids"].shape[1] :].tolist(), None
    reference = CoreMatchingLlava(model, CM)
    result = reference.generate(inputs["input_ids"], inputs["pixel_values"], steps, stop_at_eos=False)
    return result.tokens, result.kept_image_tokens


@pytest.mark.parametrize("mode", ["dense", "cm"])
@pytest.mark.parametrize("name", ["llama-gqa", "mistral-gqa"])
def test_runtime_tokens_equal_the_reference(built, checkpoint, name, mode):
    pipeline = Pipeline.load(built(name, mode).out, provider="cpu")
    for question in ("What colour is the circle?", "Is there a square on the left?"):
        answer = pipeline.answer(EXAMPLE, question, max_new_tokens=32, stop_at_eos=False)
        tokens, kept = reference_tokens(checkpoint(name), mode, EXAMPLE, question, 32)
        assert answer.token_ids == tokens
        assert answer.kept_image_tokens == kept
        assert len(answer.timings.decode) == 31 and answer.timings.prefill > 0


def test_stream_pieces_make_the_answer(built):
    pipeline = Pipeline.load(built("llama-gqa", "cm").out, provider="cpu")
    stream = pipeline.stream(EXAMPLE, "What is it?", max_new_tokens=20, stop_at_eos=False)
    pieces = []
    while True:
        try:
            pieces.append(next(stream)[1])
        except StopIteration as done:
            answer = done.value  # the generator returns the finished answer
            break
    assert "".join(pieces).rstrip() == answer.text  # the stream starts where the answer does
    assert len(answer.token_ids) == 20 and len(answer.timings.decode_graph) == 19
    assert pipeline.answer(EXAMPLE, "What is it?", max_new_tokens=20, stop_at_eos=False).token_ids == answer.token_ids


def test_the_trace_records_what_each_token_was_chosen_from(built):
    """The generation loop's trace (what validation compares): one logits row per token, row 0 the
    prefill's, the greedy token each row's first maximum; the request's cache is freed at the end."""
    pipeline = Pipeline.load(built("llama", "cm").out, provider="cpu")
    trace = GenerationTrace()
    prompt = pipeline.prepare(EXAMPLE, "What colour is the circle?", 8)
    answer = pipeline.run(prompt, stop_at_eos=False, trace=trace)
    assert trace.tokens == answer.token_ids and len(trace.tokens) == 8
    logits = trace.step_logits
    assert logits.shape == (8, pipeline.manifest.model.vocab_size) and logits.dtype == np.float32
    assert np.argmax(logits, axis=1).tolist() == answer.token_ids
    np.testing.assert_array_equal(logits[0], trace.prefill.logits)
    assert trace.kept_image_tokens == answer.kept_image_tokens and len(trace.kept_image_tokens) == 5
    assert set(trace.core_neurons) == set(range(*pipeline.manifest.corematching.neuron_layers))
    assert trace.image_features.shape == (16, pipeline.manifest.model.hidden_size)
    assert pipeline.backend._state is None and not pipeline.backend._buffers  # end_request ran
    again = pipeline.run(prompt, stop_at_eos=False)  # no trace: the same answer
    assert again.token_ids == answer.token_ids


def test_the_prompt_builder_says_where_the_image_goes(built):
    """`encode` gives the image's position from the text it tokenized, equal to where the ids hold it,
    whether the template puts the image before the question or after it."""
    pipeline = Pipeline.load(built("llama", "cm").out, provider="cpu")
    image_id = pipeline.manifest.model.image_token_id
    for question in ("What?", "Is {x} <b> café 🐱 left of the square?"):
        encoded, room = pipeline.encode(question, None)
        first = int(np.flatnonzero(encoded.input_ids[0] == image_id)[0])
        assert encoded.image_start == first and room == pipeline.max_sequence - encoded.prompt_tokens
        assert pipeline.with_image(EXAMPLE, encoded, 4).image_start == first
    base = pipeline.tokenizer
    # A template that renders the image after the question.
    template = ChatTemplate(
        "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] if c['type'] == 'text' %}"
        "{{ c['text'] }}{% endfor %}{% for c in m['content'] if c['type'] == 'image' %}\n<image>{% endfor %} "
        "{% endfor %}ASSISTANT:"
    )
    after = PromptTokenizer(base.tokenizer, template, "<image>", image_id, 16, 64, [2])
    for question in ("What?", "Which shape is red?"):
        encoded = after.encode(question)
        assert encoded.image_start == int(np.flatnonzero(encoded.input_ids[0] == image_id)[0]) > 3
    with pytest.raises(ValueError, match="outside"):
        Prompt(
            pixel_values=np.zeros((1, 3, 8, 8), np.float32),
            input_ids=encoded.input_ids,
            image_start=99,
            max_new_tokens=1,
        )


def test_timings_json_is_the_answers_timings_object():
    measured = Timings(0.1, 0.2, 0.3, (0.01, 0.02), (0.005, 0.01))
    assert measured.to_json() == {
        "preprocess": 0.1,
        "vision": 0.2,
        "prefill": 0.3,
        "decode": [0.01, 0.02],
        "decode_graph": [0.005, 0.01],
    }
    assert "decode_graph" not in Timings(0.1, 0.2, 0.3, (0.01,)).to_json()  # only where measured
    with pytest.raises(ValueError, match="negative"):
        Timings(0.1, -0.2, 0.3)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "portable"])
def test_decode_reuses_the_bound_cache_and_compacted_weights(built, monkeypatch, fused):
    from runtime.ort_backend import OrtBackend

    out = built("llama", "cm").out
    manifest = buildformat.read(out)
    pipeline = Pipeline(out, manifest, OrtBackend(out, manifest, provider="cpu", fused=fused))
    backend = pipeline.backend
    assert backend.fused == fused and bool(manifest.fused)
    host: list[str] = []  # bound from numpy arrays (the cache buffers, the step's ids and positions)
    values: list[str] = []  # bound as OrtValues (the features, the FFN weights, the masked prefill pasts)
    for stack in ("lower", "upper"):
        session = backend.sessions[stack]

        def counting_binding(original=session.io_binding):
            binding = original()
            bind_host, bind_value = binding.bind_cpu_input, binding.bind_ortvalue_input
            binding.bind_cpu_input = lambda name, value: host.append(name) or bind_host(name, value)
            binding.bind_ortvalue_input = lambda name, value: values.append(name) or bind_value(name, value)
            return binding

        monkeypatch.setattr(session, "io_binding", counting_binding)
    tokens = pipeline.stream(EXAMPLE, "What colour is the circle?", max_new_tokens=6, stop_at_eos=False)
    next(tokens), next(tokens)  # prefill and one decode step
    pointers = {key: buffer.ctypes.data for key, buffer in backend._buffers.items()}
    lengths = dict(backend._state.lengths)
    next(tokens)  # one more decode step
    assert {key: buffer.ctypes.data for key, buffer in backend._buffers.items()} == pointers  # written in place
    assert all(backend._state.lengths[key] == lengths[key] + 1 for key in lengths)
    for _ in tokens:
        pass
    assert backend._state is None and not backend._buffers  # the answer's end frees the request's cache
    # Each bound FFN input is bound twice per request: the full weight for the prefill, the compacted one for
    # every decode step.
    ffn = [name for name in values if name.startswith("ffn.")]
    assert len(set(ffn)) == 3 * len(range(*pipeline.manifest.corematching.neuron_layers))
    assert all(ffn.count(name) == 2 for name in ffn)
    # Once per request, not per step: the fused prefill binds the same buffers again (it writes the prompt's
    # entries into them); the portable one runs on a masked one-slot buffer and its outputs are copied in.
    per_request = 2 if fused else 1
    assert host.count("past.0.key") == per_request and host.count("past.3.key") == per_request
    assert values.count("past.0.key") == (0 if fused else 1)


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(built):
    pipeline = Pipeline.load(built("llama", "cm").out, provider="cpu")
    greedy = pipeline.answer(EXAMPLE, "What?", 12, stop_at_eos=False).token_ids
    one = pipeline.answer(EXAMPLE, "What?", 12, Sampling(temperature=1.5, seed=3), stop_at_eos=False).token_ids
    again = pipeline.answer(EXAMPLE, "What?", 12, Sampling(temperature=1.5, seed=3), stop_at_eos=False).token_ids
    other = pipeline.answer(EXAMPLE, "What?", 12, Sampling(temperature=1.5, seed=4), stop_at_eos=False).token_ids
    assert one == again and one != other
    nucleus = pipeline.answer(EXAMPLE, "What?", 12, Sampling(temperature=1.0, top_p=1e-6, seed=0), stop_at_eos=False)
    assert nucleus.token_ids == greedy


def test_stops_at_end_of_sequence(built, monkeypatch):
    pipeline = Pipeline.load(built("llama", "cm").out, provider="cpu")
    first = pipeline.answer(EXAMPLE, "What colour?", 16, stop_at_eos=False).token_ids
    stop = next(i for i in range(1, len(first)) if first[i] not in first[:i])  # a token new at step i
    monkeypatch.setattr(type(pipeline.tokenizer), "eos_token_ids", property(lambda self: (first[stop],)))
    assert pipeline.answer(EXAMPLE, "What colour?", 16).token_ids == first[: stop + 1]


def test_runtime_and_demo_import_no_torch(built):
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['demo', '--build', {str(built('llama', 'cm').out)!r}, '--image', {str(EXAMPLE)!r}, "
        "'--question', 'What?', '--max-new-tokens', '3', '--provider', 'cpu', '--json']\n"
        f"try:\n    runpy.run_path({str(DEMO)!r}, run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules, code, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert done.stderr.strip().splitlines()[-1] == "False False 0", done.stderr
    assert len(json.loads(done.stdout)["token_ids"]) == 3


def test_providers():
    build = Path("/b")
    assert choose_providers("cpu", ["CPUExecutionProvider"], build, False) == (["CPUExecutionProvider"], [])
    providers, warnings = choose_providers("auto", ["CPUExecutionProvider"], build, False)
    assert providers == ["CPUExecutionProvider"] and "using the CPU" in warnings[0]
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    providers, warnings = choose_providers("auto", gpu, build, True)
    assert providers[0][0] == "TensorrtExecutionProvider" and providers[1:] == gpu[1:] and not warnings
    assert providers[0][1]["trt_engine_cache_path"] == "/b/trt_cache" and providers[0][1]["trt_fp16_enable"]
    assert choose_providers("cuda", gpu, build, False)[0] == gpu[1:]
    with pytest.raises(ProviderError, match="'cuda' is not available"):
        choose_providers("cuda", ["CPUExecutionProvider"], build, False)


def test_pipeline_refuses_a_tampered_or_newer_build(built, tmp_path):
    good = built("llama", "cm").out
    tampered = tmp_path / "tampered"
    shutil.copytree(good, tampered)
    (tampered / "tokenizer.json").write_text((tampered / "tokenizer.json").read_text().replace("circle", "circlf"))
    with pytest.raises(ManifestError, match=r"tokenizer\.json does not match its sha256"):
        Pipeline.load(tampered)
    newer = tmp_path / "newer"
    shutil.copytree(good, newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    manifest["format_version"] = 99
    (newer / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="newer than this tool"):
        Pipeline.load(newer)


def test_generation_limits(built):
    pipeline = Pipeline.load(built("llama", "cm").out, provider="cpu")
    with pytest.raises(GenerationError, match="beyond the cache"):
        pipeline.answer(EXAMPLE, "What?", max_new_tokens=200)
    with pytest.raises(PromptError, match="longer than"):
        pipeline.answer(EXAMPLE, "why " * 80, max_new_tokens=2)


# -- demo.py: one line and exit 2 for every user mistake ----------------------------------------


def demo(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DEMO), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def bad_images(tmp_path: Path) -> dict[str, Path]:
    paths = {"missing": tmp_path / "missing.png", "empty": tmp_path / "empty.png", "text": tmp_path / "notes.png"}
    paths["empty"].write_bytes(b"")
    paths["text"].write_text("not an image")
    data = EXAMPLE.read_bytes()
    paths["truncated"] = tmp_path / "truncated.png"
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["bomb"] = tmp_path / "bomb.png"
    Image.new("1", (12_000, 12_000)).save(paths["bomb"])  # 144 M pixels, a few KB on disk
    return paths


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "does not exist"),
        ("empty", "empty"),
        ("text", "not"),
        ("truncated", "truncated"),
        ("bomb", "pixels"),
    ],
)
def test_demo_bad_images(built, tmp_path, kind, message):
    image = bad_images(tmp_path)[kind]
    done = demo(
        "--build", str(built("llama", "cm").out), "--image", str(image), "--question", "What?", "--provider", "cpu"
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0].lower(), done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--question", "   "], "question is empty"),
        (["--question", "why " * 80], "longer than"),
        (["--max-new-tokens", "500"], "beyond the cache"),
        (["--provider", "cuda"], "'cuda' is not available"),
        (["--temperature", "-1"], "temperature"),
    ],
)
def test_demo_bad_settings(built, extra, message):
    args = ["--build", str(built("llama", "cm").out), "--image", str(EXAMPLE), "--question", "What?", *extra]
    done = demo(*args)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], done.stderr
    assert "Traceback" not in done.stderr


def test_demo_refuses_a_missing_or_tampered_build(built, tmp_path):
    done = demo("--build", str(tmp_path / "nothing"), "--image", str(EXAMPLE), "--question", "What?")
    assert done.returncode == 2 and "does not exist" in done.stderr and "Traceback" not in done.stderr
    tampered = tmp_path / "t"
    shutil.copytree(built("llama", "cm").out, tampered)
    data = bytearray((tampered / "lower.onnx").read_bytes())
    data[-3] ^= 1
    (tampered / "lower.onnx").write_bytes(bytes(data))
    done = demo("--build", str(tampered), "--image", str(EXAMPLE), "--question", "What?")
    assert done.returncode == 2 and "sha256" in done.stderr and "Traceback" not in done.stderr


def test_demo_auto_provider_falls_back_with_a_warning(built):
    done = demo(
        "--build",
        str(built("llama", "cm").out),
        "--image",
        str(EXAMPLE),
        "--question",
        "What?",
        "--max-new-tokens",
        "4",
    )
    assert done.returncode == 0, done.stderr
    assert "warning: no GPU execution provider" in done.stderr
    assert "kept 5 of 16 image tokens" in done.stdout and "tokens/s" in done.stdout


def test_demo_core_tokens_picture_and_force(built, tmp_path):
    picture = tmp_path / "core.png"
    args = [
        "--build",
        str(built("llama", "cm").out),
        "--image",
        str(EXAMPLE),
        "--question",
        "What?",
        "--max-new-tokens",
        "2",
        "--core-tokens",
        str(picture),
        "--json",
    ]
    assert demo(*args).returncode == 0
    image = np.asarray(Image.open(picture))
    assert image.shape == (56, 56, 3)
    done = demo(*args)
    assert done.returncode == 2 and "already exists; pass --force" in done.stderr
    assert demo(*args, "--force").returncode == 0


def test_demo_interactive_loop_until_empty_line(built):
    done = subprocess.run(
        [
            sys.executable,
            str(DEMO),
            "--build",
            str(built("llama", "cm").out),
            "--max-new-tokens",
            "3",
            "--provider",
            "cpu",
        ],
        input=f"{EXAMPLE}\nWhat colour?\n{EXAMPLE}\nAnd the shape?\n\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("kept 5 of 16 image tokens") == 2


def test_device_cache_path_gives_the_same_tokens(built, monkeypatch):
    """The GPU provider's path (device buffers bound by pointer, one strided copy per tensor and step),
    run on host memory: a fake cudart allocates real host blocks, which ONNX Runtime's CPU provider
    reads and writes through the same pointer bindings. Its tokens are the fused form's."""
    from test_trt_backend import FakeCudart

    from runtime import cuda_memory

    out = built("llama-gqa", "cm").out
    expected = Pipeline.load(out, provider="cpu").answer(EXAMPLE, "What?", 10, stop_at_eos=False).token_ids
    fake = FakeCudart()
    monkeypatch.setattr(cuda_memory, "_CUDART", fake)
    from runtime.ort_backend import OrtBackend

    manifest = buildformat.read(out)
    # A GPU provider reads the portable form (the fused one writes its cache in place on the host).
    pipeline = Pipeline(out, manifest, OrtBackend(out, manifest, provider="cpu", fused=False))
    pipeline.backend._cuda, pipeline.backend._device_type = cuda_memory, "cpu"
    copies = []
    original = cuda_memory.memcpy2d
    monkeypatch.setattr(cuda_memory, "memcpy2d", lambda *a, **k: copies.append(a[2]) or original(*a, **k))
    assert pipeline.answer(EXAMPLE, "What?", 10, stop_at_eos=False).token_ids == expected
    layers = pipeline.manifest.model.num_layers
    # One 2-D copy per cache tensor for the prompt, then one per tensor and decode step; no host cache.
    assert len(copies) == (1 + 9) * 2 * layers
    assert all(plan.height == pipeline.manifest.model.num_kv_heads for plan in copies)
    # The device cache was the only copy, and the answer's end freed it (nothing left allocated).
    assert pipeline.backend._buffers == {} and fake.blocks == {}
