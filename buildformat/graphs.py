"""The manifest's records of the graphs: each one's files, inputs and outputs, and the ranges of their
symbolic dimensions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from buildformat.jsonfields import ManifestError, fail, take


@dataclass(frozen=True)
class Dim:
    """The range of one symbolic dimension of the graphs (TensorRT profiles use min/opt/max)."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.opt <= self.max:
            raise fail("dims", f"has a range that is not min <= opt <= max ({self.min}, {self.opt}, {self.max})")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # ints for static axes, names of `Manifest.dims` for dynamic ones


@dataclass(frozen=True)
class GraphInfo:
    file: str
    external_data: str | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def files(self) -> list[str]:
        """The .onnx and, where the weights are external, the weights file."""
        return [self.file] + ([self.external_data] if self.external_data else [])

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise ManifestError(f"the manifest lists no input {name!r} of {self.file}; rebuild the build directory")

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> GraphInfo:
        def specs(key: str) -> tuple[TensorSpec, ...]:
            out = []
            for item in take(data, key, list, where):
                if not isinstance(item, dict) or not {"name", "dtype", "shape"} <= item.keys():
                    raise fail(f"{where}.{key}", "holds an entry without name, dtype and shape")
                out.append(TensorSpec(str(item["name"]), str(item["dtype"]), tuple(item["shape"])))
            return tuple(out)

        return cls(
            file=take(data, "file", str, where),
            external_data=take(data, "external_data", str, where, optional=True),
            inputs=specs("inputs"),
            outputs=specs("outputs"),
        )

    def to_json(self) -> dict[str, Any]:
        def specs(items: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
            return [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in items]

        out: dict[str, Any] = {"file": self.file}
        if self.external_data:
            out["external_data"] = self.external_data
        return out | {"inputs": specs(self.inputs), "outputs": specs(self.outputs)}
