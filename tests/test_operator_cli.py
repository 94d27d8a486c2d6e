"""The operator CLI (issue 15 must-show 5) against a running central process, a private
Mosquitto, a real edge agent and its Modbus simulator: log in, acknowledge an alarm the edge
raised, send a command that the gateway executes; typed errors for 401, 403 and an
unreachable central; the session token stays in a 0600 file and is never printed."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs
from typer.testing import CliRunner, Result

from central import cli
from tests.fleet import Agent, Central, DeviceDef, Simulator, sqlite_rows
from tests.helpers import Mosquitto, free_port, python_env, wait_for
from tests.identity import PASSWORD, cli_user

GW = "gw-ops-01"
RUN = CliRunner()


class Operator:
    """`central …` in-process (CliRunner) with its own session file."""

    def __init__(self, session: Path) -> None:
        self.session = session
        self.printed: list[str] = []  # everything the CLI wrote, to look for the token

    def run(self, *args: str, stdin: str | None = None) -> Result:
        with capture_logs():  # library logs would go to stderr in the real entry point
            result = RUN.invoke(cli.app, list(args), input=stdin,
                                env={"FIELDLINK_CLI_TOKEN": str(self.session)})
        self.printed += [result.stdout, result.stderr]
        return result

    def ok(self, *args: str, stdin: str | None = None) -> str:
        result = self.run(*args, stdin=stdin)
        assert result.exit_code == 0, (args, result.stdout, result.stderr)
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def token(self) -> str:
        return str(json.loads(self.session.read_text())["token"])


def _active_alarm(op: Operator) -> dict[str, Any] | None:
    rows = op.json("alarms", "list", "--gw", GW, "--ack", "unacknowledged")
    return next((a for a in rows if a["point"] == "gas-1/gas_lel" and a["level"] == 2), None)


@pytest.mark.e2e
def test_operator_acks_an_alarm_and_sends_a_command_end_to_end(tmp_path: Path,
                                                                mosquitto: Mosquitto) -> None:
    """login (0600 file, token never printed) -> the edge's level-2 gas alarm is listed, acked
    (a second ack is 409), commented, audited -> write_point asks first, then --yes --wait runs
    it on the gateway and reads back; --wait exits 1 on an expired command; a viewer gets 403,
    no login 401, an unknown gateway 404, a dead central 'unreachable'."""
    sim = Simulator(tmp_path, ["gas-detector-v1"], control=True)
    central = Central(tmp_path, mosquitto.port)
    agent: Agent | None = None
    try:
        sim.start()
        central.start()
        cli_user(central.db_url, "duty-op", role="operator")
        cli_user(central.db_url, "duty-view", role="viewer")
        op = Operator(tmp_path / "op" / "session.json")

        nobody = op.run("alarms", "list")
        assert nobody.exit_code == 1 and "log in first" in nobody.stderr

        # The real entry point, as a person types it: the password on stdin.
        login = subprocess.run(
            [sys.executable, "-m", "central", "login", "--url", central.base_url, "--user",
             "duty-op", "--password-stdin"], input=PASSWORD + "\n", capture_output=True,
            text=True, timeout=60, env=python_env() | {"FIELDLINK_CLI_TOKEN": str(op.session)},
            check=False)
        assert login.returncode == 0, login.stderr
        assert "logged in to" in login.stdout and "duty-op (operator" in login.stdout
        op.printed += [login.stdout, login.stderr]
        assert stat.S_IMODE(op.session.stat().st_mode) == 0o600
        assert stat.S_IMODE(op.session.parent.stat().st_mode) == 0o700

        assert op.json("commands", "list") == []  # a read works; nothing issued yet
        pin = httpx.get(f"{central.base_url}/api/keys/commands", timeout=10,
                        headers={"Authorization": f"Bearer {op.token()}"}).json()["public_key"]
        agent = Agent(tmp_path, GW, mosquitto.port, sim.port,
                      [DeviceDef("gas-1", "gas-detector-v1", 1)],
                      extra=f'\n[commands]\ncentral_public_key = "{pin}"\n')
        agent.start()
        wait_for(lambda: any(g["gw"] == GW and g["online"]
                             for g in op.json("gateways", "list")),
                 timeout=30, what=f"{GW} online in `central gateways list`")
        assert "gas-1" in op.ok("gateways", "show", GW)

        # The edge raises a level-2 gas alarm; the duty officer acknowledges it.
        sim.control({"set": {"device_id": 1, "point": "gas_lel", "value": 60.0}})
        alarm = wait_for(lambda: _active_alarm(op), timeout=30,
                         what=f"level-2 alarm in `central alarms list`; agent:\n{agent.tail(10)}")
        assert str(alarm["id"]) in op.ok("alarms", "list")
        acked = op.json("alarms", "ack", str(alarm["id"]), "--comment", "已通知企业安全员")
        assert (acked["ack_state"], acked["acked_by"]) == ("acknowledged", "duty-op")
        again = op.run("alarms", "ack", str(alarm["id"]))
        assert again.exit_code == 1 and "(409)" in again.stderr
        op.ok("alarms", "comment", str(alarm["id"]), "现场已处置")
        shown = op.json("alarms", "show", str(alarm["id"]))
        assert [(h["action"], h["user"]) for h in shown["history"]
                if h["user"]][-2:] == [("ack", "duty-op"), ("comment", "duty-op")]

        # A command: asked first (declined: nothing issued), then sent with --yes.
        write = ("commands", "send", GW, "write_point", "--arg", "device=gas-1",
                 "--arg", "point=sample_interval_s", "--arg", "value=30")
        declined = op.run(*write, stdin="n\n")
        assert declined.exit_code == 1 and "Send it?" in declined.stderr
        assert op.json("commands", "list") == []
        sent = op.json(*write, "--yes", "--wait", "30")  # follows it until it ends
        assert (sent["issued_by"], sent["args"]["value"]) == ("duty-op", 30)
        done = op.json("commands", "show", sent["cmd_id"])
        assert done["state"] == "succeeded", (done, agent.tail(10))
        assert [e["state"] for e in done["history"]][:2] == ["pending", "sent"]
        assert done["result"]["readback"] == 30
        assert sim.control({"get": {"device_id": 1, "point": "sample_interval_s"}})["value"] == 30
        assert sent["cmd_id"] in op.ok("commands", "list", "--gw", GW)
        nowhere = op.run("commands", "send", "gw-absent", "sync_time", "--yes")
        assert nowhere.exit_code == 1 and "Unknown gateway (404)" in nowhere.stderr

        audit = sqlite_rows(central.db_path, "SELECT actor, action FROM audit_log")
        assert ("duty-op", "alarm.ack") in audit and ("duty-op", "alarm.comment") in audit
        assert any(actor == "duty-op" and action.startswith("command.")
                   for actor, action in audit), audit

        # A viewer may read but not act: 403, named as a role problem.
        viewer = Operator(tmp_path / "viewer.json")
        viewer.ok("login", "--url", central.base_url, "--user", "duty-view", "--password-stdin",
                  stdin=PASSWORD + "\n")
        assert viewer.json("alarms", "show", str(alarm["id"]))["id"] == alarm["id"]
        refused = viewer.run("alarms", "comment", str(alarm["id"]), "查看")
        assert refused.exit_code == 1 and "role" in refused.stderr and "403" in refused.stderr
        refused = viewer.run(*write, "--yes")
        assert refused.exit_code == 1 and "403" in refused.stderr

        # Logged out at central: the old token is refused (401: log in first).
        stale = viewer.token()
        viewer.ok("logout")
        assert not viewer.session.exists()
        viewer.session.write_text(json.dumps({"url": central.base_url, "user": "duty-view",
                                              "token": stale}))
        viewer.session.chmod(0o600)
        gone = viewer.run("gateways", "list")
        assert gone.exit_code == 1 and "log in first" in gone.stderr

        # --wait on a command that cannot run: the gateway is offline, and it expires.
        agent.stop()
        wait_for(lambda: not any(g["gw"] == GW and g["online"]
                                 for g in op.json("gateways", "list")),
                 timeout=20, what=f"{GW} offline")
        late = op.run("commands", "send", GW, "sync_time", "--yes", "--ttl", "1", "--wait", "20")
        assert late.exit_code == 1 and "is expired (not_delivered)" in late.stderr, late.stderr

        for text in op.printed + viewer.printed:
            assert op.token() not in text and stale not in text
    finally:
        if agent is not None:
            agent.stop()
        central.stop()
        sim.stop()

    dead = op.run("alarms", "list")  # central has stopped
    assert dead.exit_code == 1 and "central unreachable at" in dead.stderr


def test_session_file_is_refused_when_others_may_read_it(tmp_path: Path) -> None:
    """A session file with group or other bits is refused (as ssh refuses such a key);
    a broken one names itself; nothing talks to the network before that."""
    op = Operator(tmp_path / "session.json")
    op.session.write_text(json.dumps({"url": f"http://127.0.0.1:{free_port()}", "user": "u",
                                      "token": "secret-token-value"}))
    op.session.chmod(0o640)
    wide = op.run("gateways", "list")
    assert wide.exit_code == 1 and "may be read by others" in wide.stderr
    assert "secret-token-value" not in wide.stderr + wide.stdout
    op.session.chmod(0o600)
    dead = op.run("gateways", "list")
    assert dead.exit_code == 1 and "central unreachable" in dead.stderr
    op.session.write_text("not json")
    broken = op.run("areas", "list")
    assert broken.exit_code == 1 and "not a session file" in broken.stderr


def test_every_operator_command_has_help_with_an_example_and_usage_errors_exit_2() -> None:
    """-h on each operator command shows an example; a bad choice or a missing argument is
    a usage error (2), as is an --arg that is not key=value."""
    commands = [("login",), ("logout",), ("gateways", "list"), ("gateways", "show"),
                ("gateways", "place"), ("alarms", "list"), ("alarms", "show"), ("alarms", "ack"),
                ("alarms", "comment"), ("alarms", "clear"), ("commands", "list"),
                ("commands", "show"), ("commands", "send"), ("areas", "list"), ("areas", "add"),
                ("warnings", "list"), ("warnings", "show"), ("warnings", "issue")]
    for command in commands:
        result = RUN.invoke(cli.app, [*command, "-h"])
        assert result.exit_code == 0, command
        assert f"Example: central {' '.join(command)}" in " ".join(result.stdout.split())
    op = Operator(Path(os.devnull))
    assert op.run("alarms", "list", "--state", "open").exit_code == 2
    assert op.run("commands", "send", "gw-1", "reboot").exit_code == 2
    assert op.run("commands", "send", "gw-1", "sync_time", "--arg", "novalue").exit_code == 2
    assert op.run("alarms", "ack").exit_code == 2


def test_admin_builds_the_area_tree_and_places_a_gateway(tmp_path: Path) -> None:
    """areas add (by parent code, city to site) -> gateways place GW SITE -> areas list shows it
    there; an operator may not add areas (403); a bad level is a usage error, a duplicate code
    central's own 409 in one line."""
    central = Central(tmp_path, free_port())  # no broker: the API serves without ingest
    try:
        central.start()
        cli_user(central.db_url, "city-admin", role="admin")
        cli_user(central.db_url, "duty-op", role="operator")
        admin = Operator(tmp_path / "admin.json")
        admin.ok("login", "--url", central.base_url, "--user", "city-admin", "--password-stdin",
                 stdin=PASSWORD + "\n")
        chain = [("420100", "武汉市", "city", None), ("420107", "青山区", "district", "420100"),
                 ("420107-hw", "红卫路街道", "street", "420107"),
                 ("420107-hw-1", "某社区", "community", "420107-hw"),
                 ("420107-site-02", "青山冶金示范企业", "site", "420107-hw-1")]
        for code, name, level, parent in chain:
            args = ["areas", "add", code, name, "--level", level]
            made = admin.json(*args, *(["--parent", parent] if parent else []))
            assert (made["code"], made["level"]) == (code, level)
        again = admin.run("areas", "add", "420107", "青山区", "--level", "district",
                          "--parent", "420100")
        assert again.exit_code == 1 and "(409)" in again.stderr
        assert admin.run("areas", "add", "x", "某", "--level", "planet").exit_code == 2

        placed = admin.json("gateways", "place", GW, "420107-site-02")
        assert (placed["gw"], placed["area"]["code"]) == (GW, "420107-site-02")
        tree = admin.json("areas", "list")
        site = tree[0]["children"][0]["children"][0]["children"][0]["children"][0]
        assert (site["code"], site["gateways"]) == ("420107-site-02", [GW])
        assert "420107-site-02 青山冶金示范企业" in admin.ok("areas", "list")
        missing = admin.run("gateways", "place", GW, "no-such-site")
        assert missing.exit_code == 1 and "no area with code or id 'no-such-site'" in missing.stderr

        op = Operator(tmp_path / "op.json")
        op.ok("login", "--url", central.base_url, "--user", "duty-op", "--password-stdin",
              stdin=PASSWORD + "\n")
        refused = op.run("areas", "add", "420107-site-03", "某站", "--level", "site",
                         "--parent", "420107-hw-1")
        assert refused.exit_code == 1 and "403" in refused.stderr
    finally:
        central.stop()
