"""Central's narrowband receiver (DESIGN.md §5): what gateways send by radio while IP is down.

Central's own radio sits on a serial port (`narrowband_port`): a BeiDou terminal or, with
`narrowband_bearer = "pdt"`, a Hytera PDT radio, or with `"tiantong"` a Tiantong satellite
module (`central.narrowband.tiantong.TiantongLink`, SMS from the gateways' numbers).
`NarrowbandReceiver` owns that port: pyserial opens it in a thread (`exclusive=True`, so a
second reader fails instead of stealing bytes), then the non-blocking fd is read from the
event loop (`runtime.serial`), so nothing blocks the loop. A lost port is reopened with
capped, jittered back-off, logged once when it fails and once when it is back.

What is per bearer is small, a `Link`: the bytes to write when the port opens, and what the
bytes read mean (events: a frame from a sender, or something dropped with a reason) plus any
answer to write back. `BeidouLink` (below) decodes `$BDTCI` (BD-3) / `$BDTXR` (BD-2), whose
sender is a card; `central.narrowband.pdt.PdtLink` speaks HRNP, acks the radio's packets and
turns "FL1:" texts into frames, whose sender is a radio id. The sender names the gateway
(`narrowband_gateways`: `card` or `radio`).

Everything after that is shared (`receive`). A frame is checked with that gateway's key and its
current stream (the `gateways` row, which its birth set) before it is parsed
(`protocols.narrowband.decode_frame`), then:

- alarms: each entry becomes the ALARM record the edge itself stored under that seq, with the
  point named by its ordinal in the gateway's last birth (a `device_offline` entry names the
  device's first point and means `<device>/_device`), and is written with
  `storage.write_batches` under (gw, stream, seq), so the alarm engine raises and clears it as
  for an IP record. Its attrs say `bearer: beidou` or `pdt` (for the people reading it) and its
  flags carry `NARROWBAND_COPY`: when the full record comes over IP, storage merges it into
  this copy (`central.storage.writes`), it does not store a second one. Nothing is acked to the
  edge: it still sends the records over IP when it can.
- heartbeat: the gateway is heard now, online on `beidou` / `pdt`, with the backlog it
  reported (`storage.record_heartbeat`).
- 叫应 receipts and acknowledgements (`CALL_ACKS`): each entry becomes the EVENT record the
  edge stored under that seq (`protocols.callresp` attrs), flagged `NARROWBAND_COPY` and written
  the same way, then handed to the `batch_hooks` (the 叫应 workflow, `central.callresp`) as
  ingest does after a commit. When the IP copy comes, storage merges it into this one and the
  workflow, which applies an answer once, changes nothing: one answer, no duplicate.

The same session sends the downlink (`central.narrowband.downlink.RadioRoute`): signed 叫应
warnings to gateways off IP, one segment at a time as the terminal allows.

Bad input (garbage on the line, an unknown sender, no birth yet, a MAC that does not verify, a
frame that does not parse, an ordinal the birth does not name) is counted in
`narrowband_rejected_total{reason}`, logged once as `narrowband_rejected`, and the loop goes
on; the good entries of a frame are kept. A person's text on the PDT channel is counted
(`not_fieldlink`) and logged at info, without its content.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Protocol

import serial
import structlog

from central import CentralError
from central.config.settings import NarrowbandGateway, Settings
from central.health.metrics import Metrics
from central.narrowband.downlink import RadioRoute
from central.narrowband.links import (
    QUIET_S,
    BeidouLink,
    CardSeen,
    Dropped,
    Feedback,
    Inbound,
    Link,
    LinkEvent,
)
from central.narrowband.pdt import PdtLink
from central.narrowband.tiantong import TiantongLink
from central.storage import Storage, StorageError
from central.storage.program import Program, Sql
from central.storage.writes import NARROWBAND_COPY
from protocols.alarm_attrs import AlarmAttrs
from protocols.callresp import CallRespError, CallRespEvent, EventType, event_attrs
from protocols.envelope import DataBatch, Flag, Record, RecordKind
from protocols.errors import DetailedError
from protocols.limits import MalformedEnvelopeError
from protocols.narrowband import (
    RULE_NAMES,
    TRANSITION_NAMES,
    AlarmEntry,
    AlarmRule,
    AlarmsFrame,
    CallAckEntry,
    CallAcksFrame,
    CallAckType,
    HeartbeatFrame,
    MacMismatchError,
    NarrowbandError,
    decode_frame,
)
from protocols.point_inventory import PointInventory
from runtime.serial import LineReader, PortLostError, SerialPortError, open_serial
from runtime.tasks import Backoff

log = structlog.get_logger(__name__)

BACKOFF_FIRST_S: Final = 0.5
BACKOFF_MAX_S: Final = 30.0


class NarrowbandInputError(CentralError):
    """A narrowband message central cannot use; `reason` is its metrics label."""

    reason: ClassVar[str] = "rejected"


class UnknownSenderError(NarrowbandInputError):
    reason = "unknown_sender"

    def __init__(self, bearer: str, sender: str) -> None:
        what = {"pdt": "PDT radio", "tiantong": "Tiantong number"}.get(bearer, "BeiDou card")
        super().__init__(f"no gateway has {what} {sender}")
        self.bearer = bearer
        self.sender = sender


class NoBirthError(NarrowbandInputError, DetailedError):
    reason = "no_birth"

    template = "gateway {gw!r} has sent no birth: its stream and points are unknown"
    gw: str


class BadBirthError(NarrowbandInputError):
    reason = "bad_birth"

    def __init__(self, gw: str, error: Exception) -> None:
        super().__init__(f"gateway {gw!r}'s stored birth does not read: {error}")
        self.gw = gw


class UnknownOrdinalError(NarrowbandInputError, DetailedError):
    reason = "unknown_point"

    template = "gateway {gw!r}'s birth has no point with ordinal {ordinal}"
    gw: str
    ordinal: int


class NarrowbandPortError(CentralError, SerialPortError):
    """The receiving terminal's serial port cannot be opened, or was lost."""


