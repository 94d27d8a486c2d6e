"""No log line passes a field that the logging set-up overwrites (runtime/logs.py).

`configure_logging` adds `program`, `logger`, `level` and `timestamp` to every event after the
call site's fields, so a call such as `log.warning("alarm_raised", level=2)` would lose the
alarm's level to the log level ("warning"). Checked on the source with `ast`: every call of a
logging method on a receiver whose name says it is a logger (`log`, `_log`, `lg`), and of a `log_…` name (a
logging method chosen earlier, as in `log_fn = log.info if … else log.warning`).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("edge_agent", "central", "runtime", "firmware_stubs", "device_profiles")
METHODS = frozenset({"debug", "info", "warning", "error", "exception", "critical", "msg",
                     "adebug", "ainfo", "awarning", "aerror", "aexception", "acritical"})
RESERVED = frozenset({"program", "logger", "level", "timestamp"})


def _receiver_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _clashes(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        receiver = _receiver_name(func.value).lower() if isinstance(func, ast.Attribute) else ""
        method = (isinstance(func, ast.Attribute) and func.attr in METHODS
                  and ("log" in receiver or receiver.strip("_") == "lg"))
        chosen = isinstance(func, ast.Name) and func.id.startswith("log_")  # log_fn = log.info …
        if not (method or chosen):
            continue
        found += [(node.lineno, kw.arg) for kw in node.keywords if kw.arg in RESERVED]
    return found


def test_the_check_sees_a_clash() -> None:
    assert _clashes(ast.parse('log.warning("alarm_raised", level=2)')) == [(1, "level")]
    assert _clashes(ast.parse('log_fn("alarm_raised", level=2)')) == [(1, "level")]
    assert _clashes(ast.parse('self._lg.info("x", level=1)')) == [(1, "level")]
    assert _clashes(ast.parse('self._log.info("x", alarm_level=2)')) == []


def test_no_log_call_passes_a_reserved_field() -> None:
    bad = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            bad += [f"{path.relative_to(ROOT)}:{line} {name}=" for line, name in _clashes(tree)]
    assert not bad, f"log calls whose field the logging set-up overwrites: {bad}"
