"""The narrowband fallback end to end in one event loop: a real outbox file, the fallback
driving a BeiDou terminal simulator on a pty, and central's terminal simulator linked to it by
a `BeidouSky` (or a PDT radio simulator linked to central's radio by a `PdtAir`); what reaches
central is decoded with the gateway's key and stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import structlog
import structlog.testing
from typer.testing import CliRunner

from device_profiles import find_profile
from edge_agent.agent import build_bearer, run_agent
from edge_agent.bearers.beidou import BeidouTerminal, Dialect
from edge_agent.bearers.pdt import PdtRadio
from edge_agent.cli.app import app
from edge_agent.config.site import ConfigError, NarrowbandConfig, parse_config
from edge_agent.narrowband.fallback import WATERMARK_KEY, NarrowbandFallback
from edge_agent.outbox.store import NewRecord, Outbox, OutboxError, read_status
from firmware_stubs.beidou_sim import BeidouMode, BeidouSky, BeidouTerminalSimulator
from firmware_stubs.modbus_sim import ModbusTcpSimulator
from firmware_stubs.pdt_sim import PdtAir, PdtRadioSimulator
from protocols.envelope import Birth, DeviceInfo, PointInfo, RecordKind
from protocols.hrnp_text import TextResult
from protocols.narrowband import (
    AlarmRule,
    AlarmsFrame,
    AlarmTransition,
    Frame,
    HeartbeatFrame,
    PowerState,
    decode_frame,
    from_text,
)
from tests.helpers import until

KEY = bytes(range(16, 48))
CENTRAL_CARD = "0242407"
GATEWAY_CARD = {"bd3": "4238473", "bd2": "0247718"}
MODES: dict[Dialect, BeidouMode] = {"bd3": BeidouMode.BD3, "bd2": BeidouMode.BD2}
# Small frames, so that a handful of alarms needs several of them.
PAYLOAD_BYTES = 40
WAIT_S = 30.0  # generous: the assertions are about what arrives, not how fast

BIRTH = Birth(gw="gw-1", stream="", boot_id="b", version="t", devices=(
    DeviceInfo("gas-1", "gas-detector-v1", "h1",
               (PointInfo(0, "gas-1/lel"), PointInfo(1, "gas-1/o2"))),
    DeviceInfo("tank-1", "storage-tank-v1", "h2",
               (PointInfo(2, "tank-1/level"), PointInfo(3, "tank-1/alarm_in"))),
))


@dataclass
class FakeIp:
    """The uplink's IP state as the fallback reads it."""

    connected: bool = False
    down_since: float | None = field(default_factory=lambda: time.monotonic() - 3600)

    def up(self) -> None:
        self.connected, self.down_since = True, None

    def down(self) -> None:
        self.connected, self.down_since = False, time.monotonic()


def alarm(point: str, rule: str = "high", state: str = "raised", level: int = 1,
          value: object = 30.5, ts_ms: int = 1_700_000_000_000) -> NewRecord:
    return NewRecord(kind=RecordKind.ALARM, ts_ms=ts_ms, point=point, value=value,  # type: ignore[arg-type]
                     attrs={"alarm_id": f"{point}/{rule}", "rule": rule, "state": state,
                            "level": level})


def reading(point: str, value: float) -> NewRecord:
    return NewRecord(kind=RecordKind.TELEMETRY, ts_ms=1_700_000_000_000, point=point,
                     value=value)


until = partial(until, timeout=WAIT_S)  # this file's waits are longer


