"""Moved: the HTTP server is `python -m serving` (package `serving.http`)."""
