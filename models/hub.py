"""Turn a `--model` value into a local checkpoint directory: a directory as given, or a Hugging Face hub id
(`owner/name`, `owner/name@revision`) found in the local Hugging Face cache, never on the network.

The cache is read the way `huggingface_hub` reads it offline: `models--{owner}--{name}/refs/{revision}` holds a
commit hash and `snapshots/{commit}/` is the checkpoint (its files are links into `blobs/`); a revision that is
itself a commit hash names its snapshot directly. `huggingface_hub.snapshot_download(local_files_only=True)`
does the look-up where the package is installed (it comes with transformers), so a snapshot that the cache's
own file list shows to be partial is refused as it would be by transformers; without the package the same
layout is read here.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import overload

from models.loading import ModelLoadError, check_model_dir

logger = logging.getLogger(__name__)

DEFAULT_REVISION = "main"
# owner/name as the hub spells them, then an optional @revision (a branch, a tag, or a commit hash).
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w.][\w./-]*))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_REPO_FOLDER = "models--"  # the cache's folder of a model repo: models--{owner}--{name}


class HubCacheError(ModelLoadError):
    """A hub id is not in the local Hugging Face cache, or its snapshot there is incomplete."""


@dataclass(frozen=True)
class HubId:
    """A model repository on the Hugging Face hub, at a revision (a branch, a tag or a commit hash)."""

    repo_id: str
    revision: str = DEFAULT_REVISION

    @classmethod
    def parse(cls, value: str) -> HubId | None:
        """The hub id `value` spells (`owner/name` or `owner/name@revision`), or None if it is not shaped like one."""
        match = _HUB_ID.fullmatch(value)
        # The hub refuses "--" and ".." in names; ".." in a revision would lead out of the cache's refs/.
        if match is None or "--" in match["repo"] or ".." in match[0]:
            return None
        return cls(match["repo"], match["revision"] or DEFAULT_REVISION)

    def __str__(self) -> str:
        return self.repo_id if self.revision == DEFAULT_REVISION else f"{self.repo_id}@{self.revision}"

    @property
    def folder(self) -> str:
        """The repository's folder in the cache."""
        return _REPO_FOLDER + self.repo_id.replace("/", "--")

    @property
    def download_hint(self) -> str:
        revision = "" if self.revision == DEFAULT_REVISION else f" --revision {self.revision}"
        return f"hf download {self.repo_id}{revision}"


def hub_cache_dir() -> Path:
    """The hub cache transformers reads: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub.

    Read from the environment on every call: `huggingface_hub.constants` fixes its copy at import time, which
    would miss a variable set afterwards (by a caller, or a test).
    """
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")  # the second: older name
    if not cache:
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
        )
        cache = os.path.join(home, "hub")
    return Path(os.path.expandvars(cache)).expanduser()


def _missing(hub_id: HubId, cache: Path, why: str = "") -> HubCacheError:
    where = f"in the Hugging Face cache ({cache})" if not why else f"in the Hugging Face cache ({cache}): {why}"
    return HubCacheError(
        f"{hub_id} is neither a directory nor {where}; download it on a machine with network "
        f"({hub_id.download_hint}) and copy the cache folder, or pass the checkpoint directory"
    )


def _cached_revisions(repo: Path) -> str:
    refs = sorted(p.relative_to(repo / "refs").as_posix() for p in (repo / "refs").rglob("*") if p.is_file())
    return ", ".join(refs) or "none"


def _snapshot_by_layout(hub_id: HubId, cache: Path) -> Path | None:
    """The snapshot of `hub_id` read from the cache's layout, for an environment without huggingface_hub."""
    repo = cache / hub_id.folder
    commit = hub_id.revision
    if not _COMMIT.fullmatch(commit):
        ref = repo / "refs" / hub_id.revision
        if not ref.is_file():
            return None
        commit = ref.read_text(encoding="utf-8").strip()
    snapshot = repo / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def _snapshot(hub_id: HubId, cache: Path) -> Path:
    """The snapshot directory of `hub_id` in `cache`; raises `HubCacheError` if there is none."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError:
        found = _snapshot_by_layout(hub_id, cache)
    else:
        try:
            # local_files_only: no request is made, so a missing id fails at once instead of after retries.
            found = Path(
                snapshot_download(hub_id.repo_id, revision=hub_id.revision, cache_dir=cache, local_files_only=True)
            )
        except HFValidationError:
            found = None
        except LocalEntryNotFoundError as e:
            partial = getattr(e, "snapshot_path", None)  # IncompleteSnapshotError (huggingface_hub 1.2 and later)
            if partial:
                raise HubCacheError(
                    f"{hub_id}: its snapshot in the Hugging Face cache ({partial}) is incomplete (an interrupted "
                    f"download); download it again on a machine with network ({hub_id.download_hint}) and copy "
                    "the cache folder, or pass the checkpoint directory"
                ) from None
            found = None
    if found is not None:
        return found
    repo = cache / hub_id.folder
    if repo.is_dir():
        raise _missing(hub_id, cache, f"revision {hub_id.revision!r} is not cached (cached: {_cached_revisions(repo)})")
    raise _missing(hub_id, cache)


@overload
def resolve_model(value: None) -> None: ...
@overload
def resolve_model(value: str | Path) -> Path: ...
def resolve_model(value: str | Path | None) -> Path | None:
    """The checkpoint directory a `--model` value names; None stays None (the caller's default model).

    An existing path is returned as given (the loader checks it, as before). A value shaped like a hub id
    (`owner/name[@revision]`) that is no path is looked up in the local Hugging Face cache (`hub_cache_dir`)
    without the network; its snapshot must be a complete llava-hf checkpoint (`check_model_dir`). Anything
    else is returned for the loader to refuse. Raises `HubCacheError` (a `ModelLoadError`) with one line that
    names the problem and the fix.
    """
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.exists():
        return path
    hub_id = HubId.parse(str(value))
    if hub_id is None:
        return path
    cache = hub_cache_dir()
    snapshot = _snapshot(hub_id, cache)
    if not (snapshot / "config.json").is_file():
        raise HubCacheError(
            f"{hub_id}: its snapshot in the Hugging Face cache ({snapshot}) has no config.json (a partial "
            f"download); download it again on a machine with network ({hub_id.download_hint}), or pass the "
            "checkpoint directory"
        )
    try:
        check_model_dir(snapshot)
    except ModelLoadError as e:
        # Refused here, before a caller starts work, and named by the id the user typed.
        raise HubCacheError(f"{hub_id} (from the Hugging Face cache): {e}") from None
    logger.info("%s: using %s", hub_id, snapshot)
    return snapshot


def hub_source(model_dir: Path) -> str | None:
    """`owner/name@commit` when `model_dir` is a snapshot of the hub cache's layout, else None.

    A build records this rather than the snapshot's path: it names the checkpoint on any machine whose cache
    holds that commit, and `resolve_model` turns it back into the directory.
    """
    snapshots = model_dir.parent
    repo = snapshots.parent.name
    if snapshots.name != "snapshots" or not repo.startswith(_REPO_FOLDER):
        return None
    parts = repo[len(_REPO_FOLDER) :].split("--")
    if len(parts) != 2 or not all(parts):
        return None
    hub_id = HubId.parse(f"{parts[0]}/{parts[1]}@{model_dir.name}")
    return None if hub_id is None else f"{hub_id.repo_id}@{hub_id.revision}"
