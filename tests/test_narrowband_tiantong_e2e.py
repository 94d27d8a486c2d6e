"""Tiantong (天通) as the third narrowband bearer (issue 11 must-show 4, DESIGN.md §5): while IP
is cut, a gas alarm and a 叫应 acknowledgement reach central by simulated satellite SMS, through
a lost registration and failed sends that the gateway's modem rides out with retries and counts.

Real parts in one event loop: a private Mosquitto, central (ingest, the 叫应 workflow, its
narrowband receiver on a Tiantong module), the edge agent (`run_agent`) with a Modbus TCP gas
detector, a loopback proxy on the agent's MQTT link, and two Tiantong module simulators on ptys
linked by one simulated network.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from central.config.settings import NarrowbandGateway, Settings
from device_profiles import find_profile
from edge_agent.narrowband.downlink import LoggingWarningHandler, WarningHandler
from edge_agent.outbox.lanes import NewRecord
from edge_agent.outbox.store import Outbox
from firmware_stubs.modbus_sim import ModbusTcpSimulator
from firmware_stubs.tiantong_sim import TiantongModuleSimulator, TiantongNetwork
from protocols.callresp import CallRespEvent, EventType, event_attrs
from protocols.envelope import RecordKind
from tests import test_narrowband_e2e as rig
from tests.helpers import Mosquitto, until
from tests.netproxy import LinkProxy
from tests.test_narrowband_callresp_e2e import gateway_view, outbox_status

pytestmark = pytest.mark.e2e

until = partial(until, timeout=rig.WAIT_S)
GW_NUMBER, CENTRAL_NUMBER = "+8617400000001", "+8617400000009"
TERMINAL = "t-201"


async def test_alarm_and_ack_by_tiantong_sms_while_ip_is_cut(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    """IP cut, registration lost and a send failing once: the gas alarm and the person's ack
    still reach central by Tiantong SMS; the alarm is active and the warning answered."""
    gas = find_profile("gas-detector-v1")
    proxy = LinkProxy(mosquitto.host, mosquitto.port)
    proxy.start()
    outboxes: list[Outbox] = []

    def keep_outbox(outbox: Outbox) -> WarningHandler:  # the outbox a terminal writes to
        outboxes.append(outbox)
        return LoggingWarningHandler()

    network = TiantongNetwork()
    try:
        async with ModbusTcpSimulator(gas) as modbus, \
                TiantongModuleSimulator(network, GW_NUMBER) as gw_module, \
                TiantongModuleSimulator(network, CENTRAL_NUMBER) as central_module:
            modbus.set_value("gas_lel", 3.0)
            settings = Settings(
                db_url=f"sqlite:///{tmp_path}/central.db", mqtt_host=mosquitto.host,
                mqtt_port=mosquitto.port, mqtt_client_id="central-tiantong",
                narrowband_port=central_module.link_path, narrowband_bearer="tiantong",
                narrowband_gateways=[NarrowbandGateway(gw=rig.GW, phone=GW_NUMBER,
                                                       key=rig.KEY.hex())])
            config = rig.edge_config(tmp_path, proxy, modbus.port, poll_s=0.5, narrowband=(
                f'bearer = "tiantong"\nport = "{gw_module.link_path}"\n'
                f'central_number = "{CENTRAL_NUMBER}"\nnumber = "{GW_NUMBER}"\n'
                f'interval_s = 0\nkey = "{rig.KEY.hex()}"\nafter_s = 1\nheartbeat_s = 600\n'))
            async with rig.central(settings) as api, rig.agent_running(
                    config, warning_handler=keep_outbox):
                await _round(api, config, proxy, outboxes, gw_module, modbus)
    finally:
        proxy.stop()


async def _round(api: Any, config: Any, proxy: LinkProxy, outboxes: list[Outbox],
                 gw_module: TiantongModuleSimulator, modbus: ModbusTcpSimulator) -> None:
    outbox, gateway = partial(outbox_status, config), partial(gateway_view, api)

    async def alarms() -> list[dict[str, Any]]:
        return (await api.get("/api/alarms", params={"gw": rig.GW})).json()

    async def target() -> dict[str, Any] | None:
        w = (await api.get(f"/api/callresp/warnings/{wid}")).json()
        (t,) = w["targets"]
        return t if t["state"] == "answered" else None

    await until(outbox, "the outbox")
    await until(gateway, "the birth at central")
    r = await api.put(f"/api/callresp/terminals/{TERMINAL}", json={"gw": rig.GW})
    assert r.status_code == 200, r.text

    # 三断, and the module has lost the satellite too: nothing can go yet.
    gw_module.set_faults(registered=False)
    proxy.set_mode("drop")
    await until(lambda: outbox().meta.get("uplink_state") == "disconnected", "the cut")
    r = await api.post("/api/callresp/warnings", json={
        "level": "red", "text": "山洪红色预警", "terminals": [TERMINAL]})
    assert r.status_code == 201, r.text
    wid = r.json()["id"]
    modbus.set_value("gas_lel", 60.0)  # the gas leaks
    (ob,) = outboxes  # the person answers at the terminal: its driver writes the ack
    now = time.time_ns() // 1_000_000
    await ob.append([NewRecord(RecordKind.EVENT, now, None, None, attrs=event_attrs(
        CallRespEvent(EventType.ACK, wid, TERMINAL, now, by="button-1")))])
    await asyncio.sleep(1.5)  # a fallback turn or two against an unregistered module
    assert await alarms() == [] and await target() is None

    assert gw_module.stats()["sends"] == 0  # not registered: the modem did not try

    # The satellite comes back; the first send fails once (network timeout) and is retried.
    gw_module.set_faults(registered=True, send_error=332, times=1)
    (raised,) = await until(alarms, "the alarm by Tiantong SMS")
    assert (raised["alarm_key"], raised["level"], raised["value"]) == (
        "gas-1/gas_lel/high", 2, 60.0)
    await until(lambda: rig._on_bearer(gateway(), "tiantong"), "a Tiantong heartbeat")
    t = await until(target, "the ack by Tiantong SMS")
    assert t["answered_by"] == "button-1"
    assert outbox().backlog > 0  # nothing came over IP
    stats = gw_module.stats()
    assert stats["send_failures"] == 1 and stats["sends"] >= 4  # failed, again, beat, ack
