"""The direction of imports between Fieldlink's packages (DESIGN.md §2), checked on the source.

Every module of each package is parsed with `ast`, never imported, so a forbidden import is
found even in a module whose own imports would fail or start something. An import counts
wherever it is written: at top level, inside a function, under `if TYPE_CHECKING:`, and as a
constant string passed to `importlib.import_module()` or `__import__()`.

One deliberate change from DESIGN.md §2: `firmware_stubs/` may import `device_profiles` as
well as `protocols`, because its simulators simulate profiled devices and read the profiles
to lay out their registers and pick their values.

Beyond the design's list, `protocols/` also may not import a few other modules that only exist
to do I/O or concurrency (socketserver, multiprocessing, concurrent, serial_asyncio, aiosqlite,
asyncpg, psycopg), and no production package may import `tests` or `bench`.

`runtime/` (DESIGN.md §2) holds the I/O plumbing both daemons share; it may import `protocols`
only, and `edge_agent/`, `central/` and `firmware_stubs/` may import it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = frozenset(
    {"protocols", "device_profiles", "edge_agent", "central", "firmware_stubs", "runtime", "tests",
     "bench"}
)
# DESIGN.md §2: the codecs in protocols/ are pure, so nothing that reaches a socket, a serial
# port, a database, a thread or an event loop.
PROTOCOLS_IO = frozenset(
    {
        "asyncio", "socket", "serial", "sqlite3", "sqlite_utils", "threading", "subprocess",
        "selectors", "ssl", "pymodbus", "paho", "aiomqtt",
        "socketserver", "multiprocessing", "concurrent", "serial_asyncio", "aiosqlite",
        "asyncpg", "psycopg",
    }
)


@dataclass(frozen=True, slots=True)
class Rule:
    """What the modules of one package may import from the project and from outside it."""

    package: str
    allowed_project: frozenset[str]
    forbidden_external: frozenset[str] = frozenset()


RULES = {
    rule.package: rule
    for rule in (
        Rule("protocols", frozenset({"protocols"}), PROTOCOLS_IO),
        Rule("device_profiles", frozenset({"protocols", "device_profiles"})),
        Rule("runtime", frozenset({"runtime", "protocols"})),
        Rule("firmware_stubs",
             frozenset({"protocols", "device_profiles", "firmware_stubs", "runtime"})),
        Rule("central", frozenset({"protocols", "device_profiles", "central", "runtime"})),
        Rule("edge_agent", frozenset({"protocols", "device_profiles", "edge_agent", "runtime"})),
    )
}


@dataclass(frozen=True, slots=True)
class Violation:
    path: str
    line: int
    imported: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: imports {self.imported} ({self.reason})"


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of `from {'.' * level}{name} import ...` written in `module`."""
    parts = module.split(".")
    if not is_package:
        parts = parts[:-1]  # a plain module's `.` is its package
    if level - 1 > len(parts) - 1:
        return "." * level + (name or "")  # climbs above the top package: leave it visible
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """Every module name the source imports, absolute, with the line it is written on."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append(
                    (node.lineno, _resolve_relative(module, is_package, node.level, node.module))
                )
            elif node.module:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = (
                func.attr if isinstance(func, ast.Attribute)
                else func.id if isinstance(func, ast.Name) else ""
            )
            first = node.args[0]
            if (name in ("import_module", "__import__") and isinstance(first, ast.Constant)
                    and isinstance(first.value, str) and not first.value.startswith(".")):
                found.append((node.lineno, first.value))
    return sorted(found)  # ast.walk goes breadth first; report in source order


def check_source(source: str, path: str, module: str, rule: Rule,
                 *, is_package: bool = False) -> list[Violation]:
    """The imports in `source` (module `module`, file `path`) that break `rule`."""
    tree = ast.parse(source, filename=path)
    violations = []
    for line, name in imported_names(tree, module, is_package):
        top = name.split(".")[0]
        if name.startswith("."):
            violations.append(Violation(path, line, name, "relative import above the package"))
        elif top in PROJECT and top not in rule.allowed_project:
            allowed = ", ".join(sorted(rule.allowed_project))
            violations.append(
                Violation(path, line, name, f"{rule.package}/ may import only {allowed}")
            )
        elif top in rule.forbidden_external:
            violations.append(Violation(path, line, name, f"{rule.package}/ must stay free of I/O"))
    return violations


def check_package(rule: Rule, root: Path = ROOT) -> list[Violation]:
    """Check every module under the package's folder."""
    violations: list[Violation] = []
    for path in sorted((root / rule.package).rglob("*.py")):
        rel = path.relative_to(root)
        is_package = path.name == "__init__.py"
        parts = rel.with_suffix("").parts
        module = ".".join(parts[:-1] if is_package else parts)
        violations += check_source(path.read_text(encoding="utf-8"), str(rel), module, rule,
                                   is_package=is_package)
    return violations


