"""`python -m serving.triton`: the repository it writes, and that repository on a real Triton server.

The server tests need an environment with the `triton` extra (nvidia-pytriton pins numpy < 2, so
it is not this one): `.ci/run` makes it and names its interpreter in COREMATCHING_TRITON_PYTHON;
elsewhere they are skipped with that reason.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from runtime import Pipeline
from runtime.chat import Conversation, Message
from serving.triton import TritonConfig, TritonConfigError, write_repository
from serving.triton.__main__ import main as triton_main
from serving.triton.interface import interface
from serving.triton.repository import config_pbtxt

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
QUESTIONS = [
    (EXAMPLES / "shapes_red_circle.png", "What colour is the circle?"),
    (EXAMPLES / "shapes_mixed.png", "How many squares are there?"),
]


def test_the_config_is_decoupled_batch_one_with_the_instances(tmp_path) -> None:
    text = config_pbtxt(TritonConfig(build=tmp_path, out=tmp_path / "r", instances=3, name="cm"))
    assert 'name: "cm"' in text and 'backend: "python"' in text
    assert "decoupled: true" in text and "max_batch_size: 0" in text
    assert "count: 3" in text
    for tensor in ("IMAGE", "QUESTION", "MESSAGES", "STOP", "MAX_TOKENS", "TEXT", "TOKEN_ID", "KEPT_IMAGE_TOKENS"):
        assert f'name: "{tensor}"' in text
    # One of QUESTION and MESSAGES: neither is required by Triton, the model asks for one.
    for tensor in ("QUESTION", "MESSAGES", "STOP"):
        assert re.search(rf'name: "{tensor}" data_type: TYPE_STRING dims: \[ -?1 \] optional: true', text)
    assert 'name: "STOP" data_type: TYPE_STRING dims: [ -1 ]' in text  # a list tensor, one string per element


def test_the_interface_table_names_every_input_and_output(tmp_path) -> None:
    text = config_pbtxt(TritonConfig(build=tmp_path, out=tmp_path / "r"))
    table = interface("cm")
    for tensor in re.findall(r'name: "([A-Z_]+)"', text):
        assert re.search(rf"^\| [^|]*`{tensor}`", table, re.MULTILINE), (
            f"{tensor} is not in serving/triton/interface.py's tables"
        )
    assert 'async_stream_infer("cm"' in table and "{name}" not in table
    # docs/serving/triton.md carries the same text (bench/triton/throughput.py's render writes it).
    assert interface("corematching").strip() in (REPO / "docs" / "serving" / "triton.md").read_text()


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"instances": 0}, "--instances"), ({"max_batch": 4}, "--max-batch"), ({"name": "a b"}, "--name")],
)
def test_settings_are_checked(changes, message, tmp_path) -> None:
    with pytest.raises(TritonConfigError, match=message):
        TritonConfig(build=tmp_path, out=tmp_path / "r", **changes)


def test_the_repository_holds_the_model_the_runtime_and_the_build(built, tmp_path) -> None:
    build = built("llama", "cm").out
    out = write_repository(TritonConfig(build=build, out=tmp_path / "repo", instances=2))
    version = out / "corematching" / "1"
    assert (out / "corematching" / "config.pbtxt").is_file() and (out / "README.md").is_file()
    assert (version / "model.py").is_file() and (version / "build" / "manifest.json").is_file()
    assert (version / "runtime" / "pipeline.py").is_file() and (version / "buildformat" / "manifest.py").is_file()
    assert not (version / "runtime" / "serve").exists()  # the HTTP server is not the model's business
    readme = (out / "README.md").read_text()
    assert "corematching" in readme and interface("corematching").strip() in readme and "{" + "name}" not in readme
    assert "jinja2" in readme  # the NGC container's pip line: the chat template renders with it
    # model.py imports chat_messages from beside it, and that imports the runtime copied there.
    code = (
        f"import sys; sys.path.insert(0, {str(version)!r}); import chat_messages, runtime; "
        f"assert chat_messages.__file__.startswith({str(version)!r}) and runtime.__file__.startswith({str(version)!r})"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with pytest.raises(FileExistsError, match="--force"):
        write_repository(TritonConfig(build=build, out=out))
    linked = write_repository(TritonConfig(build=build, out=out, link=True, force=True))
    assert (linked / "corematching" / "1" / "build").is_symlink()
    assert not list(tmp_path.glob(".repo.*")), "a staging directory was left behind"


def test_the_command_refuses_a_broken_build_in_one_line(tmp_path, capsys) -> None:
    (tmp_path / "build").mkdir()
    assert triton_main([str(tmp_path / "build"), "--out", str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "repo").exists()


# -- a real Triton server ---------------------------------------------------------------------------


def _triton_python() -> Path:
    value = os.environ.get("COREMATCHING_TRITON_PYTHON")
    if not value:
        pytest.skip(
            "no Triton environment: set COREMATCHING_TRITON_PYTHON to the python of an environment with "
            "pip install -e '.[ort,triton]' (nvidia-pytriton pins numpy < 2; .ci/run makes one)"
        )
    from serving.triton.local import TritonInstall, TritonUnavailable

    try:
        return TritonInstall.find(Path(value))
    except TritonUnavailable as e:
        pytest.skip(f"Triton cannot run here: {e}")


@pytest.fixture(scope="module")
def triton(default_build, tmp_path_factory):
    from serving.triton.local import local_triton

    install = _triton_python()
    repository = write_repository(
        TritonConfig(build=default_build, out=tmp_path_factory.mktemp("triton") / "repo", instances=2, provider="cpu")
    )
    with local_triton(install, repository) as running:
        yield install, running


def _ask(install, running, items: list[dict], concurrency: int = 1) -> list[dict]:
    done = subprocess.run(
        [str(install.python), "-m", "bench.triton.client", "--url", running.grpc, "--concurrency", str(concurrency)],
        input=json.dumps(items),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)["results"]


@pytest.fixture(scope="module")
def pipeline(default_build) -> Pipeline:
    return Pipeline.load(default_build, provider="cpu")


@pytest.fixture(scope="module")
def expected(pipeline) -> dict[str, object]:
    return {question: pipeline.answer(image, question, max_new_tokens=16) for image, question in QUESTIONS}


@pytest.fixture(scope="module")
def conversation(pipeline, expected) -> tuple[list[dict], object]:
    """A follow-up as MESSAGES (a system prompt, the first question and its answer, then the second
    question about the same image) and the runtime's answer to the same Conversation."""
    (image, first), (_, second) = QUESTIONS
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": first}]},
        {"role": "assistant", "content": expected[first].text},
        {"role": "user", "content": [{"type": "text", "text": second}]},
    ]
    history = Conversation(
        (
            Message("system", "Answer in one word."),
            Message("user", first, image=True),
            Message("assistant", expected[first].text),
            Message("user", second),
        )
    )
    return messages, pipeline.answer(image, history, max_new_tokens=16)


