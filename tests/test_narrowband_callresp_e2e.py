"""叫应 by radio end to end (issue 11 must-show 3, DESIGN.md §5 "Downlink", §7): a gateway whose
IP is cut receives a red warning by BeiDou (or PDT), the callback that stands for its 叫应
terminal gets it, the person's acknowledgement goes back up by radio and answers the warning
at central; when IP returns the IP copy of the acknowledgement merges into the radio copy: one
answer, one record, no duplicate.

Real parts in one event loop: a private Mosquitto, central (ingest, commands, the 叫应
workflow, its narrowband receiver and downlink), the edge agent (`run_agent`) with a Modbus TCP
gas detector, a loopback proxy on the agent's MQTT link, and two radio simulators on ptys.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from central.config.settings import Settings
from central.storage.timecheck import NARROWBAND_COPY
from device_profiles import find_profile
from edge_agent import EdgeError
from edge_agent.agent import run_agent
from edge_agent.config.site import parse_config
from edge_agent.narrowband.downlink import WarningHandler
from edge_agent.outbox.lanes import NewRecord
from edge_agent.outbox.store import Outbox, read_status
from firmware_stubs.modbus_sim import ModbusTcpSimulator
from protocols.callresp import CallRespEvent, EventType, event_attrs
from protocols.envelope import RecordKind
from protocols.narrowband_down import RadioWarning
from tests.helpers import Mosquitto, until
from tests.netproxy import LinkProxy
from tests.test_narrowband_e2e import GW, KEY, WAIT_S, _metric, _on_bearer, central, radios

pytestmark = pytest.mark.e2e

until = partial(until, timeout=WAIT_S)
TERMINAL = "t-101"
TEXT = "暴雨红色预警：青山区未来3小时降雨量将达100毫米以上，请立即组织低洼地带人员转移。"


class Person:
    """The 叫应 terminal and the person beside it: the radio warning's handler. It records
    what it was given and, like the terminal driver, appends the `delivered` receipt and the
    button's `ack` to the gateway's outbox as 叫应 EVENT records."""

    def __init__(self) -> None:
        self.warnings: list[RadioWarning] = []

    def handler(self, outbox: Outbox) -> WarningHandler:
        async def play(warning: RadioWarning) -> None:
            self.warnings.append(warning)
            now = time.time_ns() // 1_000_000
            events = [CallRespEvent(EventType.DELIVERED, warning.args.warning_id, t, now,
                                    cmd_id=warning.command.cmd_id)
                      for t in warning.args.terminals]
            events += [CallRespEvent(EventType.ACK, warning.args.warning_id, t, now + 1,
                                     cmd_id=warning.command.cmd_id, by="button-1")
                       for t in warning.args.terminals]
            await outbox.append([NewRecord(RecordKind.EVENT, ev.at_ms, None, None,
                                           attrs=event_attrs(ev)) for ev in events])
        return play


@pytest.mark.parametrize("bearer", ["beidou", "pdt"])
async def test_warning_down_and_ack_up_by_radio_while_ip_is_cut_then_ip_copy_merges(
        tmp_path: Path, mosquitto: Mosquitto, bearer: str) -> None:
    """IP cut: a red warning reaches the gateway's handler by radio, in segments, signed; its
    ack answers the warning at central by radio; IP back: the IP copies merge, one answer."""
    gas = find_profile("gas-detector-v1")
    proxy = LinkProxy(mosquitto.host, mosquitto.port)
    proxy.start()
    person = Person()
    try:
        async with ModbusTcpSimulator(gas) as modbus, radios(bearer) as link:
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
                config = parse_config(
                    f'[gateway]\nid = "{GW}"\ndata_dir = "{tmp_path / "edge"}"\n'
                    f'[mqtt]\nhost = "{proxy.host}"\nport = {proxy.port}\n'
                    f'reconnect_max_s = 1\n[status]\ninterval_s = 0.2\n'
                    f'[commands]\ncentral_public_key = "{key}"\n'
                    f'[narrowband]\nport = "{link.gateway_port}"\n{link.edge_keys}'
                    f'key = "{KEY.hex()}"\nafter_s = 1\nheartbeat_s = 600\n'
                    f'[[devices]]\nid = "gas-1"\nprofile = "gas-detector-v1"\n'
                    f'poll_interval_s = 0.5\ntransport = {{kind = "tcp", host = "127.0.0.1", '
                    f'port = {modbus.port}}}\n')
                stop = asyncio.Event()
                agent = asyncio.create_task(run_agent(
                    config, stop=stop, install_signal_handlers=False,
                    warning_handler=person.handler))
                try:
                    await _round(api, config, proxy, person, bearer, tmp_path)
                finally:
                    stop.set()
                    await asyncio.wait_for(agent, 30)
    finally:
        proxy.stop()


async def _round(api: Any, config: Any, proxy: LinkProxy, person: Person, bearer: str,
                 tmp_path: Path) -> None:
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

    # Down by radio: the handler gets the warning, verified and whole.
    await until(lambda: person.warnings, f"the warning by {bearer}")
    (got,) = person.warnings
    assert (got.args.warning_id, got.args.level, got.args.terminals) == (
        wid, "red", (TERMINAL,))
    assert got.args.text == TEXT and not got.truncated
    assert outbox().meta.get("uplink_state") == "disconnected"  # not over IP

    # Up by radio: the ack answers the warning at central while IP is still cut.
    async def answered() -> dict[str, Any] | None:
        t = await target()
        return t if t["state"] == "answered" else None

    t = await until(answered, f"the ack by {bearer}")
    assert t["answered_by"] == "button-1"
    assert outbox().backlog > 0  # the acks did not come over IP
    copies = _callresp_rows(tmp_path)
    assert [(kind, flags & NARROWBAND_COPY != 0) for kind, flags in copies] == [
        ("delivered", True), ("ack", True)]

    # IP returns: the outbox drains, the IP copies merge into the radio copies.
    proxy.set_mode("pass")
    await until(lambda: outbox().backlog == 0, "the outbox to drain over IP")
    rows = _callresp_rows(tmp_path)
    assert [(kind, flags & NARROWBAND_COPY != 0) for kind, flags in rows] == [
        ("delivered", False), ("ack", False)]  # merged: the full records, not new ones
    assert (await target())["answered_ms"] == t["answered_ms"]
    assert _steps(tmp_path, "answered") == 1 and _steps(tmp_path, "delivered") == 1
    metrics = (await api.get("/metrics")).text
    assert _metric(metrics, "records_merged_total") >= 2
    assert 'narrowband_downlink_total{result="accepted"}' in metrics
    assert len(person.warnings) == 1  # the radio warning went to the handler once


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