@dataclass
class Rig:
    outbox: Outbox
    gateway: BeidouTerminalSimulator
    central: BeidouTerminalSimulator
    ip: FakeIp
    dialect: Dialect
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def frames(self) -> list[Frame]:
        """Everything central's terminal received, decoded with the gateway's key and stream."""
        return [decode_frame(m.payload, key=KEY, stream=self.outbox.stream)
                for m in self.central.received_messages()]

    def alarm_seqs(self) -> list[int]:
        return [e.seq for f in self.frames() if isinstance(f, AlarmsFrame) for e in f.entries]

    def heartbeats(self) -> list[HeartbeatFrame]:
        return [f for f in self.frames() if isinstance(f, HeartbeatFrame)]

    def start(self, *, after_s: float = 0.0, heartbeat_s: float = 600.0,
              active_alarms: Callable[[], int] = lambda: 0) -> NarrowbandFallback:
        """A new fallback with its own terminal driver on the gateway's pty, running."""
        config = NarrowbandConfig(port=self.gateway.link_path, dialect=self.dialect,
                                  central_card=CENTRAL_CARD, key=KEY.hex(), after_s=after_s,
                                  heartbeat_s=heartbeat_s)
        terminal = BeidouTerminal(config.port, dialect=self.dialect, step_timeout_s=5.0,
                                  max_payload_bytes=PAYLOAD_BYTES)
        fallback = NarrowbandFallback(outbox=self.outbox, link=self.ip, birth=BIRTH,
                                      terminal=terminal, config=config, key=KEY,
                                      active_alarms=active_alarms, poll_s=0.05, retry_s=0.5)
        self.tasks.append(asyncio.create_task(fallback.run(), name="narrowband.test"))
        return fallback

    async def stop(self) -> None:
        """Cancel every fallback started, as the supervisor does on shutdown."""
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.tasks.clear()


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, dialect: Dialect = "bd3", *, ip: FakeIp | None = None,
              ) -> AsyncIterator[Rig]:
    """An outbox, a gateway terminal (0.3 s service interval) and central's terminal."""
    sky = BeidouSky()
    mode = MODES[dialect]
    async with Outbox.open(tmp_path / "outbox.db") as outbox, \
            BeidouTerminalSimulator(mode=mode, card_id=GATEWAY_CARD[dialect], interval_s=0.3,
                                    pwi_period_s=0.05, sky=sky) as gateway, \
            BeidouTerminalSimulator(mode=mode, card_id=CENTRAL_CARD, sky=sky) as central:
        r = Rig(outbox, gateway, central, ip or FakeIp(), dialect)
        try:
            yield r
        finally:
            await r.stop()


@pytest.mark.parametrize("dialect", ["bd3", "bd2"])
async def test_alarms_arrive_once_in_order_across_frames(tmp_path: Path,
                                                         dialect: Dialect) -> None:
    """Every alarm record reaches central exactly once, oldest first, over several frames;
    a point without an ordinal is skipped; the watermark ends at the last alarm."""
    async with rig(tmp_path, dialect) as r:
        seqs = await r.outbox.append([
            reading("gas-1/lel", 12.0), alarm("gas-1/lel", value=30.5),
            alarm("gas-1/o2", "low", value=18.9), alarm("ghost/x"),
            alarm("gas-1/_device", "device_offline", value=None),
            alarm("tank-1/alarm_in", "high", level=2, value=True),
            alarm("gas-1/lel", "high", "changed", level=2, value=52.0),
            alarm("gas-1/lel", "high", "cleared", level=0, value=3.0),
            alarm("tank-1/level", "rate", value=-4.25), alarm("tank-1/level", "stale"),
        ])
        expected = [s for i, s in enumerate(seqs) if i not in (0, 3)]  # reading, ghost
        fallback = r.start()
        await until(lambda: len(r.alarm_seqs()) >= len(expected))
        await until(lambda: fallback.watermark == expected[-1])
        assert r.alarm_seqs() == expected
        alarm_frames = [f for f in r.frames() if isinstance(f, AlarmsFrame)]
        assert len(alarm_frames) >= 3
        assert all(len(m.payload) <= PAYLOAD_BYTES for m in r.central.received_messages())
        entries = {e.seq: e for f in alarm_frames for e in f.entries}
        offline = entries[seqs[4]]
        assert (offline.point, offline.rule, offline.value) == (0, AlarmRule.DEVICE_OFFLINE,
                                                                None)
        boolean = entries[seqs[5]]
        assert (boolean.point, boolean.level, boolean.value) == (3, 2, 1.0)
        cleared = entries[seqs[7]]
        assert (cleared.state, cleared.level, cleared.ts) == (AlarmTransition.CLEARED, 0,
                                                              1_700_000_000)
        assert entries[seqs[8]].value == pytest.approx(-4.25)
        assert fallback.counters.skipped_alarms == 1
        assert fallback.counters.alarms_sent == len(expected)
        assert await r.outbox.get_meta(WATERMARK_KEY) == str(expected[-1])
        await until(lambda: len(r.heartbeats()) >= 1)  # then, with no alarms left, a heartbeat
        assert r.alarm_seqs() == expected
        status = fallback.status()
        assert status["active"] and status["counters"]["frames_sent"] >= 4
        assert status["card"]["payload_bytes"] == PAYLOAD_BYTES