def test_grpc_streaming_answers_equal_the_runtime(triton, expected) -> None:
    install, running = triton
    items = [{"image": str(image), "question": question, "max_tokens": 16} for image, question in QUESTIONS]
    for item, result in zip(items, _ask(install, running, items), strict=True):
        answer = expected[item["question"]]
        assert result["error"] is None
        assert result["result"]["answer"] == answer.text
        assert result["result"]["token_ids"] == answer.token_ids
        assert result["result"]["kept_image_tokens"] == answer.kept_image_tokens
        assert "".join(result["pieces"]).strip() == answer.text  # streamed token by token


def test_a_bad_input_gets_a_triton_error_and_the_model_goes_on(triton, expected, conversation, tmp_path) -> None:
    install, running = triton
    broken = tmp_path / "broken.png"
    broken.write_bytes((EXAMPLES / "shapes_red_circle.png").read_bytes()[:300])
    image, question = QUESTIONS[0]
    messages, _ = conversation
    items = [
        {"image": str(broken), "question": question},
        {"image": str(image), "question": "   "},
        {"image": str(image), "question": question, "max_tokens": 100_000},
        {"image": str(image), "question": question, "messages": messages},
        {"image": str(image), "messages": [{"role": "user", "content": question}]},
        {"image": str(image), "messages": {"role": "user"}},
        {"image": str(image), "messages": [*messages, {"role": "user", "content": [{"type": "image"}]}]},
        {"image": str(image)},
        {"image": str(image), "question": question, "stop": ["a", "b", "c", "d", "e"]},
        {"image": str(image), "question": question, "max_tokens": 16},
    ]
    results = _ask(install, running, items)
    assert "truncated" in results[0]["error"]
    assert "empty" in results[1]["error"]
    assert "beyond the cache" in results[2]["error"]
    assert "both QUESTION and MESSAGES; send one" in results[3]["error"]
    assert '{"type": "image"}' in results[4]["error"]
    assert "JSON list" in results[5]["error"]
    assert "2 image parts" in results[6]["error"]
    assert "neither QUESTION nor MESSAGES" in results[7]["error"]
    assert "STOP: stop takes at most 4" in results[8]["error"]
    assert all("\n" not in r["error"] for r in results[:-1])
    assert results[-1]["error"] is None and results[-1]["result"]["answer"] == expected[question].text


