"""三断 end to end (DESIGN.md §5): the IP link is cut, the alarm goes by radio, IP comes back.

Everything runs for real in one event loop: a private Mosquitto, central (ingest and its
narrowband receiver, with its API), the edge agent (`run_agent`) polling a Modbus TCP gas
detector, a loopback proxy on the agent's MQTT link, and two radio simulators on ptys, the
gateway's and central's: BeiDou terminals linked by one sky, or PDT radios on one air.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from central.app import create_app
from central.config.settings import NarrowbandGateway, Settings
from device_profiles import find_profile
from edge_agent import EdgeError
from edge_agent.agent import run_agent
from edge_agent.config.site import AgentConfig, parse_config
from edge_agent.outbox.store import read_status
from firmware_stubs.beidou_sim import BeidouSky, BeidouTerminalSimulator
from firmware_stubs.modbus_sim import ModbusTcpSimulator
from firmware_stubs.pdt_sim import PdtAir, PdtRadioSimulator
from tests.helpers import Mosquitto, until
from tests.identity import authorize
from tests.netproxy import LinkProxy

GW = "gw-sanduan"
GW_CARD = "4238473"
CENTRAL_CARD = "0242407"
GW_RADIO, CENTRAL_RADIO = 1001, 2002
KEY = bytes(range(100, 132))
WAIT_S = 60.0  # generous: a loaded 2-core CI box; every wait is on a condition


until = partial(until, timeout=WAIT_S)  # this file's waits are longer


@contextlib.asynccontextmanager
async def central(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """Central's app with its lifespan (ingest on MQTT, the narrowband receiver) running."""
    app = create_app(settings, run_ingest=True)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://central") as client:
        await authorize(app, client)
        yield client


def edge_config(tmp_path: Path, proxy: LinkProxy, modbus_port: int, *, narrowband: str,
                poll_s: float, more: str = "") -> AgentConfig:
    """The gateway of these tests: MQTT through `proxy`, a gas detector on the Modbus
    simulator polled every `poll_s`, its `[narrowband]` section's lines, then `more`."""
    return parse_config(
        f'[gateway]\nid = "{GW}"\ndata_dir = "{tmp_path / "edge"}"\n'
        f'[mqtt]\nhost = "{proxy.host}"\nport = {proxy.port}\nreconnect_max_s = 1\n'
        f'[status]\ninterval_s = 0.2\n[narrowband]\n{narrowband}'
        f'[[devices]]\nid = "gas-1"\nprofile = "gas-detector-v1"\npoll_interval_s = {poll_s}\n'
        f'transport = {{kind = "tcp", host = "127.0.0.1", port = {modbus_port}}}\n' + more)


@contextlib.asynccontextmanager
async def agent_running(config: AgentConfig, **wiring: Any) -> AsyncIterator[None]:
    """The edge agent (`run_agent`) running on `config` for the body, stopped after it."""
    stop = asyncio.Event()
    agent = asyncio.create_task(run_agent(config, stop=stop, install_signal_handlers=False,
                                          **wiring))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(agent, 30)


@dataclass
class Radios:
    """The gateway's radio and central's, linked: what each side is configured with."""

    gateway_port: str
    central_port: str
    gateway_entry: NarrowbandGateway  # central's narrowband_gateways entry
    edge_keys: str  # the bearer's lines of the edge's [narrowband]


@contextlib.asynccontextmanager
async def radios(bearer: str) -> AsyncIterator[Radios]:
    if bearer == "beidou":
        sky = BeidouSky()
        async with BeidouTerminalSimulator(card_id=GW_CARD, interval_s=0.5, pwi_period_s=0.2,
                                           sky=sky) as gw, \
                BeidouTerminalSimulator(card_id=CENTRAL_CARD, interval_s=0.5, pwi_period_s=None,
                                        sky=sky) as central_terminal:
            yield Radios(gw.link_path, central_terminal.link_path,
                         NarrowbandGateway(gw=GW, card=GW_CARD, key=KEY.hex()),
                         f'central_card = "{CENTRAL_CARD}"\n')
    else:
        air = PdtAir()
        async with PdtRadioSimulator(air, GW_RADIO) as gw, \
                PdtRadioSimulator(air, CENTRAL_RADIO) as central_radio:
            yield Radios(gw.link_path, central_radio.link_path,
                         NarrowbandGateway(gw=GW, radio=GW_RADIO, key=KEY.hex()),
                         f'bearer = "pdt"\ncentral_radio = {CENTRAL_RADIO}\n'
                         f'radio_id = {GW_RADIO}\ninterval_s = 0\n')