async def test_refusal_keeps_watermark_and_alarm_goes_later(tmp_path: Path) -> None:
    """A refused frame does not move the watermark; once the terminal accepts again the same
    alarms go, once."""
    async with rig(tmp_path) as r:
        r.gateway.set_faults(suppressed=True)
        seqs = await r.outbox.append([alarm("gas-1/lel"), alarm("gas-1/o2", "low")])
        fallback = r.start()
        await until(lambda: fallback.counters.refusals.get("suppressed", 0) >= 2)
        assert fallback.watermark == 0 and await r.outbox.get_meta(WATERMARK_KEY) is None
        assert r.central.received_messages() == ()
        r.gateway.set_faults(suppressed=False)
        await until(lambda: r.alarm_seqs() == seqs)
        await until(lambda: fallback.watermark == seqs[-1])
        await until(lambda: len(r.heartbeats()) >= 1)
        assert r.alarm_seqs() == seqs


async def test_restart_does_not_resend_accepted_alarms(tmp_path: Path) -> None:
    """A new fallback on the same outbox starts above the persisted watermark: the alarms the
    first one got accepted are not sent again, the new ones are."""
    async with rig(tmp_path) as r:
        first = await r.outbox.append([alarm("gas-1/lel"), alarm("gas-1/o2", "low")])
        r.start()
        await until(lambda: r.alarm_seqs() == first)
        await until(lambda: r.gateway.stats()["accepted"] >= 2)  # and its heartbeat
        await r.stop()
        assert await r.outbox.get_meta(WATERMARK_KEY) == str(first[-1])
        later = await r.outbox.append([alarm("tank-1/level", "stale")])
        second = r.start()
        await until(lambda: r.alarm_seqs() == first + later)
        await until(lambda: len(r.heartbeats()) >= 2)  # the new one's heartbeat
        assert r.alarm_seqs() == first + later
        assert second.counters.alarms_sent == 1


async def test_idle_while_ip_up_and_until_after_s(tmp_path: Path) -> None:
    """Nothing goes while IP is up or down for less than `after_s`; past it alarms go; when
    IP is back the fallback goes idle and sends nothing more."""
    ip = FakeIp(connected=True, down_since=None)
    async with rig(tmp_path, ip=ip) as r:
        seqs = await r.outbox.append([alarm("gas-1/lel")])
        fallback = r.start(after_s=1.0)
        # The fallback probes the card at start; then let many polls and beam reports pass.
        await until(lambda: r.gateway.stats()["card_queries"] >= 1)
        pwi = r.gateway.stats()["pwi"]
        await until(lambda: r.gateway.stats()["pwi"] >= pwi + 10)
        assert r.gateway.stats()["accepted"] + r.gateway.stats()["refused"] == 0
        assert not fallback.active

        ip.down()
        await until(lambda: r.alarm_seqs() == seqs)
        assert time.monotonic() - (ip.down_since or 0) >= 1.0
        assert await r.outbox.get_meta("narrowband_state") == "active"

        ip.up()
        await until(lambda: not fallback.active)
        sent = r.gateway.stats()["accepted"] + r.gateway.stats()["refused"]
        await r.outbox.append([alarm("gas-1/o2", "low")])
        pwi = r.gateway.stats()["pwi"]
        await until(lambda: r.gateway.stats()["pwi"] >= pwi + 10)
        assert r.gateway.stats()["accepted"] + r.gateway.stats()["refused"] == sent
        assert r.alarm_seqs() == seqs
        assert await r.outbox.get_meta("narrowband_state") == "idle"


