"""Reading, writing and checking a build directory's manifest.json (torch-free).

`read` checks the format version and parses the typed `Manifest`; `verify` checks the manifest's
own digest and the sha256 of every file it lists; `write` stores it atomically with its digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from buildformat.jsonfields import ManifestError
from buildformat.manifest import FORMAT_VERSION, MANIFEST, Manifest


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(build_dir: str | Path) -> dict[str, Any]:
    """The manifest's JSON object, with its format version checked (files are not hashed here)."""
    build = Path(build_dir)
    path = build / MANIFEST
    if not build.is_dir():
        raise ManifestError(f"build directory {build} does not exist; run `python -m export build --out {build}`")
    if not path.is_file():
        raise ManifestError(f"{build} has no {MANIFEST}, so it is not a finished build; rebuild it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON ({e}); rebuild the build directory") from e
    version = data.get("format_version") if isinstance(data, dict) else None
    if not isinstance(version, int):
        raise ManifestError(f"{path} has no format_version; rebuild the build directory")
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"{path} is format version {version}, newer than this tool's {FORMAT_VERSION}; update the project"
        )
    if version < FORMAT_VERSION:
        raise ManifestError(
            f"{path} is format version {version}, older than {FORMAT_VERSION} (its prefill and decode graphs "
            f"each held the decoder weights); rebuild it with `python -m export build --out {build} --force`"
        )
    return data


def read(build_dir: str | Path) -> Manifest:
    """The typed manifest of a build (format version and field types checked, files not hashed)."""
    data = read_json(build_dir)
    manifest = Manifest.from_json(data)
    if data.get("integrity") != digest(data):
        raise ManifestError(
            f"{Path(build_dir) / MANIFEST} was edited after the build (its integrity digest differs); rebuild it"
        )
    return manifest


def digest(data: Mapping[str, Any]) -> str:
    """sha256 of the manifest's JSON without its `integrity` field (canonical JSON)."""
    body = {key: value for key, value in data.items() if key != "integrity"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify(build_dir: str | Path, manifest: Manifest, only: Iterable[str] | None = None) -> None:
    """Checks the sha256 of every file the manifest lists (or of `only` those); names the first that changed."""
    build = Path(build_dir)
    for name in sorted(manifest.files) if only is None else only:
        if name not in manifest.files:
            raise ManifestError(f"{build / MANIFEST} does not list {name}; rebuild the build directory")
        path = build / name
        if not path.is_file():
            raise ManifestError(f"{path} is missing from the build; rebuild it")
        if sha256_file(path) != manifest.files[name]:
            raise ManifestError(f"{path} does not match its sha256 in {MANIFEST}: the file was changed; rebuild it")


def with_files(build_dir: str | Path, manifest: Manifest, names: Iterable[str]) -> Manifest:
    """The manifest with the sha256 of each of `names` (paths relative to the build) recorded."""
    build = Path(build_dir)
    files = dict(manifest.files)
    for name in names:
        if not (build / name).is_file():
            raise ManifestError(f"{build / name} is missing; it cannot be recorded in {MANIFEST}")
        files[name] = sha256_file(build / name)
    return manifest.with_(files=files)


def write(build_dir: str | Path, manifest: Manifest) -> None:
    """Writes manifest.json atomically (a temporary file renamed over the old one), with its digest."""
    build = Path(build_dir)
    data = manifest.to_json()
    data["integrity"] = digest(data)
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".json", dir=build)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())  # a power cut on a Jetson's eMMC must not leave an empty manifest
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a build is shared like any other file
        os.replace(tmp, build / MANIFEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
