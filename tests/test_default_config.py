"""Both CLIs find their config without `-c`: $FIELDLINK_CONFIG, else the packaged path in /etc/fieldlink."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command

from central.cli import app as central_app
from central.cli import config_defaults, default_config
from edge_agent.cli.common import DEFAULT_CONFIG as EDGE_DEFAULT

BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FIELDLINK_CONFIG"}
    return env | extra


def test_edge_cli_reads_fieldlink_config_then_says_where_it_looked(tmp_path: Path) -> None:
    """`edge-agent status` with no -c reads $FIELDLINK_CONFIG; without it, names /etc/fieldlink/site.toml."""
    site = tmp_path / "site.toml"
    site.write_text(f'[gateway]\nid = "gw-env"\ndata_dir = "{tmp_path / "data"}"\n'
                    '[mqtt]\nhost = "127.0.0.1"\nport = 1883\n')
    proc = subprocess.run([BIN / "edge-agent", "status"], capture_output=True, text=True,
                          env=_env(FIELDLINK_CONFIG=str(site)), cwd=tmp_path, timeout=60)
    assert proc.returncode == 1 and str(tmp_path / "data" / "outbox.db") in proc.stderr, proc.stderr
    if EDGE_DEFAULT.exists():
        pytest.skip(f"{EDGE_DEFAULT} exists on this machine: the no-config message cannot show")
    proc = subprocess.run([BIN / "edge-agent", "status"], capture_output=True, text=True,
                          env=_env(), cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "FIELDLINK_CONFIG" in proc.stderr
    assert "/etc/fieldlink/site.toml" in proc.stderr


def test_central_cli_reads_fieldlink_config_in_every_command(tmp_path: Path) -> None:
    """`central init` and `central user list` with no -c take the database from the file
    $FIELDLINK_CONFIG names."""
    db = tmp_path / "central.db"
    conf = tmp_path / "central.toml"
    conf.write_text(f'db_url = "sqlite:///{db}"\n')
    for args, check in ((["init"], f"created central's database at {db}"), (["user", "list",
                                                                            "--json"], "[]")):
        proc = subprocess.run([BIN / "central", *args], capture_output=True, text=True,
                              env=_env(FIELDLINK_CONFIG=str(conf)), cwd=tmp_path, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == check
    assert json.loads(proc.stdout) == [] and db.exists()


def test_central_default_config_reaches_every_command_with_a_config_option() -> None:
    """The default map gives --config to serve, ca init, gateway revoke, user list, broker-config."""
    defaults = config_defaults(get_command(central_app), "/x/central.toml")
    assert defaults["serve"] == {"config": "/x/central.toml"}
    assert defaults["broker-config"] == {"config": "/x/central.toml"}
    assert defaults["ca"]["init"] == {"config": "/x/central.toml"}  # type: ignore[index]
    assert defaults["gateway"]["revoke"] == {"config": "/x/central.toml"}  # type: ignore[index]
    assert defaults["user"]["list"] == {"config": "/x/central.toml"}  # type: ignore[index]
    assert "demo" not in defaults
    assert default_config({"FIELDLINK_CONFIG": "/y.toml"}) == "/y.toml"