async def test_heartbeats_when_no_alarms(tmp_path: Path) -> None:
    """With no alarm to send, heartbeats go every `heartbeat_s` with the last seq, the backlog,
    the active alarms and the IP downtime; alarms already delivered over IP do not go."""
    async with rig(tmp_path) as r:
        delivered = await r.outbox.append([alarm("gas-1/lel")])
        await r.outbox.mark_delivered([(delivered[0], delivered[0])])
        await r.outbox.append([reading("gas-1/lel", float(i)) for i in range(5)])
        last_seq, backlog = await r.outbox.last_seq(), await r.outbox.backlog()
        assert (last_seq, backlog) == (6, 5)
        fallback = r.start(heartbeat_s=1.0, active_alarms=lambda: 2)
        await until(lambda: len(r.heartbeats()) >= 2)
        beat = r.heartbeats()[0]
        assert (beat.last_seq, beat.backlog, beat.active_alarms) == (last_seq, backlog, 2)
        assert beat.ip_down_s >= 3600 and beat.power is PowerState.UNKNOWN
        assert beat.battery_pct is None
        assert r.alarm_seqs() == []
        assert fallback.counters.heartbeats_sent >= 2


# --- the same over a PDT radio -----------------------------------------------------------------


GATEWAY_RADIO, CENTRAL_RADIO = 1001, 2002
PDT_TEXT_BYTES = 96  # 33 frame bytes: two or three alarms a text, so several texts


@dataclass
class PdtRig:
    outbox: Outbox
    gateway: PdtRadioSimulator
    central: PdtRadioSimulator
    ip: FakeIp = field(default_factory=FakeIp)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def frames(self) -> list[Frame]:
        """Every text central's radio received, as frames under the gateway's key and stream."""
        return [decode_frame(from_text(m.text), key=KEY, stream=self.outbox.stream)
                for m in self.central.received]

    def alarm_seqs(self) -> list[int]:
        return [e.seq for f in self.frames() if isinstance(f, AlarmsFrame) for e in f.entries]

    def start(self) -> NarrowbandFallback:
        config = NarrowbandConfig(bearer="pdt", port=self.gateway.link_path,
                                  central_radio=CENTRAL_RADIO, radio_id=GATEWAY_RADIO,
                                  max_text_bytes=PDT_TEXT_BYTES, interval_s=0, key=KEY.hex(),
                                  after_s=0)
        radio = build_bearer(config)
        fallback = NarrowbandFallback(outbox=self.outbox, link=self.ip, birth=BIRTH,
                                      terminal=radio, config=config, key=KEY, poll_s=0.05,
                                      retry_s=0.5)
        self.tasks.append(asyncio.create_task(fallback.run(), name="narrowband.pdt"))
        return fallback


@contextlib.asynccontextmanager
async def pdt_rig(tmp_path: Path) -> AsyncIterator[PdtRig]:
    """An outbox, the gateway's PDT radio and central's, on one air."""
    air = PdtAir()
    async with Outbox.open(tmp_path / "outbox.db") as outbox, \
            PdtRadioSimulator(air, GATEWAY_RADIO) as gateway, \
            PdtRadioSimulator(air, CENTRAL_RADIO) as central:
        r = PdtRig(outbox, gateway, central)
        try:
            yield r
        finally:
            for task in r.tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


