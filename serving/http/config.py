"""The server's settings (`python -m serving --help`), checked once at start."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

PROVIDERS = ("auto", "tensorrt", "cuda", "cpu")
BACKENDS = ("auto", "onnxruntime", "tensorrt")


class ServeConfigError(ValueError):
    """A server setting is out of range; the message names the flag."""


@dataclass(frozen=True)
class ServeConfig:
    build: Path
    host: str = "127.0.0.1"
    port: int = 8000
    provider: str = "auto"
    backend: str = "auto"
    # Requests waiting behind the one being answered; one more gets 429 with Retry-After.
    max_queue: int = 16
    # Seconds from arrival to the last token (queueing included); 0 means no bound.
    timeout: float = 300.0
    # Accept `image_url` values that are paths on the server's disk (off: only `data:` URLs).
    allow_local_files: bool = False
    # Request bodies over this many bytes get 413 (a 20 MB body holds a ~15 MB image as base64).
    max_body_bytes: int = 20 * 1024 * 1024
    # Images over this many pixels get 400 (decompression bombs), as the runtime's own limit.
    max_image_pixels: int = 50_000_000
    # The answer length when a request gives no max_tokens.
    default_max_tokens: int = 64
    # The id clients send as `model`; None: the build directory's name.
    model_name: str | None = None
    # Requests must carry `Authorization: Bearer <api_key>` (not /health, not the page); None: open.
    # Kept out of repr so that no log or error message shows it.
    api_key: str | None = field(default=None, repr=False)
    # /metrics without the key (for a Prometheus scraper on a trusted network).
    metrics_open: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ServeConfigError(f"--port must be in 1..65535, got {self.port}")
        if self.provider not in PROVIDERS:
            raise ServeConfigError(f"--provider must be one of {', '.join(PROVIDERS)}, got {self.provider!r}")
        if self.backend not in BACKENDS:
            raise ServeConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.max_queue < 0:
            raise ServeConfigError(f"--max-queue must be 0 or more, got {self.max_queue}")
        if not self.timeout >= 0:
            raise ServeConfigError(f"--timeout must be 0 (no limit) or a number of seconds, got {self.timeout}")
        if self.max_body_bytes < 1024:
            raise ServeConfigError(f"--max-body-mb is too small ({self.max_body_bytes} bytes); allow at least 1 KB")
        if self.max_image_pixels < 1:
            raise ServeConfigError(f"--max-image-pixels must be positive, got {self.max_image_pixels}")
        if self.api_key is not None and (not self.api_key or self.api_key != self.api_key.strip()):
            raise ServeConfigError("--api-key must be non-empty and have no surrounding whitespace")
        if self.default_max_tokens < 1:
            raise ServeConfigError(f"--default-max-tokens must be at least 1, got {self.default_max_tokens}")

    @property
    def loopback(self) -> bool:
        """Whether `host` is reachable from this machine only."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name: it may resolve to any interface
            return False

    @property
    def model_id(self) -> str:
        return self.model_name or Path(self.build).resolve().name
