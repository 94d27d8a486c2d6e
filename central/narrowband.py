"""Central's narrowband receiver (DESIGN.md §5): what gateways send over BeiDou while IP is down.

Central's own BeiDou terminal sits on a serial port (`narrowband_port`). `NarrowbandReceiver`
owns that port: pyserial opens it in a thread (`exclusive=True`, so a second reader fails
instead of stealing bytes), then the non-blocking fd is read from the event loop with
`loop.add_reader`, so nothing blocks the loop. A lost port is reopened with capped, jittered
back-off, logged once when it fails and once when it is back. Bytes go into the pure
`protocols.beidou.BeidouDecoder`; each inbound short message (`$BDTCI` on BD-3, `$BDTXR` on
BD-2) names its sender's card, which names the gateway (`narrowband_gateways`).

A frame is checked with that gateway's key and its current stream (the `gateways` row, which
its birth set) before it is parsed (`protocols.narrowband.decode_frame`), then:

- alarms: each entry becomes the ALARM record the edge itself stored under that seq, with the
  point named by its ordinal in the gateway's last birth (a `device_offline` entry names the
  device's first point and means `<device>/_device`), and is written with
  `storage.write_batches` under (gw, stream, seq), so the alarm engine raises and clears it as
  for an IP record. Its attrs say `bearer: beidou` (for the people reading it) and its flags
  carry `NARROWBAND_COPY`: when the full record comes over IP, storage merges it into this copy
  (`central.storage.writes`), it does not store a second one. Nothing is
  acked to the edge: it still sends the records over IP when it can.
- heartbeat: the gateway is heard now, online on `beidou`, with the backlog it reported
  (`storage.record_heartbeat`).

Bad input (garbage on the line, an unknown card, no birth yet, a MAC that does not verify, a
frame that does not parse, an ordinal the birth does not name) is counted in
`narrowband_rejected_total{reason}`, logged once as `narrowband_rejected`, and the loop goes
on; the good entries of a frame are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import serial
import structlog

from central.errors import CentralError
from central.metrics import Metrics
from central.settings import NarrowbandGateway, Settings
from central.storage import Storage, StorageError
from central.storage.program import Program, Sql
from central.storage.writes import NARROWBAND_COPY
from protocols.beidou import (
    NEED_DATA,
    Bd2CardInfo,
    Bd2CardQuery,
    Bd2Message,
    Bd3CardInfo,
    Bd3CardQuery,
    Bd3Message,
    BeidouDecoder,
    BeidouError,
    encode,
)
from protocols.envelope import DataBatch, Flag, Record, RecordKind
from protocols.narrowband import (
    AlarmEntry,
    AlarmRule,
    AlarmsFrame,
    AlarmTransition,
    HeartbeatFrame,
    MacMismatchError,
    NarrowbandError,
    decode_frame,
)

log = structlog.get_logger(__name__)

BACKOFF_FIRST_S: Final = 0.5
BACKOFF_MAX_S: Final = 30.0
_READ_SIZE: Final = 4096
DEVICE_POINT: Final = "_device"  # the pseudo point of device-level alarms (edge_agent.rules)
BEARER: Final = "beidou"  # what the gateway view and the record attrs say it came by
# Wire codes to the names the edge's rules and records use (edge_agent.rules.RuleKind).
RULE_NAMES: Final = {AlarmRule.HIGH: "high", AlarmRule.LOW: "low", AlarmRule.RATE: "rate",
                     AlarmRule.STALE: "stale", AlarmRule.DEVICE_OFFLINE: "device_offline"}
STATE_NAMES: Final = {AlarmTransition.RAISED: "raised", AlarmTransition.CHANGED: "changed",
                      AlarmTransition.CLEARED: "cleared"}


class NarrowbandInputError(CentralError):
    """A narrowband message central cannot use; `reason` is its metrics label."""

    reason: ClassVar[str] = "rejected"


class UnknownSenderError(NarrowbandInputError):
    reason = "unknown_sender"

    def __init__(self, card: str) -> None:
        super().__init__(f"no gateway has BeiDou card {card}")
        self.card = card


class NoBirthError(NarrowbandInputError):
    reason = "no_birth"

    def __init__(self, gw: str) -> None:
        super().__init__(f"gateway {gw!r} has sent no birth: its stream and points are unknown")
        self.gw = gw


class UnknownOrdinalError(NarrowbandInputError):
    reason = "unknown_point"

    def __init__(self, gw: str, ordinal: int) -> None:
        super().__init__(f"gateway {gw!r}'s birth has no point with ordinal {ordinal}")
        self.gw = gw
        self.ordinal = ordinal


class NarrowbandPortError(CentralError):
    def __init__(self, port: str, reason: str) -> None:
        super().__init__(f"{port}: {reason}")
        self.port = port
        self.reason = reason


# --- the pure part: birth inventory and frame entries -> records ------------------------------


@dataclass(frozen=True, slots=True)
class Inventory:
    """What a gateway's last birth says: its stream and, per point ordinal, the point key
    (`device/point`) and its device."""

    stream: str
    points: dict[int, tuple[str, str]]

    def point_of(self, gw: str, entry: AlarmEntry) -> str:
        try:
            key, device = self.points[entry.point]
        except KeyError:
            raise UnknownOrdinalError(gw, entry.point) from None
        return f"{device}/{DEVICE_POINT}" if entry.rule is AlarmRule.DEVICE_OFFLINE else key


def inventory_from_birth(stream: str, birth: dict[str, Any]) -> Inventory:
    """From the birth JSON the `gateways` row keeps (`protocols.envelope.to_jsonable`)."""
    points: dict[int, tuple[str, str]] = {}
    for dev in birth.get("devices", ()):
        for p in dev.get("points", ()):
            key = p["key"] if "/" in p["key"] else f"{dev['id']}/{p['key']}"
            points[int(p["ordinal"])] = (key, key.partition("/")[0])
    return Inventory(stream, points)


def alarm_record(entry: AlarmEntry, point: str) -> Record:
    """The ALARM record the edge stored under `entry.seq`, as far as the frame tells it."""
    rule = RULE_NAMES[entry.rule]
    # NARROWBAND_COPY marks it for replacement by the full record when that comes over IP.
    return Record(entry.seq, RecordKind.ALARM, entry.ts * 1000, point, entry.value,
                  Flag(NARROWBAND_COPY),
                  {"alarm_id": f"{point}/{rule}", "rule": rule,
                   "state": STATE_NAMES[entry.state], "level": entry.level,
                   "bearer": BEARER})


def _gateway_program(gw: str) -> Program[tuple[str | None, Any] | None]:
    rows = yield Sql("SELECT stream, birth FROM gateways WHERE gw = ?", (gw,))
    return (rows[0][0], rows[0][1]) if rows else None


# --- the receiver ------------------------------------------------------------------------------


class NarrowbandReceiver:
    """Reads central's BeiDou terminal into storage; `run()` is the `narrowband_loop`."""

    def __init__(self, settings: Settings, storage: Storage, metrics: Metrics) -> None:
        if settings.narrowband_port is None:
            raise ValueError("narrowband_port is not set")  # a programming error
        self.port: str = settings.narrowband_port
        self.settings = settings
        self.storage = storage
        self.metrics = metrics
        self._cards: dict[str, NarrowbandGateway] = {
            g.card_number: g for g in settings.narrowband_gateways}
        self._open_event = asyncio.Event()
        self._failing = False
        self._log = log.bind(port=self.port)

    @property
    def connected(self) -> bool:
        return self._open_event.is_set()

    async def wait_connected(self, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            await self._open_event.wait()

    async def run(self) -> None:
        """Read the terminal until cancelled; reopen the port whenever it is lost."""
        backoff = BACKOFF_FIRST_S
        self._log.info("narrowband_started", dialect=self.settings.narrowband_dialect,
                       gateways=len(self._cards))
        try:
            while True:
                try:
                    port = await self._open()
                except NarrowbandPortError as exc:
                    reason = exc.reason
                else:
                    backoff = BACKOFF_FIRST_S
                    try:
                        reason = await self._session(port)
                    finally:
                        with contextlib.suppress(OSError, serial.SerialException):
                            port.close()
                self._port_failed(reason, backoff)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
        finally:
            self._log.info("narrowband_stopped")

    def _port_failed(self, reason: str, retry_in_s: float) -> None:
        self.metrics.narrowband_port_failures += 1
        if not self._failing:  # once per outage, not once per retry
            self._failing = True
            self._log.warning("narrowband_port_failed", error=reason,
                              retry_in_s=round(retry_in_s, 2))

    async def _open(self) -> serial.Serial:
        def open_port() -> serial.Serial:
            try:
                return serial.Serial(self.port, baudrate=self.settings.narrowband_baudrate,
                                     timeout=0, exclusive=True)
            except (serial.SerialException, OSError, ValueError) as exc:
                raise NarrowbandPortError(self.port, str(exc)) from exc

        task = asyncio.ensure_future(asyncio.to_thread(open_port))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # The thread still opens the port: close it when it does, or it leaks.
            task.add_done_callback(
                lambda t: t.cancelled() or t.exception() is not None or t.result().close())
            raise

    async def _session(self, port: serial.Serial) -> str:
        """Read the open port until it fails; returns why it ended."""
        loop = asyncio.get_running_loop()
        fd = port.fileno()
        os.set_blocking(fd, False)
        queue: asyncio.Queue[bytes | str] = asyncio.Queue()
        decoder = BeidouDecoder()

        def readable() -> None:
            try:
                data = os.read(fd, _READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EIO: the USB adapter went away, the pty closed
                loop.remove_reader(fd)
                queue.put_nowait(f"read failed: {exc}")
                return
            if not data:
                loop.remove_reader(fd)
                queue.put_nowait("end of file")
                return
            queue.put_nowait(data)

        loop.add_reader(fd, readable)
        self._ask_card(fd)
        self._open_event.set()
        self.metrics.narrowband_port_open = True
        self._failing = False
        self._log.info("narrowband_port_open")
        try:
            while True:
                item = await queue.get()
                if isinstance(item, str):
                    return item
                decoder.feed(item)
                await self._drain(decoder)
        finally:
            self._open_event.clear()
            self.metrics.narrowband_port_open = False
            loop.remove_reader(fd)

    def _ask_card(self, fd: int) -> None:
        """Ask the terminal for its card, only so that the log says which one answers."""
        query = (Bd3CardQuery() if self.settings.narrowband_dialect == "bd3"
                 else Bd2CardQuery())
        with contextlib.suppress(OSError):  # a full or dead line shows up on the read side
            os.write(fd, encode(query))

    async def _drain(self, decoder: BeidouDecoder) -> None:
        while True:
            try:
                sentence = decoder.next_sentence()
            except BeidouError as exc:
                self._reject("bad_sentence", exc)
                continue
            if sentence is NEED_DATA:
                return
            if isinstance(sentence, Bd3Message | Bd2Message):
                await self.receive(sentence.sender, sentence.payload)
            elif isinstance(sentence, Bd3CardInfo | Bd2CardInfo):
                self._log.info("narrowband_terminal", card=sentence.card_id,
                               interval_s=sentence.interval_s)
            # Anything else ($BDPWI beams, $BDFKI feedback) says nothing about gateways.

    # --- one message -----------------------------------------------------------------------

    async def receive(self, sender: str, payload: bytes) -> None:
        """Verify, decode and store one short message from `sender`'s card; never raises for
        bad input (it is counted and logged)."""
        gateway = self._cards.get(sender.lstrip("0"))
        try:
            if gateway is None:
                raise UnknownSenderError(sender)
            inventory = await self._inventory(gateway.gw)
            frame = decode_frame(payload, key=gateway.key_bytes, stream=inventory.stream,
                                 mac_len=self.settings.narrowband_mac_len)
            if isinstance(frame, AlarmsFrame):
                await self._store_alarms(gateway.gw, inventory, frame)
            else:
                await self._store_heartbeat(gateway.gw, frame)
        except MacMismatchError as exc:
            self._reject("mac_mismatch", exc, card=sender)
        except NarrowbandError as exc:
            self._reject("malformed", exc, card=sender)
        except NarrowbandInputError as exc:
            self._reject(exc.reason, exc, card=sender)
        except StorageError as exc:
            # Not bad input, but the loop must go on: the edge sends the records over IP later.
            self._reject("write_failed", exc, card=sender)

    async def _inventory(self, gw: str) -> Inventory:
        row = await self.storage.run(lambda: _gateway_program(gw), write=False)
        if row is None or row[0] is None or row[1] is None:
            raise NoBirthError(gw)
        stream, birth = row
        # SQLite keeps the birth as JSON text, PostgreSQL as jsonb (a dict already).
        return inventory_from_birth(stream, json.loads(birth) if isinstance(birth, str)
                                    else birth)

    async def _store_alarms(self, gw: str, inventory: Inventory, frame: AlarmsFrame) -> None:
        records = []
        for entry in frame.entries:
            try:
                records.append(alarm_record(entry, inventory.point_of(gw, entry)))
            except UnknownOrdinalError as exc:  # this entry only: keep the good ones beside it
                self._reject(exc.reason, exc, gw=gw, seq=entry.seq)
        if not records:
            return
        (result,) = await self.storage.write_batches(
            [DataBatch(gw, inventory.stream, tuple(records))])
        self.metrics.narrowband_received["alarms"] += 1
        self.metrics.narrowband_records += result.inserted
        self._log.info("narrowband_received", gw=gw, kind="alarms", records=len(records),
                       inserted=result.inserted, seqs=[r.seq for r in records])

    async def _store_heartbeat(self, gw: str, frame: HeartbeatFrame) -> None:
        await self.storage.record_heartbeat(gw, bearer=BEARER,
                                            backlog=frame.backlog, ts_ms=frame.ts * 1000)
        self.metrics.narrowband_received["heartbeat"] += 1
        self._log.info("narrowband_received", gw=gw, kind="heartbeat", last_seq=frame.last_seq,
                       backlog=frame.backlog, active_alarms=frame.active_alarms,
                       ip_down_s=frame.ip_down_s, power=frame.power.name.lower(),
                       battery_pct=frame.battery_pct)

    def _reject(self, reason: str, exc: Exception, **fields: Any) -> None:
        self.metrics.narrowband_rejected[reason] += 1
        self._log.warning("narrowband_rejected", reason=reason, error_class=type(exc).__name__,
                          error=str(exc), **fields)
