"""Serve a build over HTTP: an OpenAI-compatible chat API, metrics and a web page.

python -m serving --build builds/default [--host 127.0.0.1] [--port 8000]
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

from buildformat import ManifestError
from runtime.backend import BackendError
from serving.http.config import ServeConfig, ServeConfigError

API_KEY_ENV = "COREMATCHING_API_KEY"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, default=Path("builds/default"), help="build directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--provider", default="auto", help="auto (TensorRT, CUDA, then CPU), tensorrt, cuda or cpu")
    parser.add_argument("--backend", default="auto", help="auto, onnxruntime or tensorrt")
    parser.add_argument(
        "--max-queue", type=int, default=16, help="requests waiting behind the running one before 429 (default 16)"
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds a request may take, queueing included (0: no limit)"
    )
    parser.add_argument(
        "--allow-local-files", action="store_true", help="accept image_url values that are paths on this machine"
    )
    parser.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body in MB (default 20)")
    parser.add_argument("--max-image-pixels", type=int, default=50_000_000, help="largest image (default 50 Mpx)")
    parser.add_argument("--default-max-tokens", type=int, default=64, help="answer length without max_tokens")
    parser.add_argument("--model-name", help="the model id clients send (default: the build directory's name)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"require Authorization: Bearer KEY on every request but /health and the page (default: ${API_KEY_ENV}; "
        "the variable keeps the key out of the process list)",
    )
    parser.add_argument("--metrics-open", action="store_true", help="serve /metrics without the API key")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        import uvicorn

        from serving.http.app import create_app
    except ImportError as e:
        print(
            f"error: the server needs the serve extra ({e.name} is missing): pip install -e '.[serve]'", file=sys.stderr
        )
        return 2
    try:
        config = ServeConfig(
            build=args.build,
            host=args.host,
            port=args.port,
            provider=args.provider,
            backend=args.backend,
            max_queue=args.max_queue,
            timeout=args.timeout,
            allow_local_files=args.allow_local_files,
            max_body_bytes=int(args.max_body_mb * 1024 * 1024),
            max_image_pixels=args.max_image_pixels,
            default_max_tokens=args.default_max_tokens,
            model_name=args.model_name,
            api_key=args.api_key,
            metrics_open=args.metrics_open,
        )
        if config.api_key is None and not config.loopback:
            print(
                f"warning: listening on {config.host} without an API key: anyone who reaches this port can use the "
                f"model; set --api-key or {API_KEY_ENV}",
                file=sys.stderr,
            )
        app = create_app(config)  # loads and checks the build before the port is taken
    except (ServeConfigError, ManifestError, BackendError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:  # uvicorn exits on its own when it cannot bind: check first, for a one-line error
        with socket.create_server((config.host, config.port)):
            pass
    except OSError as e:
        print(
            f"error: cannot listen on {config.host}:{config.port} ({e.strerror}); pick another --port", file=sys.stderr
        )
        return 2
    print(f"serving {config.model_id} on http://{config.host}:{config.port}/ (Ctrl-C stops)", flush=True)
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level="info" if args.verbose else "warning")
    except OSError as e:  # the port is taken, or the address is not this machine's
        print(
            f"error: cannot listen on {config.host}:{config.port} ({e.strerror}); pick another --port", file=sys.stderr
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
