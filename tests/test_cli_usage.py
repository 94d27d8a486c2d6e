"""`edge-agent` exits 2 on a usage error (a value its options do not accept, said before any
work starts), 1 when the work fails (STYLE.md §10), on the installed entry point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import python_env


def _edge_agent(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent", *args], capture_output=True,
                          text=True, env=python_env() | {"COLUMNS": "200"}, cwd=cwd, timeout=60)


@pytest.mark.parametrize("args, says", [
    (["scan", "--port", "/dev/null", "--ids", "1-300"], "within 1-247"),
    (["scan", "--port", "/dev/null", "--ids", "abc"], "not an id or range"),
    (["scan", "--port", "/dev/null", "--ids", ","], "no id to scan"),
    (["scan", "--port", "/dev/null", "--parity", "X"], "one of N, E, O"),
    (["enroll", "-c", "site.toml", "--central", "central.example:8080", "--token", "t"],
     "http(s) URL"),
    (["renew", "-c", "site.toml", "--central", "ftp://central.example"], "http(s) URL"),
])
def test_usage_errors_exit_2_and_name_the_option(tmp_path: Path, args: list[str],
                                                 says: str) -> None:
    """A bad --ids, --parity or --central exits 2 with what is wrong, before any work."""
    (tmp_path / "site.toml").write_text('[gateway]\nid = "gw-1"\ndata_dir = "data"\n')
    res = _edge_agent(*args, cwd=tmp_path)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert says in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "data").exists()  # nothing was done


def test_work_that_fails_exits_1(tmp_path: Path) -> None:
    """A good command line whose work fails (no such port) exits 1, not 2."""
    res = _edge_agent("scan", "--port", str(tmp_path / "ttyNONE"), "--ids", "1-3", cwd=tmp_path)
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert "error:" in res.stderr
