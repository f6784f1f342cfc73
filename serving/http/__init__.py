"""A local HTTP server for a build: an OpenAI-compatible chat API, metrics and a web page (docs/serving.md).

    python -m serving --build builds/default            # http://127.0.0.1:8000/

Torch-free, like the rest of runtime/; needs the `serve` extra (FastAPI, uvicorn, prometheus-client).
"""

from serving.http.config import ServeConfig, ServeConfigError

__all__ = ["ServeConfig", "ServeConfigError", "create_app"]


def create_app(*args, **kwargs):  # type: ignore[no-untyped-def]
    """serving.http.app.create_app, imported on first use (FastAPI is an optional extra)."""
    from serving.http.app import create_app as create

    return create(*args, **kwargs)
