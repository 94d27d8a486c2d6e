"""Central's narrowband receiver (DESIGN.md §5) on a simulated BeiDou terminal or PDT radio (a
real pty): alarm and heartbeat frames from a gateway land under (gw, stream, seq), bad input is
counted without stopping the loop, and the full record that comes later over IP merges into
the narrowband copy instead of doubling it (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from central.alarms.desk import alarm_history, list_alarms
from central.app import create_app
from central.config.settings import NarrowbandGateway, Settings, SettingsError, load_settings
from central.health.metrics import Metrics
from central.identity.audit import AuditLog
from central.identity.retire import RetiredGate, retirements_program
from central.identity.retire import retire as retire_gateway
from central.identity.retire import unretire as unretire_gateway
from central.narrowband.receiver import NarrowbandReceiver
from central.storage import Storage, open_storage
from central.storage.program import Sql
from firmware_stubs.beidou_sim import BeidouTerminalSimulator
from firmware_stubs.pdt_sim import PdtAir, PdtRadioSimulator
from protocols import envelope as env
from protocols.hrnp_text import TextMessage
from protocols.narrowband import (
    AlarmEntry,
    AlarmRule,
    AlarmTransition,
    HeartbeatFrame,
    PowerState,
    encode_alarms,
    encode_heartbeat,
    to_text,
)
from tests.helpers import until
from tests.identity import authorize
from tests.pg import pg_schema

GW = "gw-nb"
STREAM = "s-nb-1"
KEY = bytes(range(32))
CARD = "0301001"  # the gateway terminal's card
OTHER_GW, OTHER_CARD = "gw-unborn", "0301002"  # configured, but never sent a birth
CENTRAL_CARD = "0242407"
WAIT_S = 15.0
BIRTH = env.Birth(gw=GW, stream=STREAM, boot_id="b1", version="1.0", devices=(
    env.DeviceInfo("gas-1", "gas-lel", "h1", (env.PointInfo(0, "gas-1/gas_lel", "可燃气体", "%LEL"),
                                         env.PointInfo(1, "gas-1/o2", "氧气", "%VOL"))),
    env.DeviceInfo("gas-2", "gas-lel", "h1",
                   (env.PointInfo(2, "gas-2/gas_lel", "可燃气体", "%LEL"),)),
))
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def now_s() -> int:
    return int(time.time())


def alarms_frame(*entries: AlarmEntry, key: bytes = KEY, stream: str = STREAM) -> bytes:
    frame, count = encode_alarms(now_s(), entries, key=key, stream=stream, limit=200)
    assert count == len(entries)
    return frame


def entry(seq: int, state: AlarmTransition = AlarmTransition.RAISED, *, level: int = 1,
          point: int = 0, rule: AlarmRule = AlarmRule.HIGH, value: float | None = 30.5,
          ts: int | None = None) -> AlarmEntry:
    return AlarmEntry(seq=seq, point=point, rule=rule, state=state, level=level,
                      ts=now_s() if ts is None else ts, value=value)


def settings_for(db_url: str, port: str) -> Settings:
    return Settings(db_url=db_url, narrowband_port=port, narrowband_gateways=[
        NarrowbandGateway(gw=GW, card=CARD, key=KEY.hex()),
        NarrowbandGateway(gw=OTHER_GW, card=OTHER_CARD, key=KEY.hex())])


until = partial(until, timeout=WAIT_S)  # this file's waits are longer


@contextlib.asynccontextmanager
async def database(kind: str, tmp_path: Path) -> AsyncIterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path}/central.db"
    else:
        with pg_schema() as url:
            yield url


@dataclass
class Rig:
    storage: Storage
    sim: BeidouTerminalSimulator
    receiver: NarrowbandReceiver
    metrics: Metrics

    def send(self, payload: bytes, card: str = CARD) -> None:
        self.sim.inject_inbound(card, payload)

    async def rejected(self, reason: str, n: int = 1) -> None:
        await until(lambda: self.metrics.narrowband_rejected[reason] >= n)


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, kind: str = "sqlite") -> AsyncIterator[Rig]:
    """Storage holding the gateway's birth, central's terminal on a pty, a running receiver
    that refuses retired gateways as central's app wires it."""
    async with (database(kind, tmp_path) as url, open_storage(url) as storage,
                BeidouTerminalSimulator(card_id=CENTRAL_CARD, pwi_period_s=None) as sim):
        await storage.record_birth(GW, BIRTH)
        metrics = Metrics()
        receiver = NarrowbandReceiver(settings_for(url, sim.link_path), storage, metrics,
                                      retired=RetiredGate(storage, refresh_s=0,
                                                          metrics=metrics))
        task = asyncio.create_task(receiver.run(), name="narrowband")
        try:
            await receiver.wait_connected(WAIT_S)
            # The card query at open is answered before the test scripts any line fault.
            await until(lambda: (sim.stats()["card_queries"] >= 1))
            yield Rig(storage, sim, receiver, metrics)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def active(storage: Storage) -> list[Any]:
    return await list_alarms(storage, state="active", gw=GW)