@pytest.mark.parametrize("bearer", ["beidou", "pdt"])
async def test_alarm_goes_by_radio_while_ip_is_cut_and_merges_when_ip_returns(
        tmp_path: Path, mosquitto: Mosquitto, bearer: str) -> None:
    """With the uplink cut, a level-2 gas alarm reaches central by BeiDou or PDT and is active
    there at once; when IP returns the full record is merged into it: one alarm, raised once,
    now with its threshold, and the gateway's outbox drains to zero."""
    gas = find_profile("gas-detector-v1")
    proxy = LinkProxy(mosquitto.host, mosquitto.port)
    proxy.start()
    try:
        async with ModbusTcpSimulator(gas) as modbus, radios(bearer) as link:
            modbus.set_value("gas_lel", 3.0)
            settings = Settings(
                db_url=f"sqlite:///{tmp_path}/central.db", mqtt_host=mosquitto.host,
                mqtt_port=mosquitto.port, mqtt_client_id="central-e2e",
                narrowband_port=link.central_port, narrowband_bearer=bearer,
                narrowband_gateways=[link.gateway_entry])
            config = edge_config(tmp_path, proxy, modbus.port, poll_s=0.2, narrowband=(
                f'port = "{link.gateway_port}"\n{link.edge_keys}'
                f'key = "{KEY.hex()}"\nafter_s = 1\nheartbeat_s = 2\n'))
            async with central(settings) as api:
                async with agent_running(config):
                    def outbox() -> Any:
                        try:
                            return read_status(config.outbox_path)
                        except EdgeError:  # the agent is still creating it
                            return None

                    async def gateway() -> dict[str, Any] | None:
                        r = await api.get(f"/api/gateways/{GW}")
                        return r.json() if r.status_code == 200 else None

                    async def alarms() -> list[dict[str, Any]]:
                        return (await api.get("/api/alarms", params={"gw": GW})).json()

                    # Over IP first: central learns the stream and the point ordinals.
                    status = await until(outbox, "the outbox")
                    await until(lambda: _has_stream(gateway(), status.stream),
                                "the birth at central")

                    # 三断: the IP link is cut, then the gas leaks.
                    proxy.set_mode("drop")
                    await until(lambda: outbox().meta.get("uplink_state") == "disconnected",
                                "the uplink to notice the cut")  # the outbox exists by now
                    modbus.set_value("gas_lel", 60.0)
                    (raised,) = await until(alarms, f"the alarm at central by {bearer}")
                    assert (raised["alarm_key"], raised["level"], raised["state"]) == (
                        "gas-1/gas_lel/high", 2, "active")
                    assert raised["threshold"] is None  # the short frame does not carry it
                    assert raised["value"] == 60.0
                    assert outbox().backlog > 0  # it did not come over IP
                    view = await until(lambda: _on_bearer(gateway(), bearer),
                                       f"a {bearer} heartbeat")
                    assert view["online"]

                    # IP returns: everything drains, the full record merges into the copy.
                    proxy.set_mode("pass")
                    await until(lambda: outbox().backlog == 0, "the outbox to drain over IP")
                    (merged,) = await alarms()
                    assert merged["id"] == raised["id"] and merged["transitions"] == 1
                    assert merged["threshold"] == 50.0 and merged["state"] == "active"
                    metrics = (await api.get("/metrics")).text
                    assert _metric(metrics, "records_merged_total") >= 1
                    assert _metric(metrics, "narrowband_records_total") >= 1
    finally:
        proxy.stop()


async def _has_stream(view: Any, stream: str) -> bool:
    got = await view
    return bool(got) and got.get("stream") == stream


async def _on_bearer(view: Any, bearer: str) -> dict[str, Any] | None:
    got = await view
    return got if got and got.get("bearer") == bearer else None


def _metric(text: str, name: str) -> float:
    """The value of an unlabelled Prometheus sample whose name ends with `name`."""
    for line in text.splitlines():
        if not line.startswith("#") and line.split(" ")[0].endswith(name):
            return float(line.split(" ")[1])
    raise AssertionError(f"no {name} in /metrics")