async def test_pdt_alarms_arrive_once_in_order_across_texts(tmp_path: Path) -> None:
    """Over PDT every alarm reaches central's radio exactly once, oldest first, as "FL1:"
    texts from the gateway's radio id within the text limit, over several texts; then a
    heartbeat; the watermark ends at the last alarm."""
    async with pdt_rig(tmp_path) as r:
        seqs = await r.outbox.append([
            alarm("gas-1/lel", value=30.5), alarm("gas-1/o2", "low", value=18.9),
            reading("gas-1/lel", 12.0),
            alarm("gas-1/_device", "device_offline", value=None),
            alarm("tank-1/alarm_in", "high", level=2, value=True),
            alarm("gas-1/lel", "high", "changed", level=2, value=52.0),
            alarm("gas-1/lel", "high", "cleared", level=0, value=3.0),
            alarm("tank-1/level", "rate", value=-4.25), alarm("tank-1/level", "stale"),
        ])
        expected = [s for i, s in enumerate(seqs) if i != 2]  # not the reading
        fallback = r.start()
        await until(lambda: len(r.alarm_seqs()) >= len(expected))
        await until(lambda: fallback.watermark == expected[-1])
        assert r.alarm_seqs() == expected
        assert len([f for f in r.frames() if isinstance(f, AlarmsFrame)]) >= 3
        texts = r.central.received
        assert all(m.text.startswith("FL1:") and len(m.text) * 2 <= PDT_TEXT_BYTES
                   for m in texts)
        assert {(m.source, m.destination) for m in texts} == {(GATEWAY_RADIO, CENTRAL_RADIO)}
        await until(lambda: any(isinstance(f, HeartbeatFrame) for f in r.frames()))
        assert r.alarm_seqs() == expected
        assert await r.outbox.get_meta(WATERMARK_KEY) == str(expected[-1])
        status = fallback.status()
        assert status["bearer"] == "pdt" and status["card"]["payload_bytes"] == 33
        assert status["terminal"]["sent"] == len(texts)


async def test_pdt_refusal_keeps_watermark_and_alarm_goes_later(tmp_path: Path) -> None:
    """A channel-busy answer does not move the watermark; once the radio sends again the same
    alarms go, once."""
    async with pdt_rig(tmp_path) as r:
        r.gateway.set_faults(result=TextResult.CHANNEL_BUSY)
        seqs = await r.outbox.append([alarm("gas-1/lel"), alarm("gas-1/o2", "low")])
        fallback = r.start()
        await until(lambda: fallback.counters.refusals.get("channel_busy", 0) >= 2)
        assert fallback.watermark == 0 and await r.outbox.get_meta(WATERMARK_KEY) is None
        assert r.central.received == []
        r.gateway.set_faults(result=TextResult.OK)
        await until(lambda: r.alarm_seqs() == seqs)
        await until(lambda: fallback.watermark == seqs[-1])
        await until(lambda: any(isinstance(f, HeartbeatFrame) for f in r.frames()))
        assert r.alarm_seqs() == seqs


# --- config and supervisor wiring ------------------------------------------------------------


NB_BASE = '[gateway]\nid = "gw-1"\n\n[narrowband]\nport = "/dev/ttyUSB1"\n'


