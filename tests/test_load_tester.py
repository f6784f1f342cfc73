"""The server's load test (bench/load/, scripts/load_test.py): its settings, its mix, the soak's rules,
and short standard, soak and kill runs against a server on a fresh build of the real default model
(latencies are reported, never asserted)."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

# The serve extra is optional: without it the module is skipped, not an import error.
pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from bench.load import (
    BAD_KINDS,
    LoadConfig,
    LoadConfigError,
    LoadError,
    Planned,
    Sample,
    encode_request,
    example_conversations,
    example_pairs,
    plan_requests,
    run_kill,
    run_load,
    run_soak,
    write_results,
)
from bench.load.plan import FOUND_AFTER_ADMISSION, SYSTEM_PROMPT
from bench.load.report import config_json
from bench.load.soak import check_fds, check_rss_growth

REPO = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("load_test_script", REPO / "scripts" / "load_test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"clients": 0}, r"--clients must be an integer in 1\.\.512, got 0"),
        ({"requests": -3}, r"--requests must be an integer in 1\.\.100000, got -3"),
        ({"requests": 2.5}, r"--requests must be an integer"),
        ({"max_queue": -1}, r"--max-queue must be an integer in 0\.\."),
        ({"max_tokens": 0}, r"--max-tokens must be an integer in 1\.\."),
        ({"warmup_rounds": -1}, r"--warmup-rounds must be an integer"),
        ({"time_limit": 0}, r"--time-limit must be a positive number of seconds, got 0"),
        ({"time_limit": float("nan")}, r"--time-limit must be a positive number"),
        ({"rss_tolerance_mib": -1}, r"--rss-tolerance-mib must be 0 or more, got -1"),
        ({"rss_tolerance_percent": float("inf")}, r"--rss-tolerance-percent must be 0 or more"),
        ({"seed": "x"}, r"--seed must be an integer, got 'x'"),
        ({"url": "http://127.0.0.1:8000"}, r"--url needs --pid"),
        ({"pid": 123}, r"--pid goes with --url"),
        ({"url": "http://127.0.0.1:8000", "pid": 0}, r"--pid must be a positive process id, got 0"),
        ({"url": "http://127.0.0.1:8000/v1", "pid": 1}, r"--url is the server's root"),
        ({"url": "ftp://127.0.0.1:8000", "pid": 1}, r"is not an http URL"),
        ({"url": "http://127.0.0.1:port", "pid": 1}, r"is not a URL"),
        ({"mode": "stress"}, r"mode must be one of standard, soak, kill, got 'stress'"),
        ({"mode": "kill", "url": "http://127.0.0.1:8000", "pid": 1}, r"--kill needs a server this run starts"),
        ({"duration": 60}, r"--duration goes with --soak or --kill"),
        ({"mode": "soak", "duration": 0}, r"--duration must be a positive number of seconds, got 0"),
        ({"mode": "soak", "duration": 30, "soak_warmup": 30}, r"--soak-warmup \(30 s\) must end before --duration"),
        ({"mode": "soak", "duration": 30, "soak_warmup": 10, "sample_interval": 25}, r"--sample-interval \(25 s\)"),
        ({"mode": "soak", "sample_interval": 0}, r"--sample-interval must be a positive number of seconds"),
        ({"mode": "soak", "rss_growth_percent": -1}, r"--rss-growth-percent must be 0 or more, got -1"),
        ({"mode": "soak", "fd_slack": -1}, r"--fd-slack must be an integer in 0\.\."),
        ({"mode": "soak", "time_limit": 100}, r"--time-limit \(100 s\) must exceed --duration \(600 s\)"),
        ({"kill_after": 3}, r"--kill-after goes with --kill"),
        ({"mode": "kill", "requests": 10, "kill_after": 10}, r"--kill-after must be in 1\.\.9"),
        ({"mode": "kill", "requests": 1}, r"--kill needs --requests 2 or more"),
        ({"mode": "kill", "client_timeout": 0}, r"--client-timeout must be a positive number of seconds, got 0"),
        ({"api_key": " "}, r"--api-key must be a non-empty string"),
    ],
)
def test_bad_settings_are_refused_naming_the_flag(settings, message) -> None:
    with pytest.raises(LoadConfigError, match=message):
        LoadConfig(**settings)


@pytest.mark.parametrize(
    "url", ["http://example.com:8000", "http://10.0.0.7:8000", "http://192.168.1.2", "http://localhost.evil.com:80"]
)
def test_a_url_off_this_machine_is_refused(url: str) -> None:
    with pytest.raises(LoadConfigError, match=r"--url must be on this machine \(127\.0\.0\.1 or localhost\)"):
        LoadConfig(url=url, pid=1)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:8000/", "http://[::1]:8000"])
def test_a_local_url_is_accepted(url: str) -> None:
    assert LoadConfig(url=url, pid=1).url == url


def test_the_script_refuses_a_remote_url_with_one_line(capsys) -> None:
    code = load_script().main(["--url", "http://example.com:8000", "--pid", "1", "--out-dir", "/nonexistent"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: --url must be on this machine") and "\n" not in err


def test_the_script_refuses_kill_with_a_url_and_a_stray_soak_setting_with_one_line(capsys) -> None:
    script = load_script()
    assert script.main(["--kill", "--url", "http://127.0.0.1:8000", "--pid", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --kill needs a server this run starts") and "\n" not in err
    assert script.main(["--sample-interval", "5"]) == 2
    assert capsys.readouterr().err.strip() == "error: --sample-interval goes with --soak"


def test_the_modes_defaults() -> None:
    assert (LoadConfig().request_count, LoadConfig().pace_seconds, LoadConfig().load_time_limit) == (64, 0.0, 600.0)
    soak = LoadConfig(mode="soak")
    assert (soak.request_count, soak.pace_seconds, soak.load_time_limit, soak.outputs) == (
        1000,
        600.0,
        1200.0,
        ("soak.json", "soak.md"),
    )
    kill = LoadConfig(mode="kill", requests=40)
    assert (kill.kill_at, kill.pace_seconds, kill.outputs) == (20, 0.0, ("kill.json", "kill.md"))


def test_the_api_key_is_sent_and_never_written(tmp_path: Path) -> None:
    config = LoadConfig(api_key="sk-local", out_dir=tmp_path)
    assert config.auth_headers() == {"Authorization": "Bearer sk-local"}
    assert config_json(config)["api_key"] == "***"
    assert "sk-local" not in load_script().shown_command(["--api-key", "sk-local", "--soak"])


def test_rss_tolerance_is_the_larger_of_mib_and_percent() -> None:
    config = LoadConfig(rss_tolerance_mib=32, rss_tolerance_percent=10)
    assert config.rss_tolerance(100 * 2**20) == 32 * 2**20
    assert config.rss_tolerance(1000 * 2**20) == 100 * 2**20


def test_existing_results_are_refused_before_anything_starts(tmp_path: Path) -> None:
    (tmp_path / "load.md").write_text("an earlier run\n")
    config = LoadConfig(build=tmp_path / "no-build", out_dir=tmp_path)
    with pytest.raises(LoadError, match=r"load\.md exist; pass --force"):
        run_load(config)


def test_a_missing_build_is_a_clear_error(tmp_path: Path) -> None:
    config = LoadConfig(build=tmp_path / "no-build", out_dir=tmp_path / "out")
    with pytest.raises(LoadError, match=r"no build at .*no-build.*python -m export build"):
        run_load(config)


# -- the mix ----------------------------------------------------------------------------------------


EXAMPLES = REPO / "examples"


def test_the_mix_is_deterministic_by_seed_and_covers_every_bad_kind() -> None:
    pairs, talks = example_pairs(EXAMPLES), example_conversations(EXAMPLES)
    plan = plan_requests(LoadConfig(requests=64, seed=0), pairs, talks)
    assert plan == plan_requests(LoadConfig(requests=64, seed=0), pairs, talks)
    assert plan != plan_requests(LoadConfig(requests=64, seed=1), pairs, talks)
    kinds = Counter(item.kind for item in plan)
    assert (kinds["stream"], kinds["json"], kinds["disconnect"], kinds["conversation"]) == (19, 13, 6, 13)
    assert set(BAD_KINDS) <= set(kinds) and sum(kinds[k] for k in BAD_KINDS) == 13
    assert [item.index for item in plan] == list(range(64))
    assert {(item.image, item.question) for item in plan if not item.bad and not item.history} == set(pairs)
    talked = [item for item in plan if item.kind == "conversation"]
    assert {item.key for item in talked} <= {talk.key for talk in talks}
    assert {item.stream for item in talked} == {True, False}


def test_a_short_mix_still_adds_up() -> None:
    plan = plan_requests(LoadConfig(requests=5, seed=3), example_pairs(EXAMPLES), example_conversations(EXAMPLES))
    assert len(plan) == 5 and len({item.index for item in plan}) == 5


def test_without_conversations_their_share_goes_to_single_questions() -> None:
    plan = plan_requests(LoadConfig(requests=64, conversations=False), example_pairs(EXAMPLES), [])
    kinds = Counter(item.kind for item in plan)
    assert "conversation" not in kinds and (kinds["stream"], kinds["json"], kinds["disconnect"]) == (24, 16, 8)


def test_a_conversation_is_sent_in_openai_form() -> None:
    talk = example_conversations(EXAMPLES)[0]
    images = {talk.image: (EXAMPLES / talk.image).read_bytes()}
    body, headers = encode_request(talk, images, "default", 8)
    messages = json.loads(body)["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"] == SYSTEM_PROMPT
    first = messages[1]["content"]
    assert first[0]["type"] == "image_url" and first[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert first[1] == {"type": "text", "text": talk.history[0][0]}
    assert messages[2]["content"] == talk.history[0][1] and messages[3]["content"] == talk.question
    # Its reference is the same conversation alone, not the follow-up asked on its own.
    assert talk.alone().key == talk.key != f"{talk.image}: {talk.question}"
    assert headers == {"Content-Type": "application/json"}


@pytest.mark.parametrize("kind", ["last_turn_assistant", "too_many_stops"])
def test_the_conversation_and_stop_faults(kind: str) -> None:
    pairs = example_pairs(EXAMPLES)
    item = Planned(0, kind, *pairs[0], stream=False)
    body = json.loads(encode_request(item, {pairs[0][0]: b"png"}, "default", 8)[0])
    if kind == "last_turn_assistant":
        assert body["messages"][-1]["role"] == "assistant"
    else:
        assert len(body["stop"]) == 5
    assert item.expected_status == 400


# -- the soak's rules --------------------------------------------------------------------------------


def _sample(seconds: float, mib: float, fds: int = 12, sockets: int = 4, phase: str = "load") -> Sample:
    return Sample(seconds, phase, int(mib * 2**20), int(mib * 2**20) // 2, fds, sockets, 1, 0)


def test_rss_may_not_grow_past_the_warm_ups_highest_sample() -> None:
    samples = [_sample(0, 200, phase="warm-up"), _sample(60, 190), _sample(120, 209.9), _sample(600, 170, phase="end")]
    # The reference is 200 MiB (the warm-up's), not the dip at 60 s: 209.9 is within 5%, the drop is not judged.
    assert check_rss_growth(samples, 5).passed
    grown = [*samples[:-1], _sample(600, 210.5, phase="end")]
    check = check_rss_growth(grown, 5)
    assert not check.passed and "at 600 s: 210.5 MiB" in check.detail
    # Without warm-up samples the first later one is the reference.
    assert not check_rss_growth([_sample(0, 190), _sample(60, 200)], 5).passed
    assert not check_rss_growth(samples[:2], 5).passed  # one sample after the warm-up proves nothing


def test_fds_may_not_grow_past_the_slack_in_all_or_outside_sockets() -> None:
    first = _sample(60, 200, fds=14, sockets=6)
    assert check_fds([first, _sample(600, 200, fds=11, sockets=3, phase="end")], 2).passed
    assert check_fds([first, _sample(600, 200, fds=16, sockets=6, phase="end")], 2).passed
    assert not check_fds([first, _sample(600, 200, fds=17, sockets=6, phase="end")], 2).passed
    # Connections closed but files leaked: the total still fits, the descriptors that are not sockets do not.
    assert not check_fds([first, _sample(600, 200, fds=14, sockets=3, phase="end")], 2).passed
    assert not check_fds([first, _sample(600, 200)], 2).passed  # the last sample must be the one after the drain


# -- a short run on the real default model ----------------------------------------------------------


PARTS = ("completed", "rejected_429", "refused_as_expected", "failed", "disconnected", "cut_by_time_limit")


@pytest.mark.slow
def test_a_short_load_passes_every_check_and_its_counts_add_up(default_build: Path, tmp_path: Path) -> None:
    # Queue 2 behind 4 clients: some requests meet 429, which count as rejected, not as failures.
    config = LoadConfig(build=default_build, clients=4, requests=16, max_queue=2, out_dir=tmp_path / "out")
    plan = plan_requests(config, example_pairs(EXAMPLES), example_conversations(EXAMPLES))
    # How many answers the load completes is a race: a client that gets a 429 takes its next request at
    # once, so while the admitted ones are answered the others may spend the rest of the mix on 429s (on a
    # loaded machine they always do). What the queue guarantees whatever the timing: the first --max-queue
    # requests to reach it are admitted, and with this seed the first request of every client is a whole
    # answer (no bad request, no disconnecting stream), so at least --max-queue answers complete.
    assert all(not item.bad and item.kind != "disconnect" for item in plan[: config.clients])
    report = run_load(config)

    failing = {name: check.detail for name, check in report.checks.items() if not check.passed}
    assert not failing
    f = report.figures
    assert f["planned"] == f["sent"] == 16 == sum(f[part] for part in PARTS)
    assert f["failed"] == f["cut_by_time_limit"] == f["not_sent"] == 0
    # A bad request whose fault is in the image's pixels is admitted (or refused with 429) before it is found.
    bad_rejected = [o for o in report.outcomes if o.kind in BAD_KINDS and o.result == "rejected"]
    assert all(o.kind in FOUND_AFTER_ADMISSION for o in bad_rejected)
    bad = sum(item.bad for item in plan)
    assert f["refused_as_expected"] + len(bad_rejected) == f["sent_by_kind"]["bad"] == bad
    assert sum(f["sent_by_kind"].values()) == 16 and f["sent_by_kind"]["conversation"] >= 1
    assert f["completed"] >= config.max_queue
    # Each warm-up burst is all valid requests: at least --max-queue of each are answered, concurrently.
    assert f["warmup_completed"] >= config.warmup_rounds * config.max_queue
    assert len(report.references) == len({o.key for o in report.outcomes if o.kind not in BAD_KINDS})
    assert report.final is not None and report.final.answer == report.references[report.final.key]

    paths = write_results(report, "pytest")
    saved = json.loads(paths[0].read_text())
    assert saved["passed"] is True and saved["command"] == "pytest"
    assert {"python", "onnxruntime", "platform", "cpu_count"} <= set(saved["environment"])
    assert len(saved["requests"]) == 16
    markdown = paths[1].read_text()
    assert "`pytest`" in markdown and "| answers_match_reference | yes |" in markdown
    with pytest.raises(LoadError, match="pass --force"):
        write_results(report)


@pytest.mark.slow
def test_a_short_soak_keeps_memory_and_fds_flat(default_build: Path, tmp_path: Path) -> None:
    config = LoadConfig(
        build=default_build,
        mode="soak",
        clients=4,
        requests=30,
        duration=18,
        sample_interval=2,
        soak_warmup=4,
        out_dir=tmp_path,
    )
    report = run_soak(config)

    failing = {name: check.detail for name, check in report.checks.items() if not check.passed}
    assert not failing
    counts = report.counts
    assert sum(sum(row.values()) for row in counts.values()) == len(report.outcomes) == 30
    assert report.not_sent == 0 and set(counts) == {"stream", "json", "disconnect", "conversation", "bad"}
    assert all(
        label in {"completed", "disconnected", "rejected", "refused"} for row in counts.values() for label in row
    )
    assert report.load_seconds >= 18
    # A sample every 2 s from the start, then one after the drain; the rules judge those from 4 s on.
    assert len(report.samples) >= 9 and report.samples[-1].phase == "end"
    assert [s.phase for s in report.samples[:2]] == ["warm-up", "warm-up"] and len(report.settled) >= 2
    assert report.samples[-1].finished == 30 and report.samples[-1].in_flight == 0

    paths = write_results(report, "pytest")
    assert [p.name for p in paths] == ["soak.json", "soak.md"]
    saved = json.loads(paths[0].read_text())
    assert saved["passed"] is True and len(saved["samples"]) == len(report.samples)
    markdown = paths[1].read_text()
    assert "`pytest`" in markdown and "| rss_no_growth | yes |" in markdown and "| fds_no_growth | yes |" in markdown


@pytest.mark.slow
def test_a_kill_run_loses_only_what_was_in_flight_and_answers_alike_after(default_build: Path, tmp_path: Path) -> None:
    config = LoadConfig(
        build=default_build, mode="kill", clients=4, requests=24, duration=10, client_timeout=60, out_dir=tmp_path
    )
    report = run_kill(config)

    failing = {name: check.detail for name, check in report.checks.items() if not check.passed}
    assert not failing
    kill = report.kill
    assert kill.exit_code == -9 and kill.new_pid not in (None, kill.killed_pid) and kill.after_sent == 12
    assert kill.at is not None and kill.back_at is not None and kill.back_at > kill.at
    by_window = report.counts_by_window()
    assert sum(sum(row.values()) for row in by_window.values()) == len(report.outcomes) == 24
    assert sum(sum(row.values()) for row in report.counts.values()) == 24
    assert by_window["before the kill"] and by_window["after the restart"].get("completed", 0) >= 1
    # Only what was in flight at the kill or sent while the server was down may have failed, and only so.
    for o in report.outcomes:
        if o.result == "failed":
            assert o.connection_error or o.server_error
            assert report.window(o) in ("before the kill", "while down")
        assert o.total is not None and o.total <= config.client_timeout
    assert len(report.after_restart) == len(report.references)
    assert all(o.answer == report.references[o.key] for o in report.after_restart)

    paths = write_results(report, "pytest")
    assert [p.name for p in paths] == ["kill.json", "kill.md"]
    saved = json.loads(paths[0].read_text())
    assert saved["passed"] is True and saved["kill"]["exit_code"] == -9
    assert all("window" in r and r["total"] is not None for r in saved["requests"])
    assert "| outcomes_allowed | yes |" in paths[1].read_text()