# --- the pure part: birth inventory and frame entries -> records ------------------------------


@dataclass(frozen=True, slots=True)
class Inventory:
    """What a gateway's last birth says: its stream and its points' ordinals
    (`protocols.point_inventory`, the mapping the edge's fallback encodes with)."""

    stream: str
    points: PointInventory

    def point_of(self, gw: str, entry: AlarmEntry) -> str:
        point = self.points.point(entry.point,
                                  device_level=entry.rule is AlarmRule.DEVICE_OFFLINE)
        if point is None:
            raise UnknownOrdinalError(gw, entry.point)
        return point


def inventory_from_birth(gw: str, stream: str, birth: object) -> Inventory:
    """From the birth JSON the `gateways` row keeps (`protocols.envelope.to_jsonable`)."""
    try:
        return Inventory(stream, PointInventory.from_jsonable(birth))
    except MalformedEnvelopeError as exc:
        raise BadBirthError(gw, exc) from exc


def alarm_record(entry: AlarmEntry, point: str, bearer: str = "beidou") -> Record:
    """The ALARM record the edge stored under `entry.seq`, as far as the frame tells it."""
    rule = RULE_NAMES[entry.rule]
    attrs = AlarmAttrs(alarm_id=f"{point}/{rule}", rule=rule,
                       state=TRANSITION_NAMES[entry.state], level=entry.level, bearer=bearer)
    # NARROWBAND_COPY marks it for replacement by the full record when that comes over IP.
    return Record(entry.seq, RecordKind.ALARM, entry.ts * 1000, point, entry.value,
                  Flag(NARROWBAND_COPY), attrs.to_attrs())


def call_ack_record(entry: CallAckEntry) -> Record:
    """The 叫应 EVENT record the edge stored under `entry.seq`, as the frame tells it;
    raises `CallRespError` for ids the contract refuses."""
    ev = CallRespEvent(type=EventType.ACK if entry.type is CallAckType.ACK
                       else EventType.DELIVERED, warning_id=entry.warning_id,
                       terminal=entry.terminal, at_ms=entry.at_ms, by=entry.by)
    return Record(entry.seq, RecordKind.EVENT, entry.at_ms, None, None, Flag(NARROWBAND_COPY),
                  event_attrs(ev))


class BatchHook(Protocol):
    """A consumer of committed batches (`central.ingest.subscriber.BatchHook`)."""

    async def apply_batch(self, batch: DataBatch) -> None: ...


class RetiredList(Protocol):
    """Refuses, counts and logs the messages of retired gateways
    (`central.identity.retire.RetiredGate`)."""

    async def refuses(self, gw: str) -> bool: ...


class RetiredSenderError(NarrowbandInputError, DetailedError):
    """A frame from a retired gateway's radio: refused and counted, as ingest refuses its
    MQTT messages; an unretire brings it back."""

    reason = "retired_gateway"

    template = "gateway {gw!r} is retired"
    gw: str