@pytest.mark.parametrize(("body", "line", "field", "message"), [
    ('central_card = "0242407"\n', 4, "narrowband.key_file", "exactly one of key and key_file"),
    (f'central_card = "0242407"\nkey = "{KEY.hex()}"\nkey_file = "k.hex"\n', 8,
     "narrowband.key_file", "exactly one"),
    ('central_card = "0242407"\nkey = "0011"\n', 7, "narrowband.key", "at least 16 bytes"),
    ('central_card = "0242407"\nkey = "xyz"\n', 7, "narrowband.key", "hex digits"),
    (f'dialect = "bd2"\ncentral_card = "15240507"\nkey = "{KEY.hex()}"\n', 7,
     "narrowband.central_card", "7 digits"),
    (f'central_card = "0242407"\nkey = "{KEY.hex()}"\nbearer = "iridium"\n', 8,
     "narrowband.bearer", "'beidou', 'pdt' or 'tiantong'"),
    (f'bearer = "tiantong"\nkey = "{KEY.hex()}"\n', 4, "narrowband.central_number",
     "Field required"),
    (f'central_card = "0242407"\nsms_parts = 2\nkey = "{KEY.hex()}"\n', 7,
     "narrowband.sms_parts", 'for bearer = "tiantong", not "beidou"'),
    (f'central_card = "0242407"\ninterval_s = 2\nkey = "{KEY.hex()}"\n', 7,
     "narrowband.interval_s", 'for bearer = "pdt" or "tiantong", not "beidou"'),
    (f'bearer = "pdt"\nkey = "{KEY.hex()}"\n', 4, "narrowband.central_radio",
     "Field required"),
    (f'bearer = "pdt"\ncentral_radio = 2002\ncentral_card = "0242407"\nkey = "{KEY.hex()}"\n',
     8, "narrowband.central_card", 'for bearer = "beidou", not "pdt"'),
    (f'bearer = "pdt"\ncentral_radio = 2002\ndialect = "bd2"\nkey = "{KEY.hex()}"\n', 8,
     "narrowband.dialect", 'for bearer = "beidou"'),
    (f'bearer = "pdt"\ncentral_radio = 16777216\nkey = "{KEY.hex()}"\n', 7,
     "narrowband.central_radio", "less than or equal to 16777215"),
    (f'bearer = "pdt"\ncentral_radio = 2002\nmax_text_bytes = 40\nkey = "{KEY.hex()}"\n', 8,
     "narrowband.max_text_bytes", "greater than or equal to 56"),
    (f'central_card = "0242407"\nradio_id = 1001\nkey = "{KEY.hex()}"\n', 7,
     "narrowband.radio_id", 'for bearer = "pdt", not "beidou"'),
    (f'central_card = "0242407"\nkey = "{KEY.hex()}"\nafter = 5\n', 8, "narrowband.after",
     "Extra inputs"),
    ('central_card = "0242407"\nkey_file = "missing.hex"\n', 7, "narrowband.key_file",
     "no such file"),
    ('central_card = "0242407"\nkey = "%s"\n[[devices]]\nid = "d"\nprofile = "p"\n'
     'transport = {kind = "rtu", port = "/dev/ttyUSB1"}\n' % KEY.hex(), 5, "narrowband.port",
     "already devices[0]"),
])
def test_config_errors_name_the_line(tmp_path: Path, body: str, line: int, field: str,
                                     message: str) -> None:
    """A bad `[narrowband]` section is a config error naming the file, line and key; the
    key itself never appears in the message."""
    with pytest.raises(ConfigError) as err:
        parse_config(NB_BASE + body, tmp_path / "site.toml", check_profiles=False)
    assert (err.value.line, err.value.field) == (line, field)
    assert message in err.value.message and KEY.hex() not in str(err.value)


def test_config_key_file_relative_to_config(tmp_path: Path) -> None:
    """`key_file` is read relative to the config file; the defaults are as documented, and a
    config without the section has no fallback."""
    (tmp_path / "nb.key").write_text(KEY.hex() + "\n")
    cfg = parse_config(NB_BASE + 'central_card = "0242407"\nkey_file = "nb.key"\n',
                       tmp_path / "site.toml", check_profiles=False)
    nb = cfg.narrowband
    assert nb is not None and nb.key_bytes() == KEY and nb.key_file == tmp_path / "nb.key"
    assert (nb.bearer, nb.baudrate, nb.dialect, nb.after_s, nb.heartbeat_s, nb.mac_len) == (
        "beidou", 115200, "bd3", 120.0, 600.0, 4)
    assert parse_config('[gateway]\nid = "gw-1"\n', check_profiles=False).narrowband is None
    assert nb.recipient == "0242407"


def test_config_pdt_defaults_and_driver(tmp_path: Path) -> None:
    """`bearer = "pdt"` needs central's radio id; the text limit and interval default to 128
    bytes and 5 s; the supervisor builds a PdtRadio for it and a BeidouTerminal otherwise."""
    cfg = parse_config(NB_BASE + f'bearer = "pdt"\ncentral_radio = 2002\nradio_id = 1001\n'
                       f'key = "{KEY.hex()}"\n', tmp_path / "site.toml", check_profiles=False)
    nb = cfg.narrowband
    assert nb is not None and nb.recipient == "2002"
    assert (nb.bearer, nb.radio_id, nb.max_text_bytes, nb.interval_s) == ("pdt", 1001, 128, 5)
    radio = build_bearer(nb)
    assert isinstance(radio, PdtRadio) and radio.payload_bytes == 45 and radio.radio_id == 1001
    beidou = NarrowbandConfig(port="/dev/ttyUSB1", central_card=CENTRAL_CARD, key=KEY.hex())
    assert isinstance(build_bearer(beidou), BeidouTerminal)