async def test_alarm_raised_and_cleared_over_beidou(tmp_path: Path) -> None:
    """A raise frame opens the alarm on its point at once, its source saying it came by
    BeiDou; a clear frame for it clears it."""
    async with rig(tmp_path) as r:
        r.send(alarms_frame(entry(5, value=31.25)))
        (alarm,) = await until(lambda: active(r.storage))
        assert (alarm.alarm_key, alarm.point, alarm.type) == (
            "gas-1/gas_lel/high", "gas-1/gas_lel", "high")
        assert alarm.severity == 1 and alarm.value == 31.25 and alarm.name_zh == "可燃气体"
        assert alarm.source == "beidou"
        r.send(alarms_frame(entry(6, AlarmTransition.CLEARED, level=0, value=12.0)))
        await until(lambda: no_active(r.storage))
        (cleared,) = await list_alarms(r.storage, gw=GW)
        assert cleared.id == alarm.id and cleared.state == "cleared"
        assert r.metrics.narrowband_received["alarms"] == 2
        assert r.metrics.narrowband_records == 2


async def no_active(storage: Storage) -> bool:
    return not await active(storage)


async def test_device_offline_names_the_device_pseudo_point(tmp_path: Path) -> None:
    """A device_offline entry names the device's first point; central raises it on
    `<device>/_device`, the key the edge uses."""
    async with rig(tmp_path) as r:
        r.send(alarms_frame(entry(9, point=2, rule=AlarmRule.DEVICE_OFFLINE, value=None)))
        (alarm,) = await until(lambda: active(r.storage))
        assert alarm.alarm_key == "gas-2/_device/device_offline"
        assert (alarm.point, alarm.device, alarm.type) == ("gas-2/_device", "gas-2",
                                                           "device_offline")


@pytest.mark.parametrize("kind", BACKENDS)
async def test_heartbeat_updates_gateway_view(tmp_path: Path, kind: str) -> None:
    """A heartbeat marks the gateway heard now, online on beidou, with its reported backlog."""
    async with rig(tmp_path, kind) as r:
        before = time.time_ns() // 1_000_000
        ts = now_s()
        r.send(encode_heartbeat(HeartbeatFrame(ts=ts, last_seq=40, backlog=1234,
                                               active_alarms=1, ip_down_s=900,
                                               power=PowerState.BATTERY, battery_pct=61),
                                key=KEY, stream=STREAM))

        async def seen() -> Any:
            g = await r.storage.get_gateway(GW)
            return g if g.bearer == "beidou" else None
        g = await until(seen)
        assert g.online and g.backlog == 1234 and g.state_ts_ms == ts * 1000
        assert g.last_seen_ms is not None and g.last_seen_ms >= before
        assert r.metrics.narrowband_received["heartbeat"] == 1
        # IP is back with a newer state: a late heartbeat only says the gateway was heard.
        await r.storage.record_state(GW, env.State(online=True, boot_id="b1", version="1.0",
                                                   bearer="4g", backlog=0, ts_ms=(ts + 60) * 1000,
                                                   stream=STREAM))
        r.send(encode_heartbeat(HeartbeatFrame(ts=ts + 1, last_seq=41, backlog=999,
                                               active_alarms=1, ip_down_s=901),
                                key=KEY, stream=STREAM))
        await until(lambda: r.metrics.narrowband_received["heartbeat"] == 2)
        g = await r.storage.get_gateway(GW)
        assert (g.bearer, g.backlog, g.state_ts_ms) == ("4g", 0, (ts + 60) * 1000)


