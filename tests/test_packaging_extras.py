"""`fieldlink[edge]` installs only what the gateway needs, and the agent imports only that.

Offline and fast, three ways: the dependency set `pip install '.[edge]'` resolves to, computed
from pyproject.toml and the installed distributions' metadata, holds none of central's or the
tests' libraries; every import written anywhere in the agent's code (parsed with `ast`, so
lazy imports inside functions count) is the standard library, the project, or a module that
set provides; and a fresh interpreter that refuses central's libraries imports every agent
module and runs `edge-agent --help` and each command's help.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
EDGE_PACKAGES = ("edge_agent", "protocols", "device_profiles", "runtime")
# Central's server stack, the embedded broker, accounts, and the test tools.
CENTRAL_ONLY = frozenset(canonicalize_name(n) for n in (
    "fastapi", "starlette", "uvicorn", "psycopg", "psycopg-binary", "amqtt", "argon2-cffi",
    "fastapi-offline", "schemathesis", "selenium", "pytest", "hypothesis"))
CENTRAL_MODULES = ("fastapi", "starlette", "uvicorn", "psycopg", "amqtt", "argon2",
                   "fastapi_offline", "schemathesis", "selenium", "pytest", "hypothesis")


def _project() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _resolve(extras: set[str]) -> set[str]:
    """Canonical names of every distribution `pip install '.[extras]'` brings in."""
    project = _project()
    optional: dict[str, list[str]] = project["optional-dependencies"]  # type: ignore[assignment]
    self_name = canonicalize_name(str(project["name"]))
    todo: list[Requirement] = [Requirement(r) for r in project["dependencies"]]  # type: ignore[attr-defined]
    wanted = set(extras)
    while True:  # self-references like "fieldlink[central,edge]"
        more = {e for x in wanted for r in optional[x]
                if canonicalize_name(Requirement(r).name) == self_name
                for e in Requirement(r).extras} - wanted
        if not more:
            break
        wanted |= more
    todo += [Requirement(r) for x in wanted for r in optional[x]
             if canonicalize_name(Requirement(r).name) != self_name]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        seen.add(name)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue  # platform-conditional and not installed here: not part of this set
        for text in dist.requires or []:
            sub = Requirement(text)
            envs = [{"extra": e} for e in req.extras] or [{"extra": ""}]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append(sub)
    return {k for k in seen if "[" not in k}


def _imports(path: Path) -> set[str]:
    """Top-level module names imported anywhere in one source file (absolute imports only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_edge_extra_resolves_without_central_libraries() -> None:
    """The distributions '.[edge]' resolves to hold no web server, database driver, broker or test tool."""
    edge = _resolve({"edge"})
    assert {"pymodbus", "aiomqtt", "pyserial"} <= edge
    assert not edge & CENTRAL_ONLY, sorted(edge & CENTRAL_ONLY)
    # The other extras do carry them (so the check above is not vacuous).
    assert {"fastapi", "uvicorn", "psycopg", "argon2-cffi"} <= _resolve({"central"})
    assert {"amqtt", "pymodbus", "fastapi"} <= _resolve({"demo"})
    assert {"schemathesis", "pytest", "amqtt"} <= _resolve({"test"})


def test_agent_source_imports_only_what_edge_extra_provides() -> None:
    """Every module the agent's code imports (even inside a function) is stdlib, ours, or from '.[edge]'."""
    provided: set[str] = set(sys.stdlib_module_names) | set(EDGE_PACKAGES) | {"__future__"}
    dists = _resolve({"edge"})
    for module, owners in md.packages_distributions().items():
        if any(canonicalize_name(o) in dists for o in owners):
            provided.add(module)
    strays: dict[str, set[str]] = {}
    for package in EDGE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            missing = _imports(path) - provided
            if missing:
                strays[str(path.relative_to(ROOT))] = missing
    assert not strays, strays


BLOCKER = """
import importlib, pkgutil, sys
from importlib.abc import MetaPathFinder
REFUSED = set(sys.argv[1].split(","))
class Refuse(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in REFUSED:
            raise ImportError(f"central-only module imported by the edge: {name}")
        return None
sys.meta_path.insert(0, Refuse())
for top in ("edge_agent", "protocols", "device_profiles", "runtime"):
    pkg = importlib.import_module(top)
    for info in pkgutil.walk_packages(pkg.__path__, top + "."):
        if info.name.endswith("__main__"):
            continue
        importlib.import_module(info.name)
from typer.main import get_command
from edge_agent.cli.app import app
cli = get_command(app)
def helps(cmd, words):
    yield words
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from helps(sub, words + [name])
for words in helps(cli, []):
    try:
        cli.main(words + ["--help"], prog_name="edge-agent", standalone_mode=False)
    except SystemExit as exc:
        assert not exc.code, (words, exc.code)
print("EDGE-IMPORTS-OK")
"""


def test_agent_runs_with_central_libraries_refused() -> None:
    """With fastapi, uvicorn, psycopg, amqtt, argon2... unimportable, every agent module loads and every help prints."""
    proc = subprocess.run([sys.executable, "-c", BLOCKER, ",".join(CENTRAL_MODULES)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.rstrip().endswith("EDGE-IMPORTS-OK")
