"""The server's load test (bench/load/, scripts/load_test.py): its settings, its mix, and a short
run against a server on a fresh build of the real default model (latencies are reported, never asserted)."""

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
    example_pairs,
    plan_requests,
    run_load,
    write_results,
)
from bench.load.plan import FOUND_AFTER_ADMISSION

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


def test_the_mix_is_deterministic_by_seed_and_covers_every_bad_kind() -> None:
    pairs = example_pairs(REPO / "examples")
    plan = plan_requests(LoadConfig(requests=64, seed=0), pairs)
    assert plan == plan_requests(LoadConfig(requests=64, seed=0), pairs)
    assert plan != plan_requests(LoadConfig(requests=64, seed=1), pairs)
    kinds = Counter(item.kind for item in plan)
    assert (kinds["stream"], kinds["json"], kinds["disconnect"]) == (24, 16, 8)
    assert set(BAD_KINDS) <= set(kinds) and sum(kinds[k] for k in BAD_KINDS) == 16
    assert [item.index for item in plan] == list(range(64))
    assert {(item.image, item.question) for item in plan if not item.bad} == set(pairs)


def test_a_short_mix_still_adds_up() -> None:
    plan = plan_requests(LoadConfig(requests=5, seed=3), example_pairs(REPO / "examples"))
    assert len(plan) == 5 and len({item.index for item in plan}) == 5


# -- a short run on the real default model ----------------------------------------------------------


@pytest.mark.slow
def test_a_short_load_passes_every_check_and_its_counts_add_up(default_build: Path, tmp_path: Path) -> None:
    # Queue 2 behind 4 clients: some requests meet 429, which count as rejected, not as failures.
    config = LoadConfig(build=default_build, clients=4, requests=16, max_queue=2, out_dir=tmp_path / "out")
    report = run_load(config)

    failing = {name: check.detail for name, check in report.checks.items() if not check.passed}
    assert not failing
    f = report.figures
    parts = ("completed", "rejected_429", "refused_as_expected", "failed", "disconnected", "cut_by_time_limit")
    assert f["planned"] == f["sent"] == 16 == sum(f[part] for part in parts)
    assert f["failed"] == f["cut_by_time_limit"] == f["not_sent"] == 0
    # A bad request whose fault is in the image's pixels is admitted (or refused with 429) before it is found.
    bad_rejected = [o for o in report.outcomes if o.kind in BAD_KINDS and o.result == "rejected"]
    assert all(o.kind in FOUND_AFTER_ADMISSION for o in bad_rejected)
    assert f["refused_as_expected"] + len(bad_rejected) == f["sent_by_kind"]["bad"] == 4
    assert sum(f["sent_by_kind"].values()) == 16
    assert f["completed"] >= 1  # the first request of each client finds at most 1 running + 2 waiting
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
