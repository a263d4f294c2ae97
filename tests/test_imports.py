"""sam_mlx's modules import one another without a cycle (read from the source with ``ast``, nothing imported).

Two graphs of sam_mlx-internal imports: every import statement, those inside functions too (a function's import
still makes its module depend on the other: ``cli -> ray_data -> cli`` was such a cycle); and the imports run when
a module loads, with the packages Python loads on the way (importing ``sam_mlx.cli.jobs`` runs
``sam_mlx/cli/__init__.py`` first). An import of a module's own package (``import sam_mlx``) is no edge: the
package is being loaded already.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import ROOT

PACKAGE = ROOT / "sam_mlx"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _statements(tree: ast.Module, loading_only: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements of a module; ``loading_only``: those run when it loads (not in functions or
    ``if TYPE_CHECKING:``)."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif loading_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif loading_only and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))
    return found


def _targets(name: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The sam_mlx modules an import statement in module ``name`` names (``from . import x``: x if a module)."""
    if isinstance(node, ast.Import):
        bases = [alias.name for alias in node.names]
        names: list[str] = []
    else:
        if node.level:
            package = name if _is_package(name) else name.rpartition(".")[0]
            package = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
            bases = [f"{package}.{node.module}" if node.module else package]
        else:
            bases = [node.module or ""]
        names = [alias.name for alias in node.names]
    targets = []
    for base in bases:
        while base and base not in MODULES:  # import sam_mlx.a.b as c where only sam_mlx.a is ours
            base = base.rpartition(".")[0]
        if base:
            targets.append(base)
            targets += [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
    return targets


def _graph(loading: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = set()
        for node in _statements(tree, loading):
            for target in _targets(name, node):
                reached = [target, *_ancestors(target)] if loading else [target]  # packages loaded on the way
                edges |= {t for t in reached if t != name and t not in _ancestors(name)}
        graph[name] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_the_cli_package_and_ray_data():
    graph = _graph(loading=False)
    assert {"sam_mlx.cli.jobs", "sam_mlx.cli.work", "sam_mlx.cli.messages"} <= graph["sam_mlx.ray_data"]
    assert "sam_mlx.ray_data" in graph["sam_mlx.cli.run"]  # imported where --ray runs
    assert "sam_mlx.cli" in _graph(loading=True)["sam_mlx.ray_data"]  # the package's __init__ runs first
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


# The command's modules from the bottom up, as docs/architecture.md lists them: each imports only those before it.
CLI_LAYERS = ["messages", "prompts", "jobs", "outputs", "work", "run", "commands", "parsing", "__init__", "__main__"]


def test_the_command_modules_import_only_those_below():
    graph = _graph(loading=False)
    cli = [name for name in MODULES if name.startswith("sam_mlx.cli")]
    layers = [f"sam_mlx.cli.{layer}" if layer != "__init__" else "sam_mlx.cli" for layer in CLI_LAYERS]
    assert sorted(cli) == sorted(layers)
    for i, name in enumerate(layers):
        assert graph[name] & set(layers) <= set(layers[:i]), f"{name} imports a module above it"
    shared = graph["sam_mlx.ray_data"] & set(layers)  # the lower layer, which must not reach run (it imports Ray)
    assert shared and all(layers.index(name) < layers.index("sam_mlx.cli.run") for name in shared)


@pytest.mark.parametrize("loading", [False, True], ids=["every import", "imports run on loading"])
def test_no_import_cycle(loading):
    cycle = _cycle(_graph(loading))
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"
