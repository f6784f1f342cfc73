"""Typed errors for everything a user supplies to the reference."""

from __future__ import annotations


class CoreMatchingError(ValueError):
    """Base class: a user-facing problem with a one-line message naming the problem and the fix."""


class ConfigError(CoreMatchingError):
    """A CoreMatching setting is out of range; the message names the setting and what is allowed."""


class InputError(CoreMatchingError):
    """The prompt or the image cannot be run (no image placeholder, batch larger than 1, ...)."""
