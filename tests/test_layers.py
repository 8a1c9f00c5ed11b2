"""The package's layers point one way: every import (at the top of a module or inside a function) goes to the
same layer or one below, and the module graph has no cycle (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cfmae_cli"

# Lowest first. A module belongs to the layer of the longest prefix that names it (the package itself,
# ``cfmae_cli``, only by name: a new top-level module must be placed here).
LAYERS = [
    ["cfmae_cli", "cfmae_cli.errors", "cfmae_cli.formats", "cfmae_cli.seeding", "cfmae_cli.checkpoints",
     "cfmae_cli.modalities", "cfmae_cli.procs", "cfmae_cli.ownership", "cfmae_cli.hub"],
    ["cfmae_cli.config", "cfmae_cli.config_sizes", "cfmae_cli.config_schema", "cfmae_cli.config_loading",
     "cfmae_cli.config_stored"],
    ["cfmae_cli.data", "cfmae_cli.masking", "cfmae_cli.model"],
    ["cfmae_cli.viz"],
    ["cfmae_cli.labeling"],
    ["cfmae_cli.train"],
    ["cfmae_cli.eval"],
    ["cfmae_cli.bench"],
    ["cfmae_cli.api"],
    ["cfmae_cli.cli", "cfmae_cli.__main__"],
]
# Within a layer, packages stand side by side: the data, the masks and the model know nothing of each other.
# And fine-tuning does not draw (viz is for the commands that show a model).
FORBIDDEN = [("cfmae_cli.model", "cfmae_cli.data"), ("cfmae_cli.model", "cfmae_cli.masking"),
             ("cfmae_cli.data", "cfmae_cli.model"), ("cfmae_cli.data", "cfmae_cli.masking"),
             ("cfmae_cli.masking", "cfmae_cli.data"), ("cfmae_cli.masking", "cfmae_cli.model"),
             ("cfmae_cli.model", "cfmae_cli.train"), ("cfmae_cli.eval", "cfmae_cli.viz")]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best, level = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            named = module == prefix if prefix == "cfmae_cli" else under(module, prefix)
            if named and len(prefix) > best:
                best, level = len(prefix), i
    assert level is not None, f"{module} is in no layer: add it to LAYERS"
    return level


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cfmae_cli"):
                for alias in node.names:  # `from cfmae_cli.train import distributed` imports a module
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("cfmae_cli"))
        graph[name] = {t for t in targets if t != name}
    return graph


def test_no_import_points_up_a_layer() -> None:
    upward = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
              for a, targets in import_graph().items() for b in sorted(targets) if layer_of(b) > layer_of(a)]
    assert not upward, "\n".join(upward)


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_no_forbidden_import() -> None:
    found = [f"{a} imports {b}" for a, targets in import_graph().items() for b in sorted(targets)
             for low, high in FORBIDDEN if under(a, low) and under(b, high)]
    assert not found, "\n".join(found)


def test_the_module_graph_has_no_cycle() -> None:
    graph = import_graph()
    graph = {a: {b for b in targets if b != "cfmae_cli"} for a, targets in graph.items()}  # the root: __version__
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, "\n".join(cycles)


def test_the_layers_name_every_module() -> None:
    for name in import_graph():
        layer_of(name)


def test_no_module_is_over_400_lines() -> None:
    """A module a reader can hold in mind (docs/architecture.md, "Checks that keep the seams")."""
    long = {str(p.relative_to(PACKAGE)): n for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert not long, f"split these modules along a seam: {long}"
