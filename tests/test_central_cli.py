"""The `central` command line as an operator meets it."""

from __future__ import annotations

import subprocess
import sys

from central import __version__
from tests.helpers import python_env


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "central", *args], capture_output=True, text=True,
                          env=python_env() | {"COLUMNS": "200"}, timeout=60)


def test_help_lists_every_command_with_an_example() -> None:
    """`central --help` names serve and demo, each with an example command line."""
    out = run("--help")
    assert out.returncode == 0
    for command in ("serve", "demo"):
        assert f"e.g. central {command}" in out.stdout


def test_each_command_help_has_an_example() -> None:
    """Every command's own help carries an Example line."""
    for command in ("serve", "demo"):
        out = run(command, "--help")
        assert out.returncode == 0 and "Example: central " + command in out.stdout


def test_version_and_usage_errors() -> None:
    """--version prints the version; an unknown option is a usage error (exit 2)."""
    assert run("--version").stdout.strip() == f"central {__version__}"
    assert run("serve", "--no-such-flag").returncode == 2


def test_bad_database_url_is_one_clear_error() -> None:
    """An unsupported database URL exits 1 with a one-line error, not a traceback."""
    out = run("serve", "--db", "mysql://nope", "--http-port", "1")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and "error" in out.stderr.lower()
