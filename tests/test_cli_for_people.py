"""What the `central` CLI prints for people: text shown as it is (rich markup never eats
`[central]`), times in the duty room's zone (Asia/Shanghai, as the console and the API mean
them) whatever the machine's zone, values formatted (--json stays raw), the broker reloaded
after a revocation; and `central commands approve` against a running central."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from structlog.testing import capture_logs
from typer.testing import CliRunner, Result

from central import cli
from central.cli.operator import when
from central.storage import open_storage
from protocols.envelope import Birth, DataBatch, DeviceInfo, PointInfo, Record, RecordKind, State
from tests.fleet import Central
from tests.helpers import free_port
from tests.identity import PASSWORD, cli_user

SHANGHAI = ZoneInfo("Asia/Shanghai")
GW = "gw-people-01"
RUN = CliRunner()


def central(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> Result:
    with capture_logs():
        return RUN.invoke(cli.app, list(args), input=stdin, env=env)


@pytest.fixture
def utc_machine(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The CLI runs on a server whose zone is UTC."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_times_are_the_duty_rooms_whatever_the_machines_zone(utc_machine: None) -> None:
    """Epoch 0 is 08:00 in Wuhan: so the CLI says, on a UTC machine too."""
    assert when(0) == "1970-01-01 08:00:00+08:00"
    assert when(0, short=True) == "01-01 08:00:00"
    assert when(None) == "-"


def test_central_cert_shows_the_settings_table_name(tmp_path: Path) -> None:
    """`central ca central-cert` says `([central] table)`: rich markup does not eat it."""
    pki = str(tmp_path / "pki")
    assert central("ca", "init", "--pki-dir", pki).exit_code == 0
    result = central("ca", "central-cert", "--out", str(tmp_path / "mqtt"), "--pki-dir", pki)
    assert result.exit_code == 0, result.output
    assert "# add to central's settings ([central] table):" in result.stdout


def test_revoke_says_reload_and_audit_list_shows_readable_times(tmp_path: Path,
                                                                utc_machine: None) -> None:
    """revoke tells to reload the broker (SIGHUP), not to restart it; `audit list` shows each
    row's time in the duty room's zone instead of raw ts_ms, which --json keeps."""
    db, pki = f"sqlite:///{tmp_path}/c.db", str(tmp_path / "pki")
    assert central("init", "--db", db).exit_code == 0
    assert central("ca", "init", "--pki-dir", pki).exit_code == 0
    result = central("gateway", "revoke", "gw-x", "--db", db, "--pki-dir", pki,
                     env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "reload the broker so that it reads the CRL: systemctl reload mosquitto" in \
        result.stdout
    assert "restart the broker" not in result.stdout

    rows = json.loads(central("audit", "list", "--json", "--db", db).stdout)
    assert [r["action"] for r in rows] == ["gateway.revoked"] and isinstance(rows[0]["ts_ms"], int)
    table = central("audit", "list", "--db", db, env={"COLUMNS": "300"}).stdout
    shown = datetime.fromtimestamp(rows[0]["ts_ms"] / 1000, SHANGHAI).isoformat(
        sep=" ", timespec="seconds")
    assert shown in table and str(rows[0]["ts_ms"]) not in table


async def _report(db_url: str) -> None:
    """A gateway that is online with a gas detector whose reading is a float with noise."""
    now = int(time.time() * 1000)
    async with open_storage(db_url) as st:
        await st.record_birth(GW, Birth(gw=GW, stream=GW, boot_id="b", version="1", devices=(
            DeviceInfo(id="gas-1", profile="gas-detector-v1", profile_hash="h", points=(
                PointInfo(0, "gas_lel", "可燃气体浓度", "%LEL"),
                PointInfo(1, "relay_test", "报警继电器测试", "")),),)))
        await st.record_state(GW, State(online=True, boot_id="b", version="1", bearer="ip",
                                        backlog=0, ts_ms=now, stream=GW))
        await st.write_batches([DataBatch(gw=GW, stream=GW, records=(
            Record(seq=1, kind=RecordKind.TELEMETRY, ts_ms=now, point="gas-1/gas_lel",
                   value=21.299999999999997),))])


def _login(central_: Central, session: Path, user: str) -> dict[str, str]:
    env = {"FIELDLINK_CLI_TOKEN": str(session), "COLUMNS": "200"}
    result = central("login", "--url", central_.base_url, "--user", user, "--password-stdin",
                     env=env, stdin=PASSWORD + "\n")
    assert result.exit_code == 0, result.output
    return env


def test_gateways_show_and_a_second_operator_approves_a_safety_critical_write(
        tmp_path: Path, utc_machine: None) -> None:
    """gateways show: online `yes`, a reading `21.3`, last seen in +08:00 (--json raw);
    `commands approve`: the issuer is refused (409, exit 1), a second operator approves
    (--json), approving again is refused; without --yes it asks first."""
    c = Central(tmp_path, free_port())  # no broker: the API serves without ingest
    try:
        c.start()
        cli_user(c.db_url, "duty-a", role="operator")
        cli_user(c.db_url, "duty-b", role="operator")
        asyncio.run(_report(c.db_url))
        a = _login(c, tmp_path / "a.json", "duty-a")
        b = _login(c, tmp_path / "b.json", "duty-b")

        raw = json.loads(central("gateways", "show", GW, "--json", env=a).stdout)
        assert raw["online"] is True
        assert raw["devices"][0]["points"][0]["latest"]["value"] == 21.299999999999997
        shown = central("gateways", "show", GW, env=a).stdout
        lines = {line.split()[0]: line.split()[1:] for line in shown.splitlines()[:9]}
        assert lines["online"] == ["yes"], shown
        assert lines["last_seen_ms"][-1].endswith("+08:00"), shown
        assert "21.3 " in shown and "21.29999" not in shown and "True" not in shown

        sent = json.loads(central("commands", "send", GW, "write_point", "--arg", "device=gas-1",
                                  "--arg", "point=relay_test", "--arg", "value=true", "--yes",
                                  "--json", env=a).stdout)
        assert sent["approval"] == "required", sent
        cmd = sent["cmd_id"]
        own = central("commands", "approve", cmd, "--yes", env=a)
        assert own.exit_code == 1 and "(409)" in own.stderr, own.output
        declined = central("commands", "approve", cmd, env=b, stdin="n\n")
        assert declined.exit_code == 1 and "issued by duty-a" in declined.stderr
        assert "Approve it?" in declined.stderr
        approved = central("commands", "approve", cmd, "--yes", "--json", env=b)
        assert approved.exit_code == 0, approved.output
        done = json.loads(approved.stdout)
        assert (done["approval"], done["approved_by"]) == ("approved", "duty-b")
        again = central("commands", "approve", cmd, "--yes", env=b)
        assert again.exit_code == 1 and "(409)" in again.stderr
        unknown = central("commands", "approve", "no-such-command", "--yes", env=b)
        assert unknown.exit_code == 1 and "(404)" in unknown.stderr
    finally:
        c.stop()


def test_approve_has_help_with_an_example() -> None:
    """`central commands approve -h` explains who may approve and shows an example."""
    result = central("commands", "approve", "-h")
    assert result.exit_code == 0
    assert "Example: central commands approve" in " ".join(result.stdout.split())
