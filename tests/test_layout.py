"""The source tree's layering, read from the import statements (no module is imported): no import cycles between the
project's modules, function-level imports included, and the Stable Diffusion layer (sd/) and core/ Lightning-free."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "sd", "lightning_modules", "datamodules", "callbacks", "metrics", "scripts")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = path
    out["train"] = ROOT / "train.py"
    return out


def _imports(path: Path) -> set[str]:
    """Every module named by an import statement anywhere in the file (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def _graph() -> dict[str, set[str]]:
    """module -> the project's modules importing it runs: the module and its packages' ``__init__`` (a module's own
    packages left out: they are already running when it is imported)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            parts = imported.split(".")
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                if target in modules and target != name and not name.startswith(target + "."):
                    targets.add(target)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

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


def test_no_import_cycles_between_the_projects_modules():
    graph = _graph()
    assert "sd.export.folder" in graph and "sd.adapters.lora" in graph["sd.export.folder"]  # the graph is read
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_sd_and_core_are_lightning_free_and_below_the_lightning_layer():
    above = ("lightning", "pytorch_lightning", "lightning_modules", "datamodules", "callbacks", "metrics", "train")
    for name, path in _modules().items():
        if name.split(".")[0] not in ("sd", "core"):
            continue
        bad = sorted(i for i in _imports(path) if i.split(".")[0] in above)
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
        if name.startswith("core"):
            assert not any(i.split(".")[0] == "sd" for i in _imports(path)), f"{name} imports the SD layer"
