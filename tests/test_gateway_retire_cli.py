"""`central gateways retire / unretire / retired` against a running central process, a
private Mosquitto and fake gateways speaking the uplink contract: asks first, admin only
(403), unknown gateway 404, open alarms 409; a retired gateway's batches are refused (not
stored, not acked) and counted; unretired, its resent batch is stored: nothing lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from central.identity.retire import REFRESH_S
from tests.fakegw import FakeGateway
from tests.fleet import Central, sqlite_rows
from tests.helpers import Mosquitto, wait_for
from tests.identity import PASSWORD, cli_user
from tests.test_operator_cli import Operator

OLD, KEEP = "gw-ret-01", "gw-keep-01"
REASON = "replaced by gw-keep-01"


def _readings(central: Central, gw: str) -> int:
    return int(sqlite_rows(central.db_path, "SELECT count(*) FROM readings WHERE gw = ?",
                           (gw,))[0][0])


def _login(op: Operator, central: Central, user: str) -> None:
    op.ok("login", "--url", central.base_url, "--user", user, "--password-stdin",
          stdin=PASSWORD + "\n")


@pytest.mark.e2e
def test_retire_and_unretire_from_the_cli(tmp_path: Path, mosquitto: Mosquitto) -> None:
    central = Central(tmp_path, mosquitto.port)
    gws = [FakeGateway(gw, "127.0.0.1", mosquitto.port, points=2, ack_timeout_s=0.5)
           for gw in (OLD, KEEP)]
    try:
        central.start()
        cli_user(central.db_url, "ops-admin", role="admin")
        cli_user(central.db_url, "ops-view", role="viewer")
        admin, viewer = Operator(tmp_path / "a.json"), Operator(tmp_path / "v.json")
        _login(admin, central, "ops-admin")
        _login(viewer, central, "ops-view")
        for g in gws:
            g.connect()
            g.client.loop_start()
            g.produce()
        wait_for(lambda: all(g.unacked == 0 for g in gws), timeout=30, what="first batches acked")
        assert {g["gw"] for g in admin.json("gateways", "list")} == {OLD, KEEP}

        help_text = admin.ok("gateways", "retire", "--help")
        assert "Example" in help_text and "--reason" in help_text
        refused = viewer.run("gateways", "retire", OLD, "--reason", REASON, "--yes")
        assert refused.exit_code == 1 and "(403)" in refused.stderr
        unknown = admin.run("gateways", "retire", "gw-nope", "--reason", REASON, "--yes")
        assert unknown.exit_code == 1 and "(404)" in unknown.stderr
        declined = admin.run("gateways", "retire", OLD, "--reason", REASON, stdin="n\n")
        assert declined.exit_code == 1 and "nothing done" in declined.stderr
        no_reason = admin.run("gateways", "retire", OLD, "--yes")
        assert no_reason.exit_code == 2  # a usage error: the reason is required

        done = admin.json("gateways", "retire", OLD, "--reason", REASON, "--yes")
        assert (done["gw"], done["retired_by"], done["reason"]) == (OLD, "ops-admin", REASON)
        again = admin.run("gateways", "retire", OLD, "--reason", REASON, "--yes")
        assert again.exit_code == 1 and "(409)" in again.stderr
        assert [g["gw"] for g in admin.json("gateways", "list")] == [KEEP]
        assert admin.json("gateways", "show", OLD)["gw"] == OLD  # its history stays readable

        # Heard again: refused, counted, not stored, not acked; the other gateway is stored.
        held = _readings(central, OLD)
        gws[0].produce()
        gws[1].produce()
        wait_for(lambda: admin.json("gateways", "retired")[0]["refused"] >= 1,
                 timeout=30, what="the retired gateway's batch refused and counted")
        wait_for(lambda: gws[1].unacked == 0, timeout=30, what=f"{KEEP} acked")
        assert _readings(central, OLD) == held and gws[0].unacked == 1
        assert OLD in admin.ok("gateways", "retired")
        assert [g["gw"] for g in admin.json("gateways", "list")] == [KEEP]

        # Back in service: its resent batch is stored; the audit log has both acts.
        back = admin.json("gateways", "unretire", OLD, "--reason", "repaired", "--yes")
        assert back["refused"] >= 1
        assert admin.json("gateways", "retired") == []

        def resent() -> bool:
            gws[0].resend_due()
            return gws[0].unacked == 0

        wait_for(resent, timeout=30 + REFRESH_S, what="the held batch stored after unretire")
        assert _readings(central, OLD) == held + 2
        audit = sqlite_rows(central.db_path, "SELECT actor, action, detail FROM audit_log"
                                             " WHERE target = ? ORDER BY seq", (f"gateway:{OLD}",))
        assert [(a, b) for a, b, _ in audit] == [("ops-admin", "gateway.retired"),
                                                 ("ops-admin", "gateway.unretired")]
        assert REASON in audit[0][2]
    finally:
        for g in gws:
            g.client.disconnect()
            g.client.loop_stop()
        central.stop()
