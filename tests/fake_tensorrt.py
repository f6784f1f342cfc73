"""A fake `tensorrt` module for the engine builder's tests: the builder, parser and network calls the
builder makes, recorded, with the version's API (8.6 bindings or 10.x named tensors) and its failures."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any


def fake_trt(
    version: str = "10.3.0",
    *,
    fp16_flag: bool = True,
    fast_fp16: bool = True,
    fail_at: int | None = None,
    parse_ok: bool = True,
) -> types.ModuleType:
    """Just enough of the `tensorrt` module for build_engines; `calls` records what the builder was asked."""
    trt = types.ModuleType("tensorrt")
    calls: dict[str, list[Any]] = {"networks": [], "configs": [], "builds": []}

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags, self.inputs = flags, []

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, i: int) -> Any:
            return self.inputs[i]

    class OnnxParser:
        def __init__(self, network: Network, logger: Any) -> None:
            self.network, self.errors = network, []

        def parse_from_file(self, path: str) -> bool:
            if not parse_ok:
                self.errors = ["In node 7 (TopK): K = 4403 exceeds 3840", "network has no outputs"]
                return False
            inputs = json.loads(Path(path).read_text())["inputs"]
            self.network.inputs = [types.SimpleNamespace(name=n, shape=tuple(s)) for n, s in inputs.items()]
            return True

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> str:
            return self.errors[i]

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[Any, ...]] = {}

        def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
            self.shapes[name] = (lo, opt, hi)

    class Config:
        def __init__(self) -> None:
            self.flags: set[str] = set()
            self.pools: dict[str, int] = {}
            self.profiles: list[Profile] = []
            calls["configs"].append(self)

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            self.pools[pool] = size

        def set_flag(self, flag: str) -> None:
            self.flags.add(flag)

        def add_optimization_profile(self, profile: Profile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class Builder:
        platform_has_fast_fp16 = fast_fp16

        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def create_network(self, flags: int) -> Network:
            calls["networks"].append(Network(flags))
            return calls["networks"][-1]

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            calls["builds"].append(network)
            if fail_at == len(calls["builds"]):
                return None
            return b"PLAN:" + ",".join(t.name for t in network.inputs).encode()

    class Logger:
        WARNING = "warning"

        def __init__(self, severity: str) -> None:
            self.severity = severity

    trt.__version__ = version
    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16") if fp16_flag else types.SimpleNamespace()
    trt.calls = calls
    return trt
