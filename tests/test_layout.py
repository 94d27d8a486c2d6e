"""The shape of the tree a newcomer finds (issue 14): each room is a folder, no module is too
long to read in one sitting, and the top level of each daemon holds only what starts it.

- No module of the shipped packages (and the benches) is over `MAX_LINES` lines. The tests
  are exempt: a test module is a list of cases, read one at a time.
- The top level of `edge_agent/` and `central/` holds the entry points (`__main__`), the
  package root (`__init__`: its base error and the shared error forms) and the composition
  root that wires the rooms together (`agent`, `app`); everything else lives in a subpackage
  whose name says what it is.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 500
SHIPPED = ("protocols", "device_profiles", "edge_agent", "central", "firmware_stubs", "runtime",
           "bench")
TOP_LEVEL = {
    "edge_agent": {"__init__.py", "__main__.py", "agent.py"},
    "central": {"__init__.py", "__main__.py", "app.py"},
}


def _modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "node_modules" not in p.parts)


@pytest.mark.parametrize("package", SHIPPED)
def test_no_module_over_the_line_budget(package: str) -> None:
    modules = _modules(package)
    assert modules, f"no modules found under {package}/"
    long = {str(p.relative_to(ROOT)): n for p in modules
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by what they do): {long}"


@pytest.mark.parametrize("package", sorted(TOP_LEVEL))
def test_top_level_holds_only_entry_points_and_the_composition_root(package: str) -> None:
    found = {p.name for p in (ROOT / package).glob("*.py")}
    extra = found - TOP_LEVEL[package]
    assert not extra, (f"{package}/ top level: {sorted(extra)} belong in a subpackage "
                       f"(the top level is for {sorted(TOP_LEVEL[package])})")
