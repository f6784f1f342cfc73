"""The packages' layering (docs/architecture.md): no import runs back up a floor, no import circle, and the
torch-free packages stay torch-free. Read from the source, lazy imports included."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each top-level package and its floor: a package imports only packages on lower floors (docs/architecture.md's
# table). Packages on one floor never import each other.
FLOORS: dict[str, int] = {
    "buildformat": 0,  # the build format: the one contract, the standard library only
    "runtime": 1,  # the torch-free runtime
    "coreMatching": 1,  # the method in PyTorch
    "vqadata": 1,  # question data: the shapes dataset, JSONL items
    "models": 2,  # checkpoints, presets, the default model
    "export": 3,  # checkpoint -> validated build; TensorRT engines
    "planner": 3,  # the memory planner
    "serving": 3,  # HTTP server and Triton repository
    "bench": 4,  # benchmarks, the HTTP load tester, the Triton throughput client
    "evaluation": 4,  # the accuracy evaluation
    "training": 4,  # training the default model
    "scripts": 5,  # entry points for the jobs above
}
# What each torch-free package may not import, even lazily (a Jetson board installs no torch).
TORCH_FREE = ("buildformat", "runtime", "serving", "planner")
HEAVY = ("torch", "transformers", "onnx", "onnx_graphsurgeon", "onnxscript")


def _sources() -> Iterator[tuple[str, Path]]:
    for package in FLOORS:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield package, path


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> Iterator[tuple[str, list[str]]]:
    """(absolute module, imported names) of every import statement in the file, wherever it stands."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield base, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def test_every_package_has_a_floor() -> None:
    ours = {p.parent.name for p in ROOT.glob("*/__init__.py")} | {"scripts"}
    assert ours <= set(FLOORS), f"add {sorted(ours - set(FLOORS))} to FLOORS and to docs/architecture.md"


def test_no_import_runs_back_up_a_floor() -> None:
    wrong = []
    for package, path in _sources():
        for module, _ in _imports(path):
            top = module.split(".")[0]
            if top in FLOORS and top != package and FLOORS[top] >= FLOORS[package]:
                wrong.append(
                    f"{path.relative_to(ROOT)} imports {module} ({package} floor {FLOORS[package]}, "
                    f"{top} floor {FLOORS[top]})"
                )
    assert not wrong, "\n".join(wrong)


def test_torch_free_packages_import_nothing_heavy_in_the_source() -> None:
    wrong = []
    for package, path in _sources():
        if package not in TORCH_FREE:
            continue
        for module, _ in _imports(path):
            if module.split(".")[0] in HEAVY:
                wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_no_package_imports_another_packages_private_names() -> None:
    wrong = []
    for package, path in _sources():
        for module, names in _imports(path):
            top = module.split(".")[0]
            private = [n for n in names if n.startswith("_")]
            if top in FLOORS and top != package and private:
                wrong.append(f"{path.relative_to(ROOT)} imports {private} from {module}")
    assert not wrong, "\n".join(wrong)


def _module_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (`from a import b` names a.b where a/b.py exists)."""
    modules = {_module_name(path) for _, path in _sources() if path.parent.name != "scripts"}
    graph: dict[str, set[str]] = {}
    for package, path in _sources():
        if package == "scripts":
            continue
        here = _module_name(path)
        edges = set()
        for module, names in _imports(path):
            for name in names or [""]:
                target = f"{module}.{name}" if name and f"{module}.{name}" in modules else module
                if target in modules and target != here:
                    edges.add(target)
        graph[here] = edges
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_between_modules() -> None:
    circles = _circles(_module_graph())
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_the_circle_finder_finds_a_circle() -> None:
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", TORCH_FREE)
def test_torch_free_packages_import_without_torch(package: str) -> None:
    # Triton's model and local server run inside Triton's own environment (its Python backend, pytriton).
    modules = sorted(
        _module_name(p) for p in (ROOT / package).rglob("*.py") if p.name != "__main__.py" and p.parent.name != "triton"
    )
    code = (
        f"import sys; import {', '.join(modules)}; "
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {(*HEAVY, 'export')!r}); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_the_docs_tables_list_every_package_on_its_floor() -> None:
    """docs/architecture.md's layering table gives each package the floor this test holds it to, and the
    README's layout table names every package."""
    rows = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].isdigit():
            rows[cells[1].strip("`/")] = int(cells[0])
    assert rows == FLOORS
    readme = (ROOT / "README.md").read_text()
    missing = [p for p in FLOORS if f"| `{p}/` |" not in readme]
    assert not missing, f"README's layout table lacks {missing}"