def test_a_conversation_in_messages_equals_the_runtime(triton, conversation) -> None:
    install, running = triton
    messages, answer = conversation
    [result] = _ask(install, running, [{"image": str(QUESTIONS[0][0]), "messages": messages, "max_tokens": 16}])
    assert result["error"] is None
    assert result["result"]["answer"] == answer.text
    assert result["result"]["token_ids"] == answer.token_ids
    assert result["result"]["prompt_tokens"] == answer.prompt_tokens  # the history went in
    assert result["result"]["kept_image_tokens"] == answer.kept_image_tokens
    assert "".join(result["pieces"]).strip() == answer.text


def test_stop_strings_end_the_answer_as_in_the_runtime(triton, pipeline, expected) -> None:
    install, running = triton
    image, question = QUESTIONS[0]
    full = expected[question].text
    assert len(full) >= 2, full
    stop = [full[1:], "never said"]  # cuts after the answer's first character
    answer = pipeline.answer(image, question, max_new_tokens=16, stop=tuple(stop))
    assert answer.finish_reason == "stop" and answer.text == full[0]
    item = {"image": str(image), "question": question, "max_tokens": 16, "stop": stop}
    [result] = _ask(install, running, [item])
    assert result["error"] is None
    assert result["result"]["answer"] == answer.text and result["result"]["finish_reason"] == "stop"
    assert "".join(result["pieces"]).strip() == answer.text


def test_two_instances_answer_concurrent_requests(triton, expected) -> None:
    install, running = triton
    items = [{"image": str(image), "question": question, "max_tokens": 16} for image, question in QUESTIONS * 4]
    results = _ask(install, running, items, concurrency=2)
    assert [r["result"]["answer"] for r in results] == [expected[i["question"]].text for i in items]
    assert len({r["result"]["instance"] for r in results}) == 2, "one instance answered everything"


def test_http_generate_stream_answers(triton, expected) -> None:
    """Triton's HTTP generate extension (JSON in, server-sent events out); the image goes as base64."""
    import base64

    _install, running = triton
    image, question = QUESTIONS[0]
    body = {"IMAGE": base64.b64encode(image.read_bytes()).decode(), "QUESTION": question, "MAX_TOKENS": 16}
    request = urllib.request.Request(
        f"{running.http}/v2/models/corematching/generate_stream",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    events = []
    with urllib.request.urlopen(request, timeout=120) as response:
        for line in response:
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
    final = json.loads(events[-1]["RESULT"])
    assert final["answer"] == expected[question].text
    assert "".join(e["TEXT"] for e in events[:-1]).strip() == expected[question].text


def test_http_generate_stream_takes_messages_and_stop(triton, conversation) -> None:
    """MESSAGES as one JSON string, STOP as a JSON array (a list tensor, one string per element)."""
    import base64

    _install, running = triton
    messages, answer = conversation
    body = {
        "IMAGE": base64.b64encode(QUESTIONS[0][0].read_bytes()).decode(),
        "MESSAGES": json.dumps(messages),
        "STOP": ["never said", "nor this"],
        "MAX_TOKENS": 16,
    }
    request = urllib.request.Request(
        f"{running.http}/v2/models/corematching/generate_stream",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        events = [json.loads(line[6:]) for line in response if line.startswith(b"data: ")]
    final = json.loads(events[-1]["RESULT"])
    assert final["answer"] == answer.text and final["token_ids"] == answer.token_ids


def test_the_repository_command_prints_how_to_start_it(built, tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "serving.triton", str(built("llama", "cm").out), "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert "tritonserver --model-repository" in done.stdout
