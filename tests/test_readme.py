"""The README's quick start stays true: its commands are the ones that work."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_quick_start_is_two_commands_install_then_run():
    main, tests = quick_start_commands()
    for command in (main, tests):
        assert "pip install torch==2.13.0 -e" in command  # the CPU build, pinned
    assert "&& python -m export build && python runtime/demo.py" in main
    assert tests.endswith("&& pytest")
    ci = (REPO / ".ci" / "run").read_text()
    assert 'pip install --quiet --disable-pip-version-check torch==2.13.0 -e ".[test]"' in ci
    assert "pytest" in ci


def test_main_command_builds_and_answers(tmp_path):
    """The README's main command, as written (after the install), in a fresh copy of the examples."""
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    steps = [shlex.split(step) for step in quick_start_commands()[0].split(" && ") if step.startswith("python ")]
    assert [step[:2] for step in steps] == [["python", "-m"], ["python", "runtime/demo.py"]]
    build = subprocess.run([sys.executable, *steps[0][1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    manifest = json.loads((tmp_path / "builds" / "default" / "manifest.json").read_text())
    assert manifest["validation"]["passed"] and manifest["model"]["source"] == "embedded default"
    assert manifest["corematching"]["token_budget"] == 64 and manifest["model"]["num_image_tokens"] == 576
    demo = [str(REPO / "runtime" / "demo.py"), *steps[1][2:]]
    answer = subprocess.run([sys.executable, *demo], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert answer.returncode == 0, answer.stderr
    assert "kept 64 of 576 image tokens" in answer.stdout and "tokens/s" in answer.stdout
    assert answer.stdout.splitlines()[0].strip().lower().rstrip(".") == "red"  # the README's question
    # The same build (the ONNX graphs, through the runtime) answers every shipped example as the PyTorch
    # reference of the default configuration does, and gets the README's count of them right.
    from PIL import Image

    from coreMatching import CoreMatchingConfig
    from models import default_model_dir, load_llava
    from models.answer import answer as reference_answer
    from runtime import Pipeline
    from vqadata.data import is_correct

    pipeline = Pipeline.load(tmp_path / "builds" / "default", provider="cpu")
    model, processor = load_llava(default_model_dir())
    model = model.float()
    wrong = []
    for q in json.loads((REPO / "examples" / "questions.json").read_text()):
        image = REPO / "examples" / q["image"]
        got = pipeline.answer(image, q["question"], max_new_tokens=4).text
        ref = reference_answer(model, processor, Image.open(image), q["question"], CoreMatchingConfig(), 4).text
        assert got.strip() == ref.strip(), (q["question"], got, ref)
        if not is_correct(got, (q["answer"],)):
            wrong.append(q["question"])
    # README: 7 of the 9 at 64 tokens; it misses the blue square's shape and the three triangles' count.
    assert wrong == ["What shape is the blue object?", "How many triangles are there?"], wrong


REFERENCE = "python scripts/reference_answer.py"


def _run(command: str, *extra: str) -> subprocess.CompletedProcess:
    argv = command.split()
    assert argv[0] == "python"
    return subprocess.run([sys.executable, *argv[1:], *extra], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_reference_answer_on_the_default_model():
    main = REFERENCE
    done = _run(main, "--max-new-tokens", "4")
    assert done.returncode == 0, done.stderr
    assert "kept 64 of 576 image tokens" in done.stdout
    done = _run(main, "--max-new-tokens", "4", "--json", "--token-budget", "32")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert len(result["kept_image_tokens"]) == 32 and len(result["token_ids"]) >= 1
    assert set(result["timings"]) == {"vision", "prefill", "decode"}


def test_reference_answer_bad_input_is_one_line():
    main = REFERENCE
    for extra, message in [
        (("--image", "missing.png"), "does not exist"),
        (("--token-budget", "0"), "token_budget must be at least 1"),
        (("--token-budget", "600"), "larger than the 576 image tokens"),
        (("--model", str(REPO / "examples")), "no config.json"),
        (("--question", "  "), "question is empty"),
        (("--image", str(REPO / "README.md")), "is not an image"),
    ]:
        done = _run(main, *extra)
        assert done.returncode == 2, (extra, done.stderr)
        error_lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(error_lines) == 1 and message in error_lines[0], done.stderr
        assert "Traceback" not in done.stderr
