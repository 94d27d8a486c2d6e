"""`central warnings …` (叫应 from a shell) against a running central process: an operator
issues a warning to a street after the confirmation (declining it issues nothing), lists and
shows it; a target outside the operator's area is central's 403 in one line, exit 1; a
warning with no target, a blank text or an unknown level is a usage error (2)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from central.storage import open_storage
from protocols.envelope import State
from tests.fleet import Central
from tests.helpers import free_port
from tests.identity import PASSWORD, cli_user
from tests.test_operator_cli import Operator

TEXT = "暴雨红色预警：请立即组织人员转移"


def _login(central: Central, session: Path, user: str) -> Operator:
    op = Operator(session)
    op.ok("login", "--url", central.base_url, "--user", user, "--password-stdin",
          stdin=PASSWORD + "\n")
    return op


def test_operator_issues_lists_and_shows_a_warning(tmp_path: Path) -> None:
    central = Central(tmp_path, free_port())  # no broker: the API serves without ingest
    try:
        central.start()
        cli_user(central.db_url, "city-admin", role="admin")
        admin = _login(central, tmp_path / "admin.json", "city-admin")
        for code, name, level, parent in [("420100", "武汉市", "city", None),
                                          ("420102", "江岸区", "district", "420100"),
                                          ("420102-s01", "二七街道", "street", "420102"),
                                          ("420105", "汉阳区", "district", "420100")]:
            admin.json("areas", "add", code, name, "--level", level,
                       *(["--parent", parent] if parent else []))
        ids = {a["code"]: a["id"] for a in _walk(admin.json("areas", "list"))}
        auth = {"Authorization": f"Bearer {admin.token()}"}
        for terminal, area in (("t-1", "420102-s01"), ("t-2", "420105")):
            r = httpx.put(f"{central.base_url}/api/callresp/terminals/{terminal}", headers=auth,
                          json={"gw": "gw-1", "area_id": ids[area], "name": terminal})
            assert r.status_code == 200, r.text
        cli_user(central.db_url, "duty-ja", role="operator", area="420102")
        op = _login(central, tmp_path / "op.json", "duty-ja")

        issue = ["warnings", "issue", "--level", "red", "--text", TEXT, "--area", "420102-s01"]
        declined = op.run(*issue, stdin="n\n")
        assert declined.exit_code == 1 and "not issued" in declined.stderr
        assert "红色" in declined.stderr and "area 420102-s01" in declined.stderr
        assert op.json("warnings", "list") == []

        w = op.json(*issue, "--yes")
        assert (w["level"], w["text"], w["created_by"]) == ("red", TEXT, "duty-ja")
        assert [(t["ref"], t["state"]) for t in w["targets"]] == [("t-1", "sent")]
        assert [x["id"] for x in op.json("warnings", "list")] == [w["id"]]
        assert "红色" in op.ok("warnings", "list") and w["id"] in op.ok("warnings", "list")
        shown = op.ok("warnings", "show", w["id"])
        assert "t-1" in shown and "二七街道" in shown

        outside = op.run("warnings", "issue", "--level", "blue", "--text", "大风",
                         "--terminal", "t-2", "--yes")
        assert outside.exit_code == 1 and "403" in outside.stderr, outside.stderr
        assert len(op.json("warnings", "list")) == 1
        unknown = op.run("warnings", "show", "w-nope")
        assert unknown.exit_code == 1 and "404" in unknown.stderr

        assert op.run("warnings", "issue", "--level", "red", "--text", TEXT).exit_code == 2
        assert op.run("warnings", "issue", "--level", "red", "--text", "  ",
                      "--terminal", "t-1").exit_code == 2
        assert op.run("warnings", "issue", "--level", "purple", "--text", TEXT,
                      "--terminal", "t-1").exit_code == 2
    finally:
        central.stop()


def test_issue_names_the_terminals_left_out_on_a_retired_gateway(tmp_path: Path) -> None:
    """A terminal on a retired gateway is not called; the operator is told which and why."""
    central = Central(tmp_path, free_port())
    try:
        central.start()
        cli_user(central.db_url, "city-admin", role="admin")
        admin = _login(central, tmp_path / "admin.json", "city-admin")
        admin.json("areas", "add", "420100", "武汉市", "--level", "city")
        area = admin.json("areas", "add", "420102", "江岸区", "--level", "district",
                          "--parent", "420100")
        auth = {"Authorization": f"Bearer {admin.token()}"}
        for terminal, gw in (("t-1", "gw-1"), ("t-9", "gw-9")):
            r = httpx.put(f"{central.base_url}/api/callresp/terminals/{terminal}", headers=auth,
                          json={"gw": gw, "area_id": area["id"], "name": terminal})
            assert r.status_code == 200, r.text

        async def known() -> None:
            async with open_storage(central.db_url) as st:
                await st.record_state("gw-9", State(online=True, boot_id="b", version="1",
                                                    bearer="mqtt", backlog=0, ts_ms=1))
        asyncio.run(known())
        r = httpx.post(f"{central.base_url}/api/gateways/gw-9/retire", headers=auth,
                       json={"reason": "设备拆除", "force": True})
        assert r.status_code == 200, r.text

        issued = admin.run("warnings", "issue", "--level", "blue", "--text", "大风蓝色预警",
                           "--area", "420102", "--yes")
        assert issued.exit_code == 0, issued.stderr
        assert "t-9" in issued.stderr and "gw-9" in issued.stderr, issued.stderr
        assert "网关已退役" in issued.stderr and "t-1" not in issued.stderr
    finally:
        central.stop()


def _walk(nodes: list[dict[str, object]]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for n in nodes:
        out.append(n)
        children = n.get("children")
        out += _walk(children if isinstance(children, list) else [])
    return out
