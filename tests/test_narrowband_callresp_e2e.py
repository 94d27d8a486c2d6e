"""叫应 by radio end to end (issue 11 must-show 3, DESIGN.md §5 "Downlink", §7): a gateway whose
IP is cut receives a red warning by BeiDou (or PDT), its 叫应 terminal plays it, the scripted
person presses the button, and the acknowledgement goes back up by radio and answers the
warning at central; when IP returns the IP copy of the command plays nothing again (one signed
command plays once) and the IP copies of the receipt and the ack merge into the radio copies:
one delivered, one answer, no duplicate.

Real parts in one event loop: a private Mosquitto, central (ingest, commands, the 叫应
workflow, its narrowband receiver and downlink), the edge agent (`run_agent`, wired by default:
no stand-in handler) with a Modbus TCP gas detector and a terminal simulator on loopback TCP in
its `[[terminals]]`, a loopback proxy on the agent's MQTT link, and two radio simulators on
ptys.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from central.config.settings import Settings
from central.storage.timecheck import NARROWBAND_COPY
from device_profiles import find_profile
from edge_agent import EdgeError
from edge_agent.outbox.store import read_status
from firmware_stubs.modbus_sim import ModbusTcpSimulator
from firmware_stubs.terminal_sim import TcpTerminalSimulator
from protocols import terminal as tm
from tests.helpers import Mosquitto, until
from tests.netproxy import LinkProxy
from tests.test_narrowband_e2e import (
    GW,
    KEY,
    WAIT_S,
    _metric,
    _on_bearer,
    agent_running,
    central,
    edge_config,
    radios,
)

pytestmark = pytest.mark.e2e

until = partial(until, timeout=WAIT_S)
TERMINAL = "t-101"
TEXT = "暴雨红色预警：青山区未来3小时降雨量将达100毫米以上，请立即组织低洼地带人员转移。"


@pytest.mark.parametrize("bearer", ["beidou", "pdt"])
async def test_warning_down_and_ack_up_by_radio_while_ip_is_cut_then_ip_copy_merges(
        tmp_path: Path, mosquitto: Mosquitto, bearer: str) -> None:
    """IP cut: a red warning reaches the gateway's terminal by radio, in segments, signed; the
    person's ack answers the warning at central by radio; IP back: the IP copy of the command
    plays nothing again, the IP copies of the events merge, one delivered and one answer."""
    gas = find_profile("gas-detector-v1")
    proxy = LinkProxy(mosquitto.host, mosquitto.port)
    proxy.start()
    try:
        async with ModbusTcpSimulator(gas) as modbus, radios(bearer) as link, \
                TcpTerminalSimulator(TERMINAL, heartbeat_s=5, press_after_s=0.3) as term:
            modbus.set_value("gas_lel", 3.0)
            settings = Settings(
                db_url=f"sqlite:///{tmp_path}/central.db", mqtt_host=mosquitto.host,
                mqtt_port=mosquitto.port, mqtt_client_id="central-cr-radio",
                narrowband_port=link.central_port, narrowband_bearer=bearer,
                narrowband_gateways=[link.gateway_entry], narrowband_radio_id=2002,
                narrowband_interval_s=0.2,
                # a BD-2 level-3 card's 77 bytes (BeiDou): the warning goes in segments
                narrowband_max_payload_bytes=77, narrowband_downlink_segments=8)
            async with central(settings) as api:
                key = (await api.get("/api/keys/commands")).json()["public_key"]
                config = edge_config(tmp_path, proxy, modbus.port, poll_s=0.5, narrowband=(
                    f'port = "{link.gateway_port}"\n{link.edge_keys}'
                    f'key = "{KEY.hex()}"\nafter_s = 1\nheartbeat_s = 600\n'), more=(
                    f'[commands]\ncentral_public_key = "{key}"\n'
                    f'[[terminals]]\nid = "{TERMINAL}"\ntcp = "127.0.0.1:{term.port}"\n'))
                async with agent_running(config):
                    await _round(api, config, proxy, term, bearer, tmp_path)
    finally:
        proxy.stop()


async def _round(api: Any, config: Any, proxy: LinkProxy, term: TcpTerminalSimulator,
                 bearer: str, tmp_path: Path) -> None:
    outbox, gateway = partial(outbox_status, config), partial(gateway_view, api)

    async def target() -> dict[str, Any]:
        w = (await api.get(f"/api/callresp/warnings/{wid}")).json()
        (t,) = w["targets"]
        return t

    await until(outbox, "the outbox")
    await until(gateway, "the birth at central")
    r = await api.put(f"/api/callresp/terminals/{TERMINAL}", json={"gw": GW})
    assert r.status_code == 200, r.text

    # 三断: IP is cut; the gateway's radio heartbeat tells central it is on the radio now.
    proxy.set_mode("drop")
    await until(lambda: outbox().meta.get("uplink_state") == "disconnected", "the cut")
    await until(lambda: _on_bearer(gateway(), bearer), f"a {bearer} heartbeat")

    r = await api.post("/api/callresp/warnings", json={
        "level": "red", "text": TEXT, "terminals": [TERMINAL]})
    assert r.status_code == 201, r.text
    wid = r.json()["id"]

    # Down by radio: the terminal plays the warning, verified and whole.
    await until(lambda: term.played, f"the warning by {bearer} on the terminal")
    (played,) = term.played
    assert played.play.level is tm.WarningLevel.RED and played.play.text == TEXT
    assert outbox().meta.get("uplink_state") == "disconnected"  # not over IP

    # Up by radio: the ack answers the warning at central while IP is still cut.
    async def answered() -> dict[str, Any] | None:
        t = await target()
        return t if t["state"] == "answered" else None

    t = await until(answered, f"the ack by {bearer}")
    assert t["answered_by"] == "button-1"
    assert outbox().meta.get("uplink_state") == "disconnected"  # answered while IP is cut
    assert outbox().backlog > 0  # the acks did not come over IP
    copies = _callresp_rows(tmp_path)
    assert [(kind, flags & NARROWBAND_COPY != 0) for kind, flags in copies] == [
        ("delivered", True), ("ack", True)]

    # IP returns: the outbox drains, the IP copies merge into the radio copies.
    proxy.set_mode("pass")
    cmd = await until(partial(_command, api, wid), "the IP copy of the command to succeed")
    assert cmd["result"]["terminals"] == {TERMINAL: {"result": "delivered"}}
    await until(lambda: outbox().backlog == 0, "the outbox to drain over IP")
    rows = _callresp_rows(tmp_path)
    assert [(kind, flags & NARROWBAND_COPY != 0) for kind, flags in rows] == [
        ("delivered", False), ("ack", False)]  # merged: the full records, not new ones
    assert (await target())["answered_ms"] == t["answered_ms"]
    assert _steps(tmp_path, "answered") == 1 and _steps(tmp_path, "delivered") == 1
    metrics = (await api.get("/metrics")).text
    assert _metric(metrics, "records_merged_total") >= 2
    assert 'narrowband_downlink_total{result="accepted"}' in metrics
    assert len(term.played) == 1  # the terminal played the command once, by radio
    assert len(term.acks_confirmed) == 1


async def _command(api: Any, wid: str) -> dict[str, Any] | None:
    """The warning's one command, once central holds its result (sent over IP)."""
    w = (await api.get(f"/api/callresp/warnings/{wid}")).json()
    (cmd_id,) = {c for st in w["steps"] if st["step"] == "sent" for c in st["detail"]["cmd_ids"]}
    cmd = (await api.get(f"/api/commands/{cmd_id}")).json()
    return cmd if cmd["state"] == "succeeded" else None


def outbox_status(config: Any) -> Any:
    """The gateway's outbox status, None while the agent is still creating it."""
    try:
        return read_status(config.outbox_path)
    except EdgeError:
        return None


async def gateway_view(api: Any) -> dict[str, Any] | None:
    r = await api.get(f"/api/gateways/{GW}")
    return r.json() if r.status_code == 200 else None


def _db(tmp_path: Path) -> Callable[[str], list[Any]]:
    def q(sql: str) -> list[Any]:
        with sqlite3.connect(tmp_path / "central.db") as conn:
            return conn.execute(sql).fetchall()
    return q


def _callresp_rows(tmp_path: Path) -> list[tuple[str, int]]:
    rows = _db(tmp_path)("SELECT json_extract(attrs, '$.type'), flags FROM events"
                         " WHERE json_extract(attrs, '$.event') = 'callresp' ORDER BY seq")
    return [(str(a), int(b)) for a, b in rows]


def _steps(tmp_path: Path, step: str) -> int:
    return int(_db(tmp_path)(f"SELECT count(*) FROM cr_steps WHERE step = '{step}'")[0][0])