async def test_bad_input_is_counted_and_the_loop_goes_on(tmp_path: Path) -> None:
    """Wrong key, unknown card, no birth, a short frame, an unknown ordinal and a corrupted
    sentence are each counted by reason; good entries and frames after them still land."""
    async with rig(tmp_path) as r:
        r.send(alarms_frame(entry(3), key=b"\x01" * 32))
        await r.rejected("mac_mismatch")
        r.send(alarms_frame(entry(3)), card="0999999")
        await r.rejected("unknown_sender")
        r.send(alarms_frame(entry(3)), card=OTHER_CARD)
        await r.rejected("no_birth")
        r.send(b"\x12\x00")
        await r.rejected("malformed")
        r.sim.set_faults(garbage=40, bad_checksum=1)
        r.send(alarms_frame(entry(3)))
        await r.rejected("bad_sentence")
        assert await active(r.storage) == []
        # An ordinal the birth does not name drops that entry only.
        r.send(alarms_frame(entry(3, point=99), entry(4, point=1, rule=AlarmRule.LOW)))
        await r.rejected("unknown_point")
        (alarm,) = await until(lambda: active(r.storage))
        assert alarm.alarm_key == "gas-1/o2/low"
        assert r.receiver.connected
        assert (await r.storage.count_records(GW)).events == 1


async def test_a_retired_gateways_frames_are_refused_and_counted(tmp_path: Path) -> None:
    """A retired gateway's radio frame is refused (`retired_gateway`), as ingest refuses its
    MQTT messages; after an unretire the same frame lands."""
    async with rig(tmp_path) as r:
        await retire_gateway(r.storage, AuditLog(r.storage), GW, user="admin-1",
                             reason="replaced after the flood")
        r.send(alarms_frame(entry(5, value=31.25)))
        await r.rejected("retired_gateway")
        assert await active(r.storage) == []
        (retired,) = await r.storage.run(retirements_program, write=False)
        assert retired.refused == 1  # counted where ingest's refusals are (gateways retired)
        assert r.metrics.retired_messages == {"radio": 1}  # and in their metric
        assert (await r.storage.count_records(GW)).events == 0
        await unretire_gateway(r.storage, AuditLog(r.storage), GW, user="admin-1",
                               reason="back in service")
        r.send(alarms_frame(entry(5, value=31.25)))
        (alarm,) = await until(lambda: active(r.storage))
        assert alarm.source == "beidou"


def full_record(seq: int, value: float, ts_ms: int, state: str = "raised",
                      level: int = 1) -> env.Record:
    """The ALARM record the edge sends over IP (as `edge_agent.alarms.rules.AlarmEvent.to_record`)."""
    return env.Record(seq=seq, kind=env.RecordKind.ALARM, ts_ms=ts_ms, point="gas-1/gas_lel",
                      value=value, attrs={"alarm_id": "gas-1/gas_lel/high", "rule": "high",
                                          "state": state, "level": level, "prev_level": 0,
                                          "threshold": 25.0, "since_ms": ts_ms})


async def stored_event(storage: Storage, seq: int) -> tuple[dict[str, Any], float, int]:
    rows = await storage.run(lambda: _event_program(seq), write=False)
    attrs, value, ts_ms = rows[0]
    return (json.loads(attrs) if isinstance(attrs, str) else attrs), value, ts_ms


