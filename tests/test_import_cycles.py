"""No import cycles between Fieldlink's modules (issue 14), checked on the source.

Every module of the production packages is parsed with `ast`, never imported. An import counts
wherever it is written: at top level, inside a function and under `if TYPE_CHECKING:`, because
a cycle hidden in a function is still a knot a reader has to untie, and one hidden under
TYPE_CHECKING turns into a real one the day somebody needs the name at run time.
`from pkg import name` is an edge to `pkg.name` when that is a module, else to `pkg`. Importing
a submodule also runs its parents' `__init__`, but that implicit edge is not counted: otherwise
every package that re-exports one of its modules would be a cycle.

The test fails, naming the modules, when any strongly connected component of the graph holds
more than one module, or when a module imports itself.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

from tests.test_imports import _resolve_relative

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocols", "device_profiles", "runtime", "edge_agent", "central", "firmware_stubs")

Graph = dict[str, set[str]]


def module_files(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Every module of the packages that exist under `root`, by dotted name."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if path.name == "__init__.py":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _target(name: str, known: Mapping[str, Path]) -> str | None:
    """`name` if it is one of our modules, else its nearest known parent, else None."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(source: str, module: str, is_package: bool, known: Mapping[str, Path]) -> set[str]:
    """The project modules that `source` (module `module`) imports, wherever it imports them."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (
                _resolve_relative(module, is_package, node.level, node.module)
                if node.level else node.module or ""
            )
            # `from pkg import name`: the submodule when `name` is one, else the package.
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        else:
            continue
        found |= {target for name in names if (target := _target(name, known)) is not None}
    return found


def import_graph(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> Graph:
    """Module name → the project modules it imports."""
    known = module_files(root, packages)
    return {
        module: imports_of(path.read_text(encoding="utf-8"), module,
                           path.name == "__init__.py", known)
        for module, path in known.items()
    }


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's strongly connected components, iterative (deep graphs must not hit recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component: list[str] = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def cycles(graph: Graph) -> list[str]:
    """Each knot in the graph as one line: a component of several modules, or a self-import."""
    found = [
        " <-> ".join(component)
        for component in strongly_connected(graph)
        if len(component) > 1 or component[0] in graph.get(component[0], ())
    ]
    return sorted(found)


def test_no_import_cycles() -> None:
    """No module reaches itself through imports, counting those in functions and TYPE_CHECKING."""
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(found)


def test_checker_finds_cycles(tmp_path: Path) -> None:
    """Cycles through a function body, TYPE_CHECKING, `from pkg import module` and self are found."""
    pkg = tmp_path / "central"
    (pkg / "alarms").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "app.py": "from central.alarms import api\n",
        "alarms/__init__.py": "from .api import install\n",  # parent of api: not a cycle
        "alarms/api.py": "def install():\n    from .. import app\n",
        "alarms/desk.py": "from typing import TYPE_CHECKING\n"
                          "if TYPE_CHECKING:\n    from central.alarms.rules import Rule\n",
        "alarms/rules.py": "import central.alarms.desk\n",
        "lone.py": "from central import lone\n",
        "fine.py": "import json\nfrom central.alarms import install\nfrom central import app\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(tmp_path, ["central"])
    assert graph["central.alarms"] == {"central.alarms.api"}
    assert graph["central.fine"] == {"central.alarms", "central.app"}
    assert cycles(graph) == [
        "central.alarms.api <-> central.app",
        "central.alarms.desk <-> central.alarms.rules",
        "central.lone",
    ]
