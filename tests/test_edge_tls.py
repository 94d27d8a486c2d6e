"""The gateway's `[mqtt.tls]` and credentials (DESIGN.md §8): validation with file:line,
the TOML edit `edge-agent enroll` makes, and warnings on key files others may read."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from central.config.settings import SettingsError, load_settings
from edge_agent.cli.app import app as edge_cli
from edge_agent.cli.doctor import run_checks
from edge_agent.config.site import ConfigError, load_config, loose_key_files
from edge_agent.uplink.enrolment import set_table

BASE = """\
[gateway]
id = "gw-001"
data_dir = "data"

[mqtt]
host = "broker.example"
port = 8883
"""


def _files(tmp_path: Path, mode: int = 0o600) -> None:
    for name in ("ca.crt", "gw.crt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "gw.key").write_text("x")
    os.chmod(tmp_path / "gw.key", mode)


def _load(tmp_path: Path, text: str) -> ConfigError:
    path = tmp_path / "site.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, check_profiles=False)
    return info.value


def test_tls_and_credentials_load_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    """`[mqtt.tls]` paths resolve against the config's folder; username/password load."""
    _files(tmp_path)
    path = tmp_path / "site.toml"
    path.write_text(BASE + 'username = "gw-001"\npassword = "s3cret"\n\n[mqtt.tls]\n'
                    'ca = "ca.crt"\ncert = "gw.crt"\nkey = "gw.key"\n')
    cfg = load_config(path, check_profiles=False)
    assert cfg.mqtt.tls is not None and cfg.mqtt.tls.key == tmp_path / "gw.key"
    assert cfg.mqtt.username == "gw-001" and "s3cret" not in repr(cfg.mqtt)
    assert loose_key_files(cfg) == []


@pytest.mark.parametrize("extra, line_of, field, message", [
    ('\n[mqtt.tls]\nca = "ca.crt"\ncert = "gw.crt"\n', "[mqtt.tls]", "mqtt.tls",
     "cert and key go together"),
    ('\n[mqtt.tls]\nca = "nope.crt"\n', 'ca = "nope.crt"', "mqtt.tls.ca", "no such file"),
    ('\n[mqtt.tls]\nca = "ca.crt"\nkeyfile = "gw.key"\n', 'keyfile', "mqtt.tls.keyfile",
     "Extra inputs"),
    ('password = "p"\n', "[mqtt]", "mqtt", "password needs username"),
])
def test_bad_tls_settings_name_the_line(tmp_path: Path, extra: str, line_of: str, field: str,
                                        message: str) -> None:
    """Each mistake in [mqtt.tls] or the credentials names its file, line and field."""
    _files(tmp_path)
    text = BASE + extra
    exc = _load(tmp_path, text)
    line = next(n for n, t in enumerate(text.splitlines(), 1) if line_of in t)
    assert (exc.line, exc.field) == (line, field), str(exc)
    assert message in exc.message
    assert str(exc).startswith(f"{tmp_path / 'site.toml'}:{line} {field}:")


def test_set_table_updates_or_appends_and_keeps_the_rest() -> None:
    """The enrolment edit replaces keys in place, adds missing ones, keeps comments."""
    text = BASE + "# keep me\n\n[mqtt.tls]\nca = \"old.crt\"  # old\n\n[outbox]\nkeep_delivered_s = 1\n"
    new = set_table(text, "mqtt.tls", {"ca": "/p/ca.crt", "cert": "/p/c.crt", "key": "/p/k"})
    new = set_table(new, "commands", {"central_public_key": "/p/central.pub"})
    data = tomllib.loads(new)
    assert data["mqtt"]["tls"] == {"ca": "/p/ca.crt", "cert": "/p/c.crt", "key": "/p/k"}
    assert data["commands"]["central_public_key"] == "/p/central.pub"
    assert data["outbox"] == {"keep_delivered_s": 1} and "# keep me" in new
    assert set_table(new, "mqtt.tls", {"ca": "/p/ca.crt"}).count("[mqtt.tls]") == 1


def test_config_check_and_doctor_warn_on_a_readable_key(tmp_path: Path) -> None:
    """A TLS or frame key readable by group/others: a warning with chmod 600, not an error;
    the password and the narrowband frame key never appear in `config check --json`."""
    _files(tmp_path, mode=0o644)
    path = tmp_path / "site.toml"
    frame_key = "00112233445566778899aabbccddeeff"
    path.write_text(BASE + 'username = "u"\npassword = "s3cret"\n\n[mqtt.tls]\nca = "ca.crt"\n'
                    'cert = "gw.crt"\nkey = "gw.key"\n\n[narrowband]\nport = "/dev/ttyUSB1"\n'
                    f'central_card = "0242407"\nkey = "{frame_key}"\n')
    res = CliRunner().invoke(edge_cli, ["config", "check", str(path), "--json"])
    assert res.exit_code == 0, res.output
    assert "mqtt.tls.key" in res.stderr and "0644" in res.stderr and "chmod 600" in res.stderr
    assert "s3cret" not in res.stdout and json.loads(res.stdout)["mqtt"]["password"] == "***"
    assert frame_key not in res.stdout and json.loads(res.stdout)["narrowband"]["key"] == "***"
    checks = {c.name: c for c in run_checks(path)}
    warn = checks["key file mqtt.tls.key"]
    assert warn.status == "warn" and warn.hint == f"chmod 600 {tmp_path / 'gw.key'}"
    os.chmod(tmp_path / "gw.key", 0o600)
    assert "key file mqtt.tls.key" not in {c.name for c in run_checks(path)}


def test_central_tls_settings_are_checked(tmp_path: Path) -> None:
    """Central's mqtt_tls_* must name existing files and come as cert+key with a CA."""
    (tmp_path / "ca.crt").write_text("x")
    with pytest.raises(SettingsError, match="mqtt_tls_cert and mqtt_tls_key go together"):
        load_settings(None, env={}, mqtt_tls_ca=tmp_path / "ca.crt", mqtt_tls_cert=tmp_path / "ca.crt")
    with pytest.raises(SettingsError, match="no such file"):
        load_settings(None, env={"FIELDLINK_CENTRAL_MQTT_TLS_CA": str(tmp_path / "nope")})
    with pytest.raises(SettingsError, match="mqtt_password needs mqtt_username"):
        load_settings(None, env={"FIELDLINK_CENTRAL_MQTT_PASSWORD": "p"})
    s = load_settings(None, env={"FIELDLINK_CENTRAL_MQTT_USERNAME": "central",
                                 "FIELDLINK_CENTRAL_MQTT_PASSWORD": "s3cret"})
    assert "s3cret" not in repr(s)


def test_enroll_and_renew_help_have_examples(tmp_path: Path) -> None:
    """`edge-agent enroll/renew --help` carry an example; an unreachable central is exit 1
    and leaves the config as it was."""
    from tests.helpers import free_port

    runner = CliRunner()
    for cmd in ("enroll", "renew"):
        res = runner.invoke(edge_cli, [cmd, "--help"])
        assert res.exit_code == 0 and "Example: edge-agent " + cmd in res.output
    path = tmp_path / "site.toml"
    path.write_text(BASE)
    res = runner.invoke(edge_cli, ["enroll", "-c", str(path), "--central",
                                   f"http://127.0.0.1:{free_port()}", "--token", "t"])
    assert res.exit_code == 1 and "cannot reach central" in res.stderr
    assert path.read_text() == BASE
    res = runner.invoke(edge_cli, ["renew", "-c", str(path)])
    assert res.exit_code == 1 and "give --central" in res.stderr