def _event_program(seq: int) -> Any:
    rows = yield Sql("SELECT attrs, value, ts_ms FROM events WHERE gw = ? AND stream = ?"
                     " AND seq = ?", (GW, STREAM, seq))
    return rows


@pytest.mark.parametrize("kind", BACKENDS)
async def test_ip_copy_merges_into_narrowband_copy(tmp_path: Path, kind: str) -> None:
    """The full record arriving over IP under the same seq replaces the narrowband copy's
    value and attrs: one record, one alarm raised once, now with its threshold; an ordinary
    duplicate still changes nothing."""
    async with rig(tmp_path, kind) as r:
        ts = now_s() - 5
        r.send(alarms_frame(entry(7, value=30.4, ts=ts)))
        (alarm,) = await until(lambda: active(r.storage))
        assert alarm.threshold is None
        nb_attrs, _, _ = await stored_event(r.storage, 7)
        assert nb_attrs["bearer"] == "beidou"

        full = full_record(7, 30.4321, ts * 1000 + 250)
        (res,) = await r.storage.write_batches([env.DataBatch(GW, STREAM, (full,))])
        assert (res.inserted, res.merged) == (0, 1)
        assert (await r.storage.count_records(GW)).events == 1
        attrs, value, ts_ms = await stored_event(r.storage, 7)
        assert attrs["threshold"] == 25.0 and "bearer" not in attrs
        assert (value, ts_ms) == (30.4321, ts * 1000 + 250)
        (merged,) = await list_alarms(r.storage, gw=GW)
        assert merged.id == alarm.id and merged.state == "active"
        assert merged.transitions == 1 and merged.threshold == 25.0 and merged.value == 30.4321
        assert merged.source == "beidou"  # how its transition arrived; the IP copy followed
        assert len(await alarm_history(r.storage, alarm.id)) == 1

        # Resent again over IP, or an IP record resent with other content: held, untouched.
        (again,) = await r.storage.write_batches([env.DataBatch(GW, STREAM, (full,))])
        assert (again.inserted, again.merged) == (0, 0)
        plain = full_record(8, 40.0, ts * 1000 + 900, state="changed", level=1)
        await r.storage.write_batches([env.DataBatch(GW, STREAM, (plain,))])
        (dup,) = await r.storage.write_batches(
            [env.DataBatch(GW, STREAM, (plain._replace(value=99.0),))])
        assert (dup.inserted, dup.merged) == (0, 0)
        assert (await stored_event(r.storage, 8))[1] == 40.0
        # A late narrowband copy of a record already held over IP changes nothing either.
        r.send(alarms_frame(entry(8, value=1.0, ts=ts)))
        await until(lambda: (r.metrics.narrowband_received["alarms"] == 2))
        assert (await stored_event(r.storage, 8))[1] == 40.0
        assert (await r.storage.count_records(GW)).events == 2
        assert len(await list_alarms(r.storage, gw=GW)) == 1
        # The mark is a flag central's receiver sets, not what attrs say: an IP record that
        # claims to have come by BeiDou is held like any other, and its resend is dropped.
        claim = full_record(9, 41.0, ts * 1000 + 950)  # a low alarm: a second alarm of its own
        claim = claim._replace(attrs={**(claim.attrs or {}), "alarm_id": "gas-1/gas_lel/low",
                                      "rule": "low", "bearer": "beidou"})
        await r.storage.write_batches([env.DataBatch(GW, STREAM, (claim,))])
        (res9,) = await r.storage.write_batches(
            [env.DataBatch(GW, STREAM, (claim._replace(value=1.0, attrs=plain.attrs),))])
        assert (res9.inserted, res9.merged) == (0, 0)
        assert (await stored_event(r.storage, 9))[1] == 41.0
        (alarm9,) = [a for a in await list_alarms(r.storage, gw=GW)
                     if a.alarm_key == "gas-1/gas_lel/low"]
        assert alarm9.source == "edge"  # the claim in attrs does not make it a radio alarm


