"""`edge-agent run` takes the lean daemon entry (edge_agent/cli/daemon.py) without changing
what the command accepts or prints, and the daemon then loads no CLI libraries."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from edge_agent.cli.app import app
from edge_agent.cli.daemon import DEFAULT_CONFIG, RunArgs, parse_run
from tests.helpers import free_port, python_env


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


# Loaded only by gateways whose config has them (edge_agent/agent.py), or, for `cryptography`,
# when the first signed command is verified (protocols.command_keys.PinnedKey).
OPTIONAL_MODULES = ("cryptography", "edge_agent.bearers.beidou", "edge_agent.bearers.pdt",
                    "edge_agent.bearers.tiantong", "edge_agent.narrowband.downlink",
                    "edge_agent.narrowband.fallback", "edge_agent.terminals.service",
                    "edge_agent.field.stations", "edge_agent.health.metrics", "prometheus_client",
                    "typer", "click", "rich")
_START_AND_STOP = """
import asyncio, json, sys
from pathlib import Path
from edge_agent.cli.daemon import daemon_imports
run_agent, load_or_roll_back, _, configure_logging = daemon_imports(json=True)
cfg = load_or_roll_back(Path(sys.argv[1]))
configure_logging("edge-agent", level="info", json=True)

async def main() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(1.0, stop.set)
    await run_agent(cfg, stop=stop, install_signal_handlers=False)

asyncio.run(main())
print(json.dumps(sorted(m for m in sys.argv[2:] if sys.modules.get(m))))
"""


def _plain_gateway(tmp_path: Path, key: str) -> Path:
    """A Modbus TCP gateway with central's command key pinned, and nothing optional."""
    config = tmp_path / "site.toml"
    config.write_text(f'[gateway]\nid = "gw-lean"\ndata_dir = "{tmp_path / "data"}"\n\n'
                      f'[mqtt]\nhost = "127.0.0.1"\nport = {free_port()}\n\n'
                      f'[commands]\ncentral_public_key = "{key}"\n\n'
                      '[[devices]]\nid = "gas-1"\nprofile = "gas-detector-v1"\n'
                      f'transport = {{ kind = "tcp", host = "127.0.0.1", port = {free_port()} }}\n')
    return config


def test_daemon_start_loads_no_unconfigured_subsystem(tmp_path: Path) -> None:
    """A plain Modbus gateway runs without the narrowband radios, terminals, HJ 212, metrics
    and `cryptography` in memory; a pinned key that does not parse is reported at start."""
    key = base64.b64encode(bytes(range(32))).decode()
    config = _plain_gateway(tmp_path, key)
    run = subprocess.run([sys.executable, "-c", _START_AND_STOP, str(config), *OPTIONAL_MODULES],
                         env=python_env(), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == []
    assert "commands_key_invalid" not in run.stdout + run.stderr
    (tmp_path / "data").rename(tmp_path / "data-1")
    bad = _plain_gateway(tmp_path, key[:-4] + "AA==")  # 31 bytes: not an Ed25519 key
    run = subprocess.run([sys.executable, "-c", _START_AND_STOP, str(bad), "cryptography"],
                         env=python_env(), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "commands_key_invalid" in run.stdout + run.stderr
    assert "expected 32 key bytes, got 31" in run.stdout + run.stderr


def test_daemon_start_loads_no_pydantic(tmp_path: Path) -> None:
    """The running agent decodes its config and profiles with msgspec: pydantic (~11 MB resident
    with its core) stays out of a gateway's memory; it is central's."""
    config = _plain_gateway(tmp_path, base64.b64encode(bytes(range(32))).decode())
    run = subprocess.run([sys.executable, "-c", _START_AND_STOP, str(config), "pydantic",
                          "pydantic_core", "msgspec"],
                         env=python_env(), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1]) == ["msgspec"]
