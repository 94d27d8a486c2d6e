"""`edge-agent run` takes the lean daemon entry (edge_agent/cli/daemon.py) without changing
what the command accepts or prints, and the daemon then loads no CLI libraries."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer

from edge_agent.cli.app import app
from edge_agent.cli.daemon import DEFAULT_CONFIG, RunArgs, parse_run
from tests.helpers import python_env


def test_daemon_knows_every_option_of_the_typer_run_command() -> None:
    """The options parsed by the daemon entry are exactly those of the typer `run` command."""
    import edge_agent.cli.daemon as daemon

    command = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    typer_opts = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    assert typer_opts == set(daemon._VALUED) | set(daemon._FLAGS)
    assert {p.envvar for p in command.params if p.envvar} == {"FIELDLINK_CONFIG"}


@pytest.mark.parametrize(("argv", "expected"), [
    (["run", "--config", "a.toml"], RunArgs(Path("a.toml"))),
    (["run", "-c", "a.toml", "--log-level", "WARNING"], RunArgs(Path("a.toml"), "warning")),
    (["run", "--config=a.toml", "--log-json"], RunArgs(Path("a.toml"), log_json=True)),
    (["run", "--log-pretty", "--log-level=debug", "-c", "a.toml"],
     RunArgs(Path("a.toml"), "debug", False)),
    (["run", "--config", "a.toml", "--help"], None),
    (["run", "-ca.toml"], None),
    (["run", "--config"], None),
    (["run", "--config", "a.toml", "--log-level", "loud"], None),
    (["run", "--config", "a.toml", "extra"], None),
    (["status", "--config", "a.toml"], None),
    ([], None),
])
def test_parse_run_takes_plain_run_lines_only(argv: list[str], expected: RunArgs | None) -> None:
    """A plain `run` line is parsed; help, typos and bad values are left to typer."""
    assert parse_run(argv) == expected


def test_parse_run_config_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """FIELDLINK_CONFIG names the file as in typer; the missing default is typer's error."""
    monkeypatch.setenv("FIELDLINK_CONFIG", "env.toml")
    assert parse_run(["run"]) == RunArgs(Path("env.toml"))
    monkeypatch.delenv("FIELDLINK_CONFIG")
    assert parse_run(["run"]) == (None if not DEFAULT_CONFIG.exists() else RunArgs(DEFAULT_CONFIG))


def test_daemon_imports_no_cli_libraries() -> None:
    """Everything `run` imports for a JSON-logging daemon leaves typer, click and rich out."""
    code = ("import sys\nfrom edge_agent.cli.daemon import daemon_imports\n"
            "daemon_imports(json=True)\n"
            "print(sorted(m for m in ('typer', 'click', 'rich', 'rich.console') if sys.modules.get(m)))")
    out = subprocess.run([sys.executable, "-c", code], env=python_env(), capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"


def test_run_error_prints_as_the_typer_command(tmp_path: Path) -> None:
    """A config that does not load: the same red line and status 1 on both entries."""
    bad = tmp_path / "site.toml"
    bad.write_text("[gateway]\nid = 3\n")
    runs = [subprocess.run([sys.executable, "-m", module, "run", "--config", str(bad), "--log-json"],
                           env=python_env(), capture_output=True, text=True, timeout=60)
            for module in ("edge_agent", "edge_agent.cli.app")]
    assert [r.returncode for r in runs] == [1, 1]
    assert runs[0].stderr == runs[1].stderr
    assert runs[0].stderr.startswith("error: ")