async def test_receiver_reopens_a_lost_port(tmp_path: Path) -> None:
    """When the terminal's port goes away and comes back, the receiver reopens it and frames
    land again."""
    link = tmp_path / "ttyBD0"
    async with database("sqlite", tmp_path) as url, open_storage(url) as storage:
        await storage.record_birth(GW, BIRTH)
        metrics = Metrics()
        receiver = NarrowbandReceiver(settings_for(url, str(link)), storage, metrics)
        task = asyncio.create_task(receiver.run(), name="narrowband")
        try:
            async with BeidouTerminalSimulator(card_id=CENTRAL_CARD, pwi_period_s=None,
                                               symlink=link):
                await receiver.wait_connected(WAIT_S)
            await until(lambda: (not receiver.connected))
            async with BeidouTerminalSimulator(card_id=CENTRAL_CARD, pwi_period_s=None,
                                               symlink=link) as sim:
                await receiver.wait_connected(WAIT_S)
                await until(lambda: (sim.stats()["card_queries"] >= 1))
                sim.inject_inbound(CARD, alarms_frame(entry(11)))
                await until(lambda: active(storage))
            assert metrics.narrowband_port_failures >= 1
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_app_runs_receiver_and_exposes_its_counters(tmp_path: Path) -> None:
    """With `narrowband_port` set the app runs the receiver: a heartbeat shows in the gateway
    API, and /metrics carries the narrowband counters."""
    async with BeidouTerminalSimulator(card_id=CENTRAL_CARD, pwi_period_s=None) as sim:
        app = create_app(settings_for(f"sqlite:///{tmp_path}/c.db", sim.link_path),
                         run_ingest=False)
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://central") as c:
            await authorize(app, c)
            await app.state.storage.record_birth(GW, BIRTH)
            await app.state.narrowband.wait_connected(WAIT_S)
            sim.inject_inbound(CARD, encode_heartbeat(
                HeartbeatFrame(ts=now_s(), last_seq=1, backlog=77, active_alarms=0,
                               ip_down_s=60), key=KEY, stream=STREAM))

            async def on_beidou() -> Any:
                body = (await c.get(f"/api/gateways/{GW}")).json()
                return body if body["bearer"] == "beidou" else None
            body = await until(on_beidou)
            assert body["backlog"] == 77 and body["online"]
            sim.inject_inbound("0999999", b"\x00" * 12)
            await until(lambda: (
                app.state.metrics.narrowband_rejected["unknown_sender"] == 1))
            text = (await c.get("/metrics")).text
            assert 'fieldlink_central_narrowband_received_total{kind="heartbeat"} 1.0' in text
            assert ('fieldlink_central_narrowband_rejected_total{reason="unknown_sender"} 1.0'
                    in text)
            assert "fieldlink_central_narrowband_port_open 1.0" in text


def test_settings_check_narrowband_gateways(tmp_path: Path) -> None:
    """Gateways load from TOML; a duplicate card (leading zeros aside), a short or non-hex key
    are errors; the key never shows in the settings' repr."""
    path = tmp_path / "central.toml"
    gw = '[[central.narrowband_gateways]]\ngw = "{gw}"\ncard = "{card}"\nkey = "{key}"\n'
    good = KEY.hex()
    path.write_text('[central]\nnarrowband_port = "/dev/ttyUSB1"\n\n'
                    + gw.format(gw="a", card="0301001", key=good)
                    + gw.format(gw="b", card="301002", key=good), encoding="utf-8")
    s = load_settings(path)
    assert [g.gw for g in s.narrowband_gateways] == ["a", "b"]
    assert s.narrowband_gateways[0].key_bytes == KEY and good not in repr(s)
    path.write_text("[central]\n" + gw.format(gw="a", card="0301001", key=good)
                    + gw.format(gw="b", card="301001", key=good), encoding="utf-8")
    with pytest.raises(SettingsError, match="card 301001 listed twice"):
        load_settings(path)
    for key in ("00" * 15, "zz" * 16):
        path.write_text("[central]\n" + gw.format(gw="a", card="1", key=key),
                        encoding="utf-8")
        with pytest.raises(SettingsError, match="key"):
            load_settings(path)