@pytest.fixture
def agent_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """The in-process agent's log events, kept in a list instead of printed: structlog's
    default logger prints to the `sys.stdout` of the moment, which is CliRunner's capture
    while a command runs, so a line would land inside the command's `--json` output."""
    with structlog.testing.capture_logs() as logs:
        yield logs


async def test_supervisor_sends_alarm_by_beidou_while_ip_is_down(
        tmp_path: Path, agent_logs: list[MutableMapping[str, Any]]) -> None:
    """`run_agent` with `[narrowband]` and no reachable broker: a polled level-2 gas alarm
    reaches central's terminal as an alarms frame under the outbox's stream, and the status
    snapshot carries the fallback's counters."""
    with socket.socket() as s:  # a port nobody listens on: IP is down from the start
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    gas = find_profile("gas-detector-v1")
    ordinal = [p.key for p in gas.points].index("gas_lel")
    sky = BeidouSky()
    async with ModbusTcpSimulator(gas) as modbus, \
            BeidouTerminalSimulator(card_id="4238473", interval_s=0.3, pwi_period_s=0.1,
                                    sky=sky) as gateway, \
            BeidouTerminalSimulator(card_id=CENTRAL_CARD, sky=sky) as central:
        modbus.set_value("gas_lel", 60.0)
        site = tmp_path / "site.toml"
        site.write_text(
            f'[gateway]\nid = "gw-nb"\ndata_dir = "{tmp_path / "data"}"\n'
            f'[mqtt]\nport = {dead_port}\n[status]\ninterval_s = 0.2\n'
            f'[narrowband]\nport = "{gateway.link_path}"\ncentral_card = "{CENTRAL_CARD}"\n'
            f'key = "{KEY.hex()}"\nafter_s = 0\n'
            f'[[devices]]\nid = "gas-1"\nprofile = "gas-detector-v1"\npoll_interval_s = 0.1\n'
            f'transport = {{kind = "tcp", host = "127.0.0.1", port = {modbus.port}}}\n')
        config = parse_config(site.read_text(), site)
        stop = asyncio.Event()
        agent = asyncio.create_task(run_agent(config, stop=stop, install_signal_handlers=False))
        try:
            def outbox_stream() -> str:
                try:
                    return read_status(config.outbox_path).stream
                except OutboxError:  # the agent is still creating it
                    return ""

            await until(lambda: bool(outbox_stream()))
            stream = outbox_stream()

            def alarms() -> list[AlarmsFrame]:
                frames = [decode_frame(m.payload, key=KEY, stream=stream)
                          for m in central.received_messages()]
                return [f for f in frames if isinstance(f, AlarmsFrame)]

            await until(lambda: bool(alarms()))

            def alarms_sent() -> int:
                """The fallback's count in the agent's status snapshot (`edge-agent status`)."""
                raw = read_status(config.outbox_path).meta.get("agent_status", "{}")
                narrowband = json.loads(raw).get("narrowband") or {}
                return int(narrowband.get("counters", {}).get("alarms_sent", 0))

            await until(lambda: alarms_sent() >= 1)
            # The technician sees it: `edge-agent status`, as a table and as JSON.
            runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})
            shown = await asyncio.to_thread(runner.invoke, app, ["status", "-c", str(site)])
            assert shown.exit_code == 0, shown.output
            assert "narrowband" in shown.output and "active on beidou" in shown.output
            raw = await asyncio.to_thread(runner.invoke, app,
                                          ["status", "-c", str(site), "--json"])
            assert json.loads(raw.output)["narrowband"]["counters"]["alarms_sent"] >= 1
        finally:
            stop.set()
            await asyncio.wait_for(agent, 15)
    entry = alarms()[0].entries[0]
    assert (entry.point, entry.rule, entry.state, entry.level) == (
        ordinal, AlarmRule.HIGH, AlarmTransition.RAISED, 2)
    assert entry.value == pytest.approx(60.0)
