"""runtime/demo.py's interactive mode keeps a conversation: follow-ups carry the history, `/new` and a
new image start over, a conversation past the prompt limit is a one-line error that offers `/new`."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from runtime import Pipeline
from runtime.chat import Conversation, Message

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "runtime"))  # demo.py is a script, not a package module

import demo  # noqa: E402

EXAMPLE = REPO / "examples" / "shapes_red_circle.png"
OTHER = REPO / "examples" / "shapes_mixed.png"
TOKENS = 4


@pytest.fixture(scope="module")
def build(built) -> Path:
    return built("llama", "cm").out


@pytest.fixture(scope="module")
def pipeline(build) -> Pipeline:
    return Pipeline.load(build, provider="cpu")


def converse(build: Path, lines: list[str], *extra: str, monkeypatch, capsys) -> tuple[int, list[dict], str]:
    """The demo's interactive mode fed `lines` on stdin: (exit code, the --json answers, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    code = demo.main(["--build", str(build), "--provider", "cpu", "--max-new-tokens", str(TOKENS), "--json", *extra])
    out, err = capsys.readouterr()
    # The prompts have no newline: an answer's JSON follows the prompt it answered on the same line.
    answers = [json.loads(line[line.index('{"answer"') :]) for line in out.splitlines() if '{"answer"' in line]
    return code, answers, err


def history(*turns: str, system: str | None = None) -> Conversation:
    """A conversation of alternating questions and answers ending with a question; the image in the first."""
    messages = [Message("system", system)] if system is not None else []
    messages += [Message("assistant" if i % 2 else "user", text, image=i == 0) for i, text in enumerate(turns)]
    return Conversation(tuple(messages))