# --- the same receiver on a PDT radio ------------------------------------------------------------

GW_RADIO, CENTRAL_RADIO, STRANGER_RADIO = 1001, 2002, 3003
GROUP = 900  # a talk group central's radio listens to


@dataclass
class PdtRig:
    storage: Storage
    air: PdtAir
    central: PdtRadioSimulator
    field_radio: PdtRadioSimulator  # the gateway's radio on the air (no gateway behind it here)
    stranger: PdtRadioSimulator  # a person's radio, or a gateway central does not know
    metrics: Metrics
    request_id: int = 0

    def text(self, text: str, sender: PdtRadioSimulator | None = None, *,
             group: bool = False) -> None:
        """Transmit `text` to central's radio (or its group) from `sender` (the gateway's)."""
        self.request_id += 1
        radio = sender or self.field_radio
        self.air.transmit(TextMessage(self.request_id, GROUP if group else CENTRAL_RADIO,
                                      radio.radio_id, text, group=group), radio)

    async def rejected(self, reason: str, n: int = 1) -> None:
        await until(lambda: self.metrics.narrowband_rejected[reason] >= n)


@contextlib.asynccontextmanager
async def pdt_rig(tmp_path: Path) -> AsyncIterator[PdtRig]:
    """Storage holding the birth, central's PDT radio on a pty, the receiver on it."""
    air = PdtAir()
    async with (open_storage(f"sqlite:///{tmp_path}/central.db") as storage,
                PdtRadioSimulator(air, CENTRAL_RADIO, groups={GROUP}) as central,
                PdtRadioSimulator(air, GW_RADIO) as field_radio,
                PdtRadioSimulator(air, STRANGER_RADIO) as stranger):
        await storage.record_birth(GW, BIRTH)
        metrics = Metrics()
        settings = Settings(
            db_url=f"sqlite:///{tmp_path}/central.db", narrowband_port=central.link_path,
            narrowband_bearer="pdt", narrowband_gateways=[
                NarrowbandGateway(gw=GW, radio=GW_RADIO, key=KEY.hex()),
                NarrowbandGateway(gw=OTHER_GW, card=OTHER_CARD, key=KEY.hex())])
        receiver = NarrowbandReceiver(settings, storage, metrics)
        task = asyncio.create_task(receiver.run(), name="narrowband.pdt")
        try:
            await receiver.wait_connected(WAIT_S)
            await until(lambda: central.connected)
            yield PdtRig(storage, air, central, field_radio, stranger, metrics)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_pdt_frame_text_raises_the_alarm(tmp_path: Path) -> None:
    """A frame as "FL1:" text from the gateway's radio opens the alarm (attrs say pdt), a
    heartbeat shows the gateway online on pdt, a frame to central's talk group counts too, and
    every data packet of the radio's is acked."""
    async with pdt_rig(tmp_path) as r:
        r.text(to_text(alarms_frame(entry(5, value=31.25))))
        (alarm,) = await until(lambda: active(r.storage))
        assert (alarm.alarm_key, alarm.value) == ("gas-1/gas_lel/high", 31.25)
        assert (await stored_event(r.storage, 5))[0]["bearer"] == "pdt"
        r.text(to_text(encode_heartbeat(HeartbeatFrame(ts=now_s(), last_seq=5, backlog=42,
                                                       active_alarms=1, ip_down_s=60),
                                        key=KEY, stream=STREAM)))

        async def on_pdt() -> Any:
            g = await r.storage.get_gateway(GW)
            return g if g.bearer == "pdt" else None
        assert (await until(on_pdt)).backlog == 42
        r.text(to_text(alarms_frame(entry(6, AlarmTransition.CLEARED, level=0))), group=True)
        await until(lambda: no_active(r.storage))
        assert r.metrics.narrowband_received == {"alarms": 2, "heartbeat": 1}
        await until(lambda: r.central.stats()["data_acks_received"] == 3)
        assert sum(r.metrics.narrowband_rejected.values()) == 0