@pytest.mark.parametrize("package", sorted(RULES))
def test_package_imports_follow_design(package: str) -> None:
    """No module of the package imports what DESIGN.md §2 (as amended above) forbids."""
    assert (ROOT / package / "__init__.py").exists(), f"{package}/ is not a package"
    violations = check_package(RULES[package])
    assert not violations, "forbidden imports:\n" + "\n".join(map(str, violations))


def test_checker_catches_violations() -> None:
    """The checker names file and line of each forbidden import and passes allowed ones."""
    source = "\n".join([
        '"""A codec gone wrong."""',                      # 1
        "import asyncio",                                  # 2 forbidden: I/O
        "import struct, socket.socket",                    # 3 forbidden: socket
        "from protocols.errors import ProtocolError",      # 4 allowed
        "from . import envelope",                          # 5 allowed: protocols.envelope
        "from ..central import storage",                   # 6 forbidden: above the package
        "def f():",                                        # 7
        "    from edge_agent.outbox.store import Outbox",        # 8 forbidden: project package
        "    import importlib",                            # 9 allowed
        "    importlib.import_module('sqlite3')",          # 10 forbidden: dynamic
        "if False:",                                       # 11
        "    from paho.mqtt import client",                # 12 forbidden: I/O
        "import cbor2",                                    # 13 allowed
    ])
    found = check_source(source, "protocols/bad.py", "protocols.bad", RULES["protocols"])
    assert [(v.line, v.imported) for v in found] == [
        (2, "asyncio"), (3, "socket.socket"), (6, "..central"), (8, "edge_agent.outbox.store"),
        (10, "sqlite3"), (12, "paho.mqtt"),
    ]
    assert str(found[0]).startswith("protocols/bad.py:2: imports asyncio")

    central = "import asyncio\nfrom firmware_stubs.modbus_sim import X\nfrom .storage import Y\n"
    found = check_source(central, "central/app.py", "central.app", RULES["central"])
    assert [(v.line, v.imported) for v in found] == [(2, "firmware_stubs.modbus_sim")]

    # In a package's __init__.py, `.` is the package itself, so `..` is its parent.
    init = "from ..api import create_app\nfrom ... import edge_agent\n"
    found = check_source(init, "central/storage/__init__.py", "central.storage", RULES["central"],
                         is_package=True)
    assert [(v.line, v.imported) for v in found] == [(2, "...")]


def test_package_walk_finds_nested_modules(tmp_path: Path) -> None:
    """The walk reaches sub-packages and resolves their relative imports to the right package."""
    (tmp_path / "edge_agent" / "bearers").mkdir(parents=True)
    (tmp_path / "edge_agent" / "__init__.py").write_text("")
    (tmp_path / "edge_agent" / "bearers" / "__init__.py").write_text("from . import beidou\n")
    (tmp_path / "edge_agent" / "bearers" / "beidou.py").write_text(
        "import serial\nfrom ..outbox import Outbox\n\nfrom central.ingest.subscriber import x\n"
    )
    found = check_package(RULES["edge_agent"], root=tmp_path)
    assert [str(v) for v in found] == [
        "edge_agent/bearers/beidou.py:4: imports central.ingest.subscriber "
        "(edge_agent/ may import only device_profiles, edge_agent, protocols, runtime)"
    ]