def test_a_follow_up_carries_the_conversation(build, pipeline, monkeypatch, capsys) -> None:
    lines = [str(EXAMPLE), "What colour is the circle?", "And the square?", "Where is it?", ""]
    code, answers, err = converse(build, lines, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert len(answers) == 3
    first = pipeline.answer(EXAMPLE, lines[1], TOKENS)
    second = pipeline.answer(EXAMPLE, history(lines[1], first.text, lines[2]), TOKENS)
    third = pipeline.answer(EXAMPLE, history(lines[1], first.text, lines[2], second.text, lines[3]), TOKENS)
    for got, expected in zip(answers, (first, second, third), strict=True):
        assert got["token_ids"] == expected.token_ids and got["answer"] == expected.text
        assert got["prompt_tokens"] == expected.prompt_tokens
    # The history went in: each follow-up's prompt is longer than its question alone.
    assert answers[1]["prompt_tokens"] > pipeline.answer(EXAMPLE, lines[2], TOKENS).prompt_tokens
    assert answers[0]["prompt_tokens"] < answers[1]["prompt_tokens"] < answers[2]["prompt_tokens"]


@pytest.mark.parametrize("command", ["/new", "/reset"])
def test_new_starts_over_with_the_same_image(build, pipeline, command, monkeypatch, capsys) -> None:
    lines = [str(EXAMPLE), "What colour is the circle?", command, "And the square?", ""]
    code, answers, err = converse(build, lines, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    alone = pipeline.answer(EXAMPLE, "And the square?", TOKENS)
    assert answers[1]["token_ids"] == alone.token_ids and answers[1]["prompt_tokens"] == alone.prompt_tokens


def test_a_new_image_starts_a_new_conversation(build, pipeline, monkeypatch, capsys) -> None:
    lines = [str(EXAMPLE), "What colour is the circle?", str(OTHER), "How many squares?", "And circles?", ""]
    code, answers, err = converse(build, lines, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    first = pipeline.answer(OTHER, lines[3], TOKENS)
    follow_up = pipeline.answer(OTHER, history(lines[3], first.text, lines[4]), TOKENS)
    assert [a["token_ids"] for a in answers[1:]] == [first.token_ids, follow_up.token_ids]
    assert answers[1]["prompt_tokens"] == first.prompt_tokens


def test_a_missing_image_is_reported_and_the_conversation_goes_on(
    build, pipeline, tmp_path, monkeypatch, capsys
) -> None:
    lines = [str(EXAMPLE), "What colour is the circle?", str(tmp_path / "gone.png"), "And the square?", ""]
    code, answers, err = converse(build, lines, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not exist" in errors[0], err
    first = pipeline.answer(EXAMPLE, lines[1], TOKENS)
    assert (
        answers[1]["token_ids"] == pipeline.answer(EXAMPLE, history(lines[1], first.text, lines[3]), TOKENS).token_ids
    )


def test_a_conversation_past_the_prompt_limit_offers_new(build, pipeline, monkeypatch, capsys) -> None:
    long = "Is it " + "very " * 12 + "red?"  # fits alone, not after the first turn (the tiny builds take 64 tokens)
    assert pipeline.encode(long, TOKENS)[0].prompt_tokens <= 64
    lines = [str(EXAMPLE), "What colour is the circle?", long, "/new", long, ""]
    code, answers, err = converse(build, lines, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "longer than" in errors[0] and "/new" in errors[0], err
    assert len(answers) == 2  # the first question, then the long one after /new
    assert answers[1]["token_ids"] == pipeline.answer(EXAMPLE, long, TOKENS).token_ids


def test_a_system_prompt_goes_first_in_one_shot_and_in_conversation(build, pipeline, monkeypatch, capsys) -> None:
    system = "Answer in one word."
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    args = ["--build", str(build), "--provider", "cpu", "--max-new-tokens", str(TOKENS), "--json"]
    assert demo.main([*args, "--image", str(EXAMPLE), "--question", "What colour?", "--system", system]) == 0
    one_shot = json.loads(capsys.readouterr().out)
    expected = pipeline.answer(EXAMPLE, history("What colour?", system=system), TOKENS)
    assert one_shot["token_ids"] == expected.token_ids and one_shot["prompt_tokens"] == expected.prompt_tokens
    assert one_shot["prompt_tokens"] > pipeline.answer(EXAMPLE, "What colour?", TOKENS).prompt_tokens

    lines = ["What colour?", "And the shape?", ""]
    code, answers, err = converse(
        build, lines, "--image", str(EXAMPLE), "--system", system, monkeypatch=monkeypatch, capsys=capsys
    )
    assert code == 0, err
    follow_up = pipeline.answer(
        EXAMPLE, history("What colour?", expected.text, "And the shape?", system=system), TOKENS
    )
    assert [a["token_ids"] for a in answers] == [expected.token_ids, follow_up.token_ids]


def test_an_empty_system_prompt_is_one_line(build, capsys) -> None:
    code = demo.main(["--build", str(build), "--image", str(EXAMPLE), "--question", "What?", "--system", " "])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --system is empty") and err.count("\n") == 1


def test_one_shot_answers_as_the_bare_question(build, pipeline, monkeypatch, capsys) -> None:
    args = ["--build", str(build), "--provider", "cpu", "--max-new-tokens", str(TOKENS), "--json"]
    assert demo.main([*args, "--image", str(EXAMPLE), "--question", "What colour?"]) == 0
    got = json.loads(capsys.readouterr().out)
    expected = pipeline.answer(EXAMPLE, "What colour?", TOKENS)
    assert got["token_ids"] == expected.token_ids and got["prompt_tokens"] == expected.prompt_tokens


def test_the_help_line_names_the_commands(build, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{EXAMPLE}\n/help\n\n"))
    assert demo.main(["--build", str(build), "--provider", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count(demo.HELP) == 2  # when the conversation begins, and for /help
    assert "/new" in demo.HELP and {"/new", "/reset"} <= set(demo.COMMANDS)


def test_the_chat_builds_the_conversation_it_was_given() -> None:
    chat = demo.Chat()
    assert chat.prompt("What?") == Conversation.question("What?")  # the one-turn prompt
    chat.record("What?", "Red.")
    assert chat.prompt("And?") == history("What?", "Red.", "And?")
    chat.reset()
    assert chat.prompt("Again?") == Conversation.question("Again?")
    assert demo.Chat("Be brief.").prompt("What?") == history("What?", system="Be brief.")