async def test_pdt_human_text_and_bad_input_are_counted(tmp_path: Path) -> None:
    """A person's text is counted as not_fieldlink and ignored; bad base64, an unknown radio,
    a wrong key and line garbage are counted by reason; a good frame after them still lands."""
    async with pdt_rig(tmp_path) as r:
        r.text("收到，马上到", r.stranger)
        await r.rejected("not_fieldlink")
        r.text("FL1:not base64!")
        await r.rejected("bad_text")
        r.text(to_text(alarms_frame(entry(3))), r.stranger)
        await r.rejected("unknown_sender")
        r.text(to_text(alarms_frame(entry(3), key=b"\x01" * 32)))
        await r.rejected("mac_mismatch")
        assert r.central._line is not None
        r.central._line.write(b"\x00AT\r\n\x7e\x04\x00\x00\x00\x10\x20\x00\x00\x00\x0c\x00\x00")
        await r.rejected("bad_packet")
        assert await active(r.storage) == []
        r.text(to_text(alarms_frame(entry(4, point=1, rule=AlarmRule.LOW))))
        (alarm,) = await until(lambda: active(r.storage))
        assert alarm.alarm_key == "gas-1/o2/low"
        assert r.metrics.narrowband_rejected["not_fieldlink"] == 1


async def test_pdt_receiver_connects_again_after_a_reject(tmp_path: Path) -> None:
    """A radio that rejects the HRNP connect is asked again until it accepts; then frames
    land."""
    air = PdtAir()
    async with (open_storage(f"sqlite:///{tmp_path}/central.db") as storage,
                PdtRadioSimulator(air, CENTRAL_RADIO) as central,
                PdtRadioSimulator(air, GW_RADIO) as field_radio):
        await storage.record_birth(GW, BIRTH)
        central.set_faults(reject_connect=True)
        settings = Settings(db_url=f"sqlite:///{tmp_path}/central.db",
                            narrowband_port=central.link_path, narrowband_bearer="pdt",
                            narrowband_gateways=[NarrowbandGateway(gw=GW, radio=GW_RADIO,
                                                                   key=KEY.hex())])
        task = asyncio.create_task(NarrowbandReceiver(settings, storage, Metrics()).run())
        try:
            await until(lambda: central.stats()["rejected"] >= 1)
            central.set_faults(reject_connect=False)
            await until(lambda: central.connected)
            air.transmit(TextMessage(1, CENTRAL_RADIO, GW_RADIO,
                                     to_text(alarms_frame(entry(21)))), field_radio)
            await until(lambda: active(storage))
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def test_settings_pdt_gateways(tmp_path: Path) -> None:
    """`narrowband_bearer = "pdt"` with gateways by radio id; a radio listed twice, or a
    gateway with neither card nor radio, is an error."""
    path = tmp_path / "central.toml"
    gw = '[[central.narrowband_gateways]]\ngw = "{gw}"\n{addr}\nkey = "{key}"\n'
    good = KEY.hex()
    path.write_text('[central]\nnarrowband_port = "/dev/ttyUSB2"\nnarrowband_bearer = "pdt"\n\n'
                    + gw.format(gw="a", addr="radio = 1001", key=good)
                    + gw.format(gw="b", addr='radio = 1002\ncard = "0301002"', key=good),
                    encoding="utf-8")
    s = load_settings(path)
    assert s.narrowband_bearer == "pdt"
    assert [(g.radio, g.card) for g in s.narrowband_gateways] == [(1001, None),
                                                                  (1002, "0301002")]
    path.write_text("[central]\n" + gw.format(gw="a", addr="radio = 1001", key=good)
                    + gw.format(gw="b", addr="radio = 1001", key=good), encoding="utf-8")
    with pytest.raises(SettingsError, match="radio 1001 listed twice"):
        load_settings(path)
    path.write_text("[central]\n" + gw.format(gw="a", addr="", key=good), encoding="utf-8")
    with pytest.raises(SettingsError, match="needs a card, a radio or a phone"):
        load_settings(path)
