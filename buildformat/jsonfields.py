"""How the manifest's JSON is read: one line naming the wrong field, and the fix (rebuild)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ManifestError(ValueError):
    """A build directory is missing, incomplete, tampered with or of an unknown format."""


def fail(where: str, problem: str) -> ManifestError:
    return ManifestError(f"manifest field {where} {problem}; rebuild the build directory")


def take(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str, optional: bool = False) -> Any:
    if key not in data or data[key] is None:
        if optional:
            return None
        raise fail(f"{where}.{key}", "is missing")
    value = data[key]
    if isinstance(value, bool) and kind is int:  # JSON true is not a count
        raise fail(f"{where}.{key}", f"should be an integer, not {value!r}")
    if not isinstance(value, kind):
        raise fail(f"{where}.{key}", f"has the wrong type ({type(value).__name__})")
    return value


def section(data: Mapping[str, Any], key: str, where: str = "manifest") -> Mapping[str, Any]:
    return take(data, key, dict, where)
