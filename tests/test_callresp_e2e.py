"""叫应 end to end (DESIGN.md §7, issue 11 points 1 and 2): a real central process, a real
Mosquitto, and two gateway stand-ins that verify the signed play_warning commands and answer
with receipt and ack event records through the uplink envelope. A red warning to the 5
terminals of a street: 3 answer, 2 never do; each of those is re-sent 3 times and then
escalated to the district's person in charge, who answers. Once straight through, once with
central SIGKILLed in the middle and restarted."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from protocols.command_keys import parse_public_key
from tests.callresp_gw import TerminalGateway, terminal_fleet
from tests.fakegw import ThreadedFleet
from tests.fleet import Central
from tests.helpers import Mosquitto, wait_for
from tests.identity import bearer, cli_user

pytestmark = pytest.mark.e2e

DEADLINE_S = 10.0  # red, for the test; long enough for central to restart between two steps
# Where nothing restarts, a shorter one: still well above the answers' delays and LATE_MS.
QUICK_DEADLINE_S = 6.0
LATE_MS = 2000  # issue 11: every re-send and escalation within 2 s of its due time
ANSWERS = {"gw-cr-a": {"t-1": 0.5, "t-2": 1.0, "t-3": None},
           "gw-cr-b": {"t-4": 0.5, "t-5": None, "d-1": 0.5}}
SILENT = ("t-3", "t-5")


@dataclass
class Round:
    central: Central
    admin: httpx.Client
    operator: httpx.Client
    auditor: httpx.Client
    gws: dict[str, TerminalGateway]
    fleet: ThreadedFleet
    street: int
    deadline_s: float

    def warning(self, wid: str) -> dict[str, Any]:
        r = self.admin.get(f"/api/callresp/warnings/{wid}")
        return r.json() if r.status_code == 200 else {}  # type: ignore[no-any-return]


def _client(base: str, headers: dict[str, str]) -> httpx.Client:
    return httpx.Client(base_url=base, timeout=15, headers=headers)


@pytest.fixture
def deadline_s() -> float:
    """The red deadline central runs with; a test parametrizes it to change it."""
    return DEADLINE_S


@pytest.fixture
def round_(tmp_path: Path, mosquitto: Mosquitto, deadline_s: float) -> Iterator[Round]:
    cfg = tmp_path / "central.toml"
    cfg.write_text(f"[central.callresp]\ndeadline_red_s = {deadline_s}\nresends = 3\n"
                   "tick_s = 0.2\n")
    central = Central(tmp_path, mosquitto.port, extra_args=["--config", str(cfg)])
    fleet_stack = contextlib.ExitStack()
    clients: list[httpx.Client] = []
    try:
        central.start()
        admin = _client(central.base_url, central.auth_headers())
        clients.append(admin)
        key = parse_public_key(admin.get("/api/keys/commands").json()["public_key"])
        gws, fleet = fleet_stack.enter_context(terminal_fleet(
            admin, mosquitto.host, mosquitto.port, central_key=key, answers=ANSWERS,
            online_timeout=20))

        def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
            r = admin.post(path, json=body)
            assert r.status_code == 201, r.text
            return r.json()  # type: ignore[no-any-return]

        city = post("/api/areas", {"level": "city", "code": "c", "name_zh": "武汉市"})
        dist = post("/api/areas", {"parent_id": city["id"], "level": "district", "code": "d",
                                   "name_zh": "江岸区"})
        street = post("/api/areas", {"parent_id": dist["id"], "level": "street", "code": "s",
                                     "name_zh": "二七街道"})
        for gw, answers in ANSWERS.items():
            for t in answers:
                area = dist["id"] if t == "d-1" else street["id"]
                r = admin.put(f"/api/callresp/terminals/{t}", json={"gw": gw, "area_id": area})
                assert r.status_code == 200, r.text
        r = admin.put("/api/callresp/persons/p-dist", json={
            "name": "区值班领导", "area_id": dist["id"], "role": "in_charge",
            "phone": "13800000000", "terminals": ["d-1"]})
        assert r.status_code == 200, r.text
        cli_user(central.db_url, "op", role="operator", area="d")
        cli_user(central.db_url, "aud", role="auditor")
        operator = _client(central.base_url, bearer(central.base_url, "op"))
        auditor = _client(central.base_url, bearer(central.base_url, "aud"))
        clients += [operator, auditor]
        yield Round(central, admin, operator, auditor, gws, fleet, street["id"], deadline_s)
    finally:
        fleet_stack.close()
        for cl in clients:
            cl.close()
        central.stop()


def _issue(r: Round) -> str:
    rsp = r.operator.post("/api/callresp/warnings", json={
        "level": "red", "text": "暴雨红色预警：请立即组织人员转移", "areas": [r.street]})
    assert rsp.status_code == 201, rsp.text
    assert rsp.json()["created_by"] == "op"
    return str(rsp.json()["id"])


def _boss_answered(r: Round, wid: str) -> dict[str, Any] | None:
    w = r.warning(wid)
    boss = [t for t in w.get("targets", []) if t["ref"] == "p-dist"]
    return w if boss and boss[0]["state"] == "answered" else None


def _check(r: Round, wid: str, w: dict[str, Any]) -> None:
    by = {t["ref"]: t for t in w["targets"]}
    assert {k: v["state"] for k, v in by.items()} == {
        "t-1": "answered", "t-2": "answered", "t-3": "escalated", "t-4": "answered",
        "t-5": "escalated", "p-dist": "answered"}
    for t in ("t-1", "t-2", "t-4"):
        assert by[t]["attempts"] == 1 and by[t]["answered_ms"] >= by[t]["delivered_ms"]
    steps = w["steps"]
    for t in SILENT:
        tid = by[t]["id"]
        mine = [s for s in steps if s["target_id"] == tid]
        # sent, delivered (first play), re-sent 2, 3, 4, escalated: each exactly once
        assert sorted((s["step"], s["attempt"]) for s in mine if s["step"] != "delivered") == [
            ("escalated", 4), ("resent", 2), ("resent", 3), ("resent", 4), ("sent", 1)]
        assert by[t]["escalated_to"] == by["p-dist"]["id"]
        # The timer chain: each deadline runs from the send before it, across any restart.
        chain = sorted((s for s in mine if s["step"] in ("sent", "resent", "escalated")),
                       key=lambda s: (s["attempt"], s["step"] == "escalated"))
        for before, after in itertools.pairwise(chain):
            assert after["due_ms"] == before["at_ms"] + int(r.deadline_s * 1000), (before, after)
    timed = [s for s in steps if s["due_ms"] is not None]
    assert len(timed) == 8  # 2 × (3 re-sends + 1 escalation)
    late = [(s["target_id"], s["step"], s["attempt"], s["at_ms"] - s["due_ms"]) for s in timed]
    assert all(0 <= ms <= LATE_MS for *_, ms in late), late

    # At the gateways: every re-send played once (distinct signed commands), none twice.
    gwa, gwb = r.gws["gw-cr-a"], r.gws["gw-cr-b"]
    assert [gwa.play_count(wid, t) for t in ("t-1", "t-2", "t-3")] == [1, 1, 4]
    assert [gwb.play_count(wid, t) for t in ("t-4", "t-5", "d-1")] == [1, 4, 1]
    # ... and each arrived within 2 s of its step's due time.
    for s in timed:
        if s["step"] != "resent":
            continue
        (cmd_id,) = s["detail"]["cmd_ids"]
        gw = gwa if s["target_id"] == by["t-3"]["id"] else gwb
        term = "t-3" if gw is gwa else "t-5"
        i = gw.plays[(wid, term)].index(cmd_id)
        assert 0 <= gw.play_times[(wid, term)][i] - s["due_ms"] <= LATE_MS, s

    # The audit log holds every step.
    def count(action: str) -> int:
        rows = r.auditor.get("/api/audit", params={"action": action, "limit": 1000}).json()
        return sum(1 for a in rows if a["detail"].get("warning") == wid)

    assert (count("callresp.sent"), count("callresp.resent"), count("callresp.escalated"),
            count("callresp.answered"), count("callresp.delivered")) == (6, 6, 2, 4, 6)

    stats = r.admin.get("/api/callresp/stats").json()
    (ws,) = stats["by_warning"]
    assert (ws["targets"], ws["answered"]) == (6, 4)


@pytest.mark.parametrize("deadline_s", [QUICK_DEADLINE_S])
def test_red_warning_resent_then_escalated(round_: Round) -> None:
    """3 of 5 terminals answer; the 2 others are re-sent 3 times each and escalated to the
    district's person in charge, all within 2 s of their due times; API and audit log show
    every step with its time."""
    r = round_
    wid = _issue(r)
    w = wait_for(lambda: _boss_answered(r, wid), timeout=4 * r.deadline_s + 40, interval=0.5,
                 what=f"the person in charge answered; central:\n{r.central.tail(20)}")
    _check(r, wid, w)


def test_central_killed_mid_workflow_keeps_every_deadline(round_: Round) -> None:
    """Central SIGKILLed after the first re-sends and restarted: the remaining re-sends and
    the escalations still happen within 2 s of their due times, and none twice."""
    r = round_
    wid = _issue(r)

    def resent_once() -> bool:  # played at the gateways: between two due times
        return (r.gws["gw-cr-a"].play_count(wid, "t-3") == 2
                and r.gws["gw-cr-b"].play_count(wid, "t-5") == 2)

    wait_for(resent_once, timeout=DEADLINE_S + 20, interval=0.1, what="the first re-sends")
    r.central.kill()
    killed_ms = time.time_ns() // 1_000_000
    r.central.start()
    w = wait_for(lambda: _boss_answered(r, wid), timeout=4 * DEADLINE_S + 40, interval=0.5,
                 what=f"the person in charge answered; central:\n{r.central.tail(20)}")
    _check(r, wid, w)
    timed = [s["at_ms"] for s in w["steps"] if s["due_ms"] is not None]
    # mid-workflow: re-sends before the kill, and re-sends and escalations after it
    assert sum(t < killed_ms for t in timed) == 2 and sum(t > killed_ms for t in timed) == 6


def test_gateway_retired_mid_warning_and_before_the_next(round_: Round) -> None:
    """gw-cr-a retired while a warning runs (t-1 and t-2 answered, t-3 silent): t-3 ends
    cancelled, plays no more and escalates nowhere, while gw-cr-b's silent t-5 is re-sent and
    escalated as before; a warning issued after the retire leaves gw-cr-a's terminals out
    (named as skipped) and plays nothing there."""
    r = round_
    gwa, gwb = r.gws["gw-cr-a"], r.gws["gw-cr-b"]
    wid = _issue(r)

    def states(w: str) -> dict[str, str]:
        return {t["ref"]: t["state"] for t in r.warning(w).get("targets", [])}

    wait_for(lambda: states(wid).get("t-1") == states(wid).get("t-2") == "answered",
             timeout=DEADLINE_S / 2, interval=0.1, what="t-1 and t-2 answered")
    rsp = r.admin.post("/api/gateways/gw-cr-a/retire", json={"reason": "设备拆除，不再使用", "force": True})
    assert rsp.status_code == 200, rsp.text
    wait_for(lambda: states(wid).get("t-3") == "cancelled", timeout=DEADLINE_S / 2,
             interval=0.1, what=f"t-3 cancelled; central:\n{r.central.tail(20)}")
    rsp = r.operator.post("/api/callresp/warnings", json={
        "level": "red", "text": "暴雨红色预警：请立即组织人员转移", "areas": [r.street]})
    assert rsp.status_code == 201, rsp.text
    wid2 = rsp.json()["id"]
    assert [t["ref"] for t in rsp.json()["targets"]] == ["t-4", "t-5"]
    assert [(s["terminal"], s["reason"]) for s in rsp.json()["skipped"]] == [
        ("t-1", "gateway_retired"), ("t-2", "gateway_retired"), ("t-3", "gateway_retired")]

    for w in (wid, wid2):
        wait_for(lambda w=w: _boss_answered(r, w), timeout=4 * DEADLINE_S + 40, interval=0.5,
                 what=f"the person in charge answered {w}; central:\n{r.central.tail(20)}")
    assert states(wid) == {"t-1": "answered", "t-2": "answered", "t-3": "cancelled",
                           "t-4": "answered", "t-5": "escalated", "p-dist": "answered"}
    assert states(wid2) == {"t-4": "answered", "t-5": "escalated", "p-dist": "answered"}
    escalated = [s["target_id"] for s in r.warning(wid)["steps"] if s["step"] == "escalated"]
    assert escalated == [next(t["id"] for t in r.warning(wid)["targets"] if t["ref"] == "t-5")]
    assert [gwa.play_count(wid, t) for t in ("t-1", "t-2", "t-3")] == [1, 1, 1]
    assert gwb.play_count(wid, "t-5") == gwb.play_count(wid2, "t-5") == 4
    assert not [key for key in gwa.plays if key[0] == wid2]
    rows = r.auditor.get("/api/audit", params={"action": "callresp.cancelled"}).json()
    assert [(a["detail"]["warning"], a["detail"]["gw"]) for a in rows] == [(wid, "gw-cr-a")]
