"""The manifest's record of the TensorRT engines built from a build's graphs on one machine."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from buildformat.jsonfields import fail, take


@dataclass(frozen=True)
class Engines:
    """TensorRT engines built on one machine (`python -m export engine`): graph -> engine file, and the
    optimization profiles of each engine in TensorRT's order (a decoder stack's "prefill" and "decode", which
    the runtime selects by index; engines recorded before profiles were listed have none here)."""

    tensorrt_version: str
    api: str
    fp16: bool
    workspace_mb: int
    device: Mapping[str, Any]  # the GPU that built them: name, compute capability, memory
    graphs: Mapping[str, str]
    note: str = ""
    profiles: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def device_name(self) -> str:
        return str(self.device.get("name"))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Engines:
        where = "engines"
        graphs, profiles = {}, {}
        for graph, entry in (take(data, "graphs", dict, where)).items():
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                raise fail(f"{where}.graphs.{graph}", "has no engine file")
            graphs[graph] = entry["file"]
            if "profiles" in entry:
                named = entry["profiles"]
                if not isinstance(named, list) or not all(isinstance(n, str) for n in named):
                    raise fail(f"{where}.graphs.{graph}.profiles", "is not a list of profile names")
                profiles[graph] = tuple(named)
        return cls(
            tensorrt_version=str(take(data, "tensorrt_version", (str, int, float), where)),
            api=take(data, "api", str, where),
            fp16=bool(take(data, "fp16", bool, where)),
            workspace_mb=take(data, "workspace_mb", int, where),
            device=dict(take(data, "device", dict, where)),
            graphs=graphs,
            note=str(data.get("note", "")),
            profiles=profiles,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "tensorrt_version": self.tensorrt_version,
            "api": self.api,
            "fp16": self.fp16,
            "workspace_mb": self.workspace_mb,
            "device": dict(self.device),
            "graphs": {
                g: {"file": f} | ({"profiles": list(self.profiles[g])} if g in self.profiles else {})
                for g, f in self.graphs.items()
            },
            "note": self.note,
        }
