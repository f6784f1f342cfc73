"""Stop strings: an answer's text cut before the first of them, found across streamed pieces.

A stop string can span several tokens, so the text that could still begin one is held back until the
next piece settles it: what `push` returns never contains the start of a stop string, and the
concatenation of everything returned is the answer's text up to the first stop string (none of it).
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_STOPS = 4  # OpenAI's limit on `stop`


class StopError(ValueError):
    """Stop strings the generation cannot use; the message names the fix."""


def check_stops(stops: Sequence[str]) -> tuple[str, ...]:
    """The stop strings, checked: at most MAX_STOPS non-empty strings."""
    stops = tuple(stops)
    if len(stops) > MAX_STOPS:
        raise StopError(f"stop takes at most {MAX_STOPS} strings, got {len(stops)}; drop some")
    for stop in stops:
        if not isinstance(stop, str) or not stop:
            raise StopError(f"each stop must be a non-empty string, got {stop!r}")
    return stops


class StopText:
    """One answer's text through its stop strings."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = check_stops(stops)
        self.held = ""  # the end of the text so far that begins some stop string
        self.stopped = False

    def first(self, text: str) -> int | None:
        """Where the first stop string in `text` begins; None if there is none."""
        found = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        return min(found) if found else None

    def push(self, piece: str) -> str:
        """The text that is now certain to come before any stop string; `stopped` once one is found."""
        assert not self.stopped, "push after the stop string was found"
        text = self.held + piece
        at = self.first(text)
        if at is not None:
            self.stopped, self.held = True, ""
            return text[:at]
        # The longest end of `text` that a stop string begins with: it might be completed by the next piece.
        keep = max((n for stop in self.stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def finish(self, last: str) -> str:
        """At the answer's end: the last piece through the stop strings, then the held text, which no stop
        string completed."""
        out = self.push(last)
        if not self.stopped:
            out, self.held = out + self.held, ""
        return out
