"""A fake `tensorrt` module for the engine builder's tests: the builder, parser and network calls the
builder makes, recorded, with the version's API (8.6 bindings or 10.x named tensors) and its failures.

The parser reads a graph's input shapes from a JSON stand-in (`{"inputs": {name: shape}}`) or from a real
ONNX file. Like TensorRT, the builder checks the optimization profiles (each gives every dynamic input a
min <= opt <= max range of the input's rank that keeps its static axes) and fails the build otherwise. Its
plan is JSON (`plan_json`): the graph's file, its inputs and its profiles, which tests/fake_cuda.py's runtime
reads back, so an engine "built" here serves exactly the profiles the builder was given.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any


def network_inputs(path: str) -> dict[str, list[int]]:
    """Input name -> shape (-1 on dynamic axes) of a JSON stand-in or a real ONNX graph."""
    try:
        return json.loads(Path(path).read_text())["inputs"]
    except (UnicodeDecodeError, json.JSONDecodeError):
        import onnx

        graph = onnx.load(path, load_external_data=False).graph
        initializers = {t.name for t in graph.initializer}
        return {
            i.name: [d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim]
            for i in graph.input
            if i.name not in initializers
        }


def plan_json(plan: bytes) -> dict[str, Any]:
    """A fake plan's content: file (the .onnx), inputs (name -> shape) and profiles (name -> [min, opt, max])."""
    return json.loads(plan)


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
    calls: dict[str, list[Any]] = {"networks": [], "configs": [], "builds": [], "errors": []}

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags, self.inputs, self.file = flags, [], ""

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
            inputs = network_inputs(path)
            self.network.inputs = [types.SimpleNamespace(name=n, shape=tuple(s)) for n, s in inputs.items()]
            self.network.file = Path(path).name
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
            for lo, opt, hi in profile.shapes.values():  # TensorRT's own partial check: -1 for an invalid profile
                same_rank = len(lo) == len(opt) == len(hi)
                ordered = same_rank and all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True))
                if not ordered:
                    return -1
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
            for i, profile in enumerate(config.profiles):
                for tensor in network.inputs:
                    if -1 not in tensor.shape:
                        continue
                    ranges = profile.shapes.get(tensor.name)
                    fits = ranges is not None and all(
                        len(shape) == len(tensor.shape)
                        and all(d == s for d, s in zip(tensor.shape, shape, strict=True) if d >= 0)
                        for shape in ranges
                    )
                    if not fits:
                        calls["errors"].append(f"profile {i} gives {tensor.name} no valid range")
                        return None
            if any(-1 in t.shape for t in network.inputs) and not config.profiles:
                calls["errors"].append("a network with dynamic inputs needs an optimization profile")
                return None
            profiles = [{n: [list(s) for s in r] for n, r in p.shapes.items()} for p in config.profiles]
            inputs = {t.name: list(t.shape) for t in network.inputs}
            return json.dumps({"file": network.file, "inputs": inputs, "profiles": profiles}).encode()

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
