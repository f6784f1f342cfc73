"""`--model owner/name[@revision]`: hub ids resolved from the local Hugging Face cache, never the network."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from buildformat import read
from export.__main__ import main
from models.hub import HubCacheError, HubId, hub_cache_dir, hub_source, resolve_model

REPO = Path(__file__).resolve().parent.parent
# The flags of the quickest tiny build (dense: no selection graphs to trace and validate).
TINY_BUILD = ["--dense", "--max-prompt-tokens", "64", "--max-sequence", "128"]


def cache_model(cache: Path, repo_id: str, checkpoint: Path, refs: tuple[str, ...] = ("main",), drop=()) -> str:
    """Put `checkpoint` in `cache` as huggingface_hub lays a download out; returns the snapshot's commit.

    models--{owner}--{name}/blobs/{sha256} hold the files, snapshots/{commit}/ links to them relatively, and
    refs/{ref} holds the commit (no newline, as the hub writes it).
    """
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}{refs}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(checkpoint.iterdir()):
        if file.name in drop:
            continue
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture
def cache(tmp_path, monkeypatch, checkpoint) -> tuple[Path, str, str]:
    """A hub cache with owner/tiny at two commits (main and tag v1) -> (cache, main's commit, v1's commit)."""
    root = tmp_path / "hub"
    main_commit = cache_model(root, "owner/tiny", checkpoint("llama"))
    v1_commit = cache_model(root, "owner/tiny", checkpoint("llama"), refs=("v1",))
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    return root, main_commit, v1_commit


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: the resolution must be offline by construction."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network use: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _snapshot(cache: Path, commit: str) -> Path:
    return (cache / "models--owner--tiny" / "snapshots" / commit).resolve()


@pytest.mark.parametrize("without_hub_library", [False, True])
def test_hub_id_resolves_at_main_a_revision_and_a_commit(cache, no_network, monkeypatch, without_hub_library):
    root, main_commit, v1_commit = cache
    calls: list[dict] = []
    if without_hub_library:  # the cache's layout read by hand
        monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    else:
        import huggingface_hub

        real = huggingface_hub.snapshot_download
        monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append(k) or real(*a, **k))
    values = ("owner/tiny", "owner/tiny@v1", f"owner/tiny@{v1_commit}")
    assert {value: resolve_model(value).resolve() for value in values} == {
        "owner/tiny": _snapshot(root, main_commit),
        "owner/tiny@v1": _snapshot(root, v1_commit),
        f"owner/tiny@{v1_commit}": _snapshot(root, v1_commit),
    }
    assert (resolve_model("owner/tiny") / "config.json").is_symlink()
    assert len(calls) == (0 if without_hub_library else 4) and all(c["local_files_only"] for c in calls)


def test_a_snapshot_the_hub_library_finds_incomplete_is_one_line(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import IncompleteSnapshotError

    def incomplete(repo_id, **kwargs):
        raise IncompleteSnapshotError("2 file(s) are missing", snapshot_path="/cache/models--owner--tiny/snapshots/x")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", incomplete)
    with pytest.raises(HubCacheError) as e:
        resolve_model("owner/half")
    assert str(e.value).startswith("owner/half: its snapshot in the Hugging Face cache (/cache/models--owner--tiny")
    assert "is incomplete" in str(e.value) and "\n" not in str(e.value)


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    assert hub_cache_dir() == Path.home() / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub_cache_dir() == tmp_path / "cache"


def test_a_directory_is_used_as_given_even_when_shaped_like_a_hub_id(cache, checkpoint, tmp_path, monkeypatch):
    assert resolve_model(checkpoint("llama")) == checkpoint("llama")
    assert resolve_model(str(checkpoint("llama"))) == checkpoint("llama")
    assert resolve_model(None) is None
    monkeypatch.chdir(tmp_path)
    shutil.copytree(checkpoint("llama"), tmp_path / "owner" / "tiny")
    assert resolve_model("owner/tiny") == Path("owner/tiny")  # the directory, not the cached snapshot
    # Not a directory and not an id: left for the loader's "does not exist" message, as before.
    assert resolve_model("/nonexistent/llava") == Path("/nonexistent/llava")


@pytest.mark.parametrize(
    "value, parsed",
    [
        ("llava-hf/llava-1.5-7b-hf", HubId("llava-hf/llava-1.5-7b-hf", "main")),
        ("owner/name@refs/pr/1", HubId("owner/name", "refs/pr/1")),
        ("name", None),
        ("/abs/path", None),
        ("a/b/c", None),
        ("owner--x/name", None),
        ("owner/name@../../x", None),
    ],
)
def test_hub_id_shape(value, parsed):
    assert HubId.parse(value) == parsed


def test_missing_id_is_one_line_and_exit_2_through_the_entry_point(tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "export", "build", "--model", "owner/missing", "--out", str(tmp_path / "b")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: owner/missing is neither a directory nor in the Hugging Face cache")
    assert "hf download owner/missing" in line and "pass the checkpoint directory" in line
    assert not (tmp_path / "b").exists()
    assert time.monotonic() - start < 60  # no retries: the time is the interpreter's start and imports


def _one_error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_missing_revision_names_the_cached_ones(cache, no_network, tmp_path, capsys):
    line = _one_error(capsys, "build", "--model", "owner/tiny@v9", "--out", str(tmp_path / "b"))
    assert "owner/tiny@v9" in line and "revision 'v9' is not cached (cached: main, v1)" in line
    assert "hf download owner/tiny --revision v9" in line


def test_snapshot_without_config_or_weights_is_one_line(cache, checkpoint, no_network, tmp_path, capsys):
    root = cache[0]
    cache_model(root, "owner/noconfig", checkpoint("llama"), drop=("config.json",))
    cache_model(root, "owner/noweights", checkpoint("llama"), drop=("model.safetensors",))
    line = _one_error(capsys, "build", "--model", "owner/noconfig", "--out", str(tmp_path / "b"))
    assert "owner/noconfig" in line and "has no config.json" in line and "hf download owner/noconfig" in line
    line = _one_error(capsys, "build", "--model", "owner/noweights", "--out", str(tmp_path / "b"))
    assert line.startswith("error: owner/noweights (from the Hugging Face cache):") and "has no weights" in line
    with pytest.raises(HubCacheError):
        resolve_model("owner/noconfig")


def test_hub_source_names_a_snapshot_by_id_and_commit(cache, checkpoint):
    root, main_commit, _ = cache
    assert hub_source(_snapshot(root, main_commit)) == f"owner/tiny@{main_commit}"
    assert hub_source(checkpoint("llama")) is None
    assert resolve_model(f"owner/tiny@{main_commit}").resolve() == _snapshot(root, main_commit)


def test_help_names_hub_ids(capsys):
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    assert "hub id in the local Hugging Face cache" in " ".join(capsys.readouterr().out.split())


def test_build_from_the_cache_validates_and_records_the_id(cache, tmp_path, capsys):
    root, main_commit, _ = cache
    out = tmp_path / "b"
    env = {**os.environ, "HF_HUB_CACHE": str(root), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "export", "build", "--model", "owner/tiny", "--out", str(out), *TINY_BUILD],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = read(out)
    assert manifest.validation is not None and manifest.validation.passed
    assert manifest.model.source == f"owner/tiny@{main_commit}"
    # `validate` finds the checkpoint again from the recorded id (HF_HUB_CACHE is set by the fixture).
    assert main(["validate", str(out)]) == 0, capsys.readouterr().err