def _gateway_program(gw: str) -> Program[tuple[str | None, Any] | None]:
    rows = yield Sql("SELECT stream, birth FROM gateways WHERE gw = ?", (gw,))
    return (rows[0][0], rows[0][1]) if rows else None


def make_link(settings: Settings, logger: Any) -> Link:
    """The link of `narrowband_bearer`."""
    if settings.narrowband_bearer == "pdt":
        return PdtLink(logger, radio_id=settings.narrowband_radio_id or 0)
    if settings.narrowband_bearer == "tiantong":
        return TiantongLink(logger)
    return BeidouLink(settings, logger)


# --- the receiver ------------------------------------------------------------------------------


class NarrowbandReceiver:
    """Reads central's radio into storage; `run()` is the `narrowband_loop`."""

    def __init__(self, settings: Settings, storage: Storage, metrics: Metrics, *,
                 route: RadioRoute | None = None, batch_hooks: Sequence[BatchHook] = (),
                 retired: RetiredList | None = None) -> None:
        """`route`: the downlink queue the command dispatcher fills; `batch_hooks`: what
        takes the records built from radio frames after their commit (the 叫应 workflow);
        `retired`: the gateways whose frames are refused."""
        if settings.narrowband_port is None:
            raise ValueError("narrowband_port is not set")  # a programming error
        self.port: str = settings.narrowband_port
        self.settings = settings
        self.storage = storage
        self.metrics = metrics
        self.bearer: str = settings.narrowband_bearer
        self.route = route
        self.batch_hooks = tuple(batch_hooks)
        self.retired = retired
        self._log = log.bind(port=self.port, bearer=self.bearer)
        self._probe_link = make_link(settings, self._log)
        self._senders: dict[str, NarrowbandGateway] = {}
        for g in settings.narrowband_gateways:
            address = self._probe_link.address(g)
            if address is not None:
                self._senders[address] = g
        self._open_event = asyncio.Event()
        self._failing = False

    @property
    def connected(self) -> bool:
        return self._open_event.is_set()

    async def wait_connected(self, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            await self._open_event.wait()

    async def run(self) -> None:
        """Read the radio until cancelled; reopen the port whenever it is lost."""
        backoff = Backoff(BACKOFF_FIRST_S, BACKOFF_MAX_S)
        delay = backoff.first_s
        self._log.info("narrowband_started", dialect=self.settings.narrowband_dialect,
                       gateways=len(self._senders))
        try:
            while True:
                try:
                    port = await self._open()
                except NarrowbandPortError as exc:
                    reason = exc.reason
                else:
                    delay = backoff.first_s
                    try:
                        reason = await self._session(port)
                    finally:
                        with contextlib.suppress(OSError, serial.SerialException):
                            port.close()
                self._port_failed(reason, delay)
                await asyncio.sleep(backoff.wait_s(delay))
                delay = backoff.next_delay(delay)
        finally:
            self._log.info("narrowband_stopped")

    def _port_failed(self, reason: str, retry_in_s: float) -> None:
        self.metrics.narrowband_port_failures += 1
        if not self._failing:  # once per outage, not once per retry
            self._failing = True
            self._log.warning("narrowband_port_failed", error=reason,
                              retry_in_s=round(retry_in_s, 2))

    async def _open(self) -> serial.Serial:
        return await open_serial(self.port, NarrowbandPortError,
                                 baudrate=self.settings.narrowband_baudrate)

    async def _session(self, port: serial.Serial) -> str:
        """Read the open port until it fails; returns why it ended."""
        reader = LineReader(port)
        fd = reader.fd
        link = make_link(self.settings, self._log)  # a fresh decoder for a fresh line
        _write(fd, link.hello())
        self._open_event.set()
        self.metrics.narrowband_port_open = True
        self._failing = False
        self._log.info("narrowband_port_open")
        try:
            while True:
                try:
                    async with asyncio.timeout(QUIET_S):
                        data = await reader.read()
                except TimeoutError:
                    reply, events = link.idle()
                except PortLostError as exc:
                    return exc.reason
                else:
                    reply, events = link.feed(data)
                _write(fd, reply)
                for event in events:
                    await self._event(event)
                _write(fd, self._downlink(link))
        finally:
            if self.route is not None:
                self.route.lost()
            self._open_event.clear()
            self.metrics.narrowband_port_open = False
            reader.stop()

    async def _event(self, event: LinkEvent) -> None:
        if isinstance(event, Inbound):
            await self.receive(event.sender, event.payload)
        elif isinstance(event, Dropped):
            self._dropped(event)
        elif self.route is not None:
            if isinstance(event, Feedback):
                self.metrics.narrowband_downlink["accepted" if event.accepted else "refused"] += 1
                self.route.feedback(event.accepted, event.wait_s)
            elif isinstance(event, CardSeen):
                self.route.card(event.interval_s, event.payload_bytes)

    def _downlink(self, link: Link) -> bytes:
        """The next downlink segment to write, if one is due."""
        if self.route is None:
            return b""
        self.route.tick()
        out = self.route.next_send()
        return b"" if out is None else link.send(*out)

    def _dropped(self, event: Dropped) -> None:
        if not event.quiet:
            self._reject(event.reason, event.error,
                         **({"sender": event.sender} if event.sender else {}))
            return
        self.metrics.narrowband_rejected[event.reason] += 1
        self._log.info("narrowband_ignored", reason=event.reason, sender=event.sender,
                       detail=str(event.error))

    # --- one message -----------------------------------------------------------------------

    async def receive(self, sender: str, payload: bytes) -> None:
        """Verify, decode and store one frame from `sender` (a card or a radio id); never
        raises for bad input (it is counted and logged)."""
        gateway = self._senders.get(sender.lstrip("0"))
        try:
            if gateway is None:
                raise UnknownSenderError(self.bearer, sender)
            if self.retired is not None and await self.retired.refuses(gateway.gw):
                raise RetiredSenderError(gateway.gw)
            inventory = await self._inventory(gateway.gw)
            frame = decode_frame(payload, key=gateway.key_bytes, stream=inventory.stream,
                                 mac_len=self.settings.narrowband_mac_len)
            if isinstance(frame, AlarmsFrame):
                await self._store_alarms(gateway.gw, inventory, frame)
            elif isinstance(frame, CallAcksFrame):
                await self._store_call_acks(gateway.gw, inventory, frame)
            else:
                await self._store_heartbeat(gateway.gw, frame)
        except MacMismatchError as exc:
            self._reject("mac_mismatch", exc, sender=sender)
        except NarrowbandError as exc:
            self._reject("malformed", exc, sender=sender)
        except NarrowbandInputError as exc:
            self._reject(exc.reason, exc, sender=sender)
        except StorageError as exc:
            # Not bad input, but the loop must go on: the edge sends the records over IP later.
            self._reject("write_failed", exc, sender=sender)

    async def _inventory(self, gw: str) -> Inventory:
        row = await self.storage.run(lambda: _gateway_program(gw), write=False)
        stream, birth = (None, None) if row is None else row
        if stream is None or birth is None:
            raise NoBirthError(gw)
        # SQLite keeps the birth as JSON text, PostgreSQL as jsonb (a dict already).
        return inventory_from_birth(gw, stream, json.loads(birth) if isinstance(birth, str)
                                    else birth)

    async def _store_alarms(self, gw: str, inventory: Inventory, frame: AlarmsFrame) -> None:
        records = []
        for entry in frame.entries:
            try:
                records.append(alarm_record(entry, inventory.point_of(gw, entry), self.bearer))
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

    async def _store_call_acks(self, gw: str, inventory: Inventory,
                               frame: CallAcksFrame) -> None:
        records = []
        for entry in frame.entries:
            try:
                records.append(call_ack_record(entry))
            except CallRespError as exc:  # this entry only: keep the good ones beside it
                self._reject("malformed", exc, gw=gw, seq=entry.seq)
        if not records:
            return
        batch = DataBatch(gw, inventory.stream, tuple(records))
        (result,) = await self.storage.write_batches([batch])
        for hook in self.batch_hooks:  # idempotent: a copy seen twice changes nothing
            await hook.apply_batch(batch)
        self.metrics.narrowband_received["call_acks"] += 1
        self.metrics.narrowband_records += result.inserted
        self._log.info("narrowband_received", gw=gw, kind="call_acks", records=len(records),
                       inserted=result.inserted, seqs=[r.seq for r in records])

    async def _store_heartbeat(self, gw: str, frame: HeartbeatFrame) -> None:
        await self.storage.record_heartbeat(gw, bearer=self.bearer,
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


def _write(fd: int, data: bytes) -> None:
    """Write a short answer (a query, a 12-byte ack) on the non-blocking fd: the line takes it
    whole; a full or dead line shows up on the read side."""
    if data:
        with contextlib.suppress(OSError):
            os.write(fd, data)
