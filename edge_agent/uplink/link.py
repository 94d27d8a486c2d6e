"""The MQTT uplink: drains the outbox to central and marks records delivered on `down/ack`.

DESIGN.md §4: a record is delivered only when central's `down/ack` names it; the broker's
PUBACK means nothing. Unacknowledged batches go again after `ack_timeout_s` and after every
reconnect (all in-flight state is dropped on disconnect). A batch is "re-sent" by forgetting
that it is in flight: its undelivered records come out of `Outbox.next_batch` again, in lane
order and with fresh backlog flags, and central deduplicates on `(gw, stream, seq)`. While
no timely ack arrives, the timeout doubles after each expiry (up to 8x), so a silent or
overloaded central does not cost a narrow link a full window every `ack_timeout_s`; the next
ack of a batch still in flight resets it.

Lanes (§4.2): each batch is either *priority* (alarms, events, live telemetry and, after an
outage, the newest value of each point) or *backlog* (older telemetry, oldest first). Backlog
batches are paced by a `BacklogPacer` (AIMD on backlog batches in flight, driven by the ack
RTT, plus a records-per-second ceiling) and may never hold the last `reserve` in-flight
slots (a quarter of `max_inflight`, at least one): those are always free for priority
batches, so a live record or an alarm is published at once and waits at most behind the few
backlog batches already in flight, never behind the history.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import aiomqtt
import structlog

from edge_agent import EdgeError
from edge_agent.outbox.store import Outbox, OutboxError
from edge_agent.uplink.pacing import BacklogPacer
from protocols import topics
from protocols.envelope import (
    Ack,
    Birth,
    DataBatch,
    EnvelopeError,
    Record,
    State,
    count_in_ranges,
    decode,
    encode,
    merge_ranges,
    ranges_from_seqs,
    subtract_ranges,
)

log = structlog.get_logger(__name__)

CommandHandler = Callable[[bytes], Awaitable[None] | None]
Ranges = tuple[tuple[int, int], ...]


class UplinkError(EdgeError):
    """Base of the uplink's own errors."""


@dataclass(slots=True)
class UplinkCounters:
    """Monotonic counters for metrics (mutated only by the uplink)."""

    connects: int = 0
    batches_sent: int = 0
    records_sent: int = 0
    batches_resent: int = 0  # batches whose ack timed out; their records went out again
    acks: int = 0
    records_acked: int = 0  # rows newly marked delivered
    acks_foreign: int = 0  # acks naming another stream
    acks_malformed: int = 0
    # Defence in depth (DESIGN.md §8): an ack may mark delivered only seqs this uplink sent
    # and has not yet seen acked. Seqs it names beyond those are ignored and counted here:
    acks_refused: int = 0  # acks that named a seq never sent (forged, or from another stream)
    ack_records_unsent: int = 0  # seqs never sent by this uplink (or lost from its memory)
    ack_records_duplicate: int = 0  # seqs already acked (central's second ack of a resend)
    commands: int = 0
    backlog_batches_sent: int = 0
    backlog_records_sent: int = 0


@dataclass(slots=True)
class _InFlight:
    ranges: Ranges  # the batch's seqs not yet acknowledged: sorted, disjoint
    count: int  # seqs in `ranges`
    sent_at: float  # monotonic
    backlog: bool = False


_MAX_TIMEOUT_FACTOR = 8
# Bounds of the sent/acked seq memory (disjoint ranges): past it the lowest ranges are
# forgotten, which only makes their acks count as unsent and their records go again.
_MAX_RANGES = 4096
_STABLE_S = 10.0  # a connection up this long counts as healthy


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class _Client(aiomqtt.Client):
    """aiomqtt ignores a connection closed before CONNACK and waits out its whole `timeout`;
    a link that drops every connection at once (a cut uplink behind a NAT or proxy, a broker
    shedding load) then costs every reconnect attempt that long, and the gateway notices a
    returning link late. Fail the attempt at once instead."""

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any = None) -> None:
        if not self._connected.done():
            if self._lock.locked():  # a connect attempt is waiting for its CONNACK
                self._connected.set_exception(
                    aiomqtt.MqttError(f"connection closed before CONNACK ({reason_code})"))
            return
        super()._on_disconnect(client, userdata, flags, reason_code, properties)

    async def __aexit__(self, *exc_info: Any) -> None:
        try:
            await super().__aexit__(*exc_info)
        finally:
            # After an unexpected disconnection aiomqtt leaves the reason in a future that
            # only its message iterator reads; when a publish noticed first, asyncio would
            # report it as never retrieved. The session's own error already says what happened.
            if self._disconnected.done() and not self._disconnected.cancelled():
                self._disconnected.exception()


class Uplink:
    """One MQTT connection to central, kept up for as long as `run()` runs.

    Example::

        uplink = Uplink(gw="gw-1", outbox=ob, host="broker", port=8883, boot_id=boot,
                        version=__version__, birth=birth, tls=ssl_context)
        tg.create_task(uplink.run(), name="uplink.mqtt")
    """

    def __init__(self, *, gw: str, outbox: Outbox, host: str, port: int, boot_id: str,
                 version: str, birth: Birth, batch_size: int = 500,
                 backlog_batch_size: int | None = None, max_inflight: int = 16,
                 ack_timeout_s: float = 10.0, keepalive_s: int = 30, client_id: str | None = None,
                 tls: ssl.SSLContext | None = None, username: str | None = None,
                 password: str | None = None, bearer: str = "ip", state_interval_s: float = 10.0,
                 backoff_initial_s: float = 0.5, backoff_max_s: float = 10.0,
                 on_command: CommandHandler | None = None,
                 backlog_max_points_per_s: float | None = None,
                 backlog_target_rtt_s: float | None = None,
                 backlog_queue_delay_s: float = 0.5) -> None:
        topics.check_gateway_id(gw)
        backlog_batch_size = batch_size if backlog_batch_size is None else backlog_batch_size
        if min(batch_size, backlog_batch_size, max_inflight) < 1 or ack_timeout_s <= 0:
            raise ValueError("batch sizes and max_inflight must be >= 1, ack_timeout_s > 0")
        self.gw = gw
        self.outbox = outbox
        self.host, self.port = host, port
        self.boot_id, self.version, self.bearer = boot_id, version, bearer
        self.birth = birth
        self.batch_size, self.max_inflight = batch_size, max_inflight
        self.ack_timeout_s, self.keepalive_s = ack_timeout_s, keepalive_s
        self.client_id = client_id or gw
        self.tls, self.username, self.password = tls, username, password
        self.state_interval_s = state_interval_s
        self.backoff_initial_s, self.backoff_max_s = backoff_initial_s, backoff_max_s
        self.on_command = on_command
        self.connected = False
        # Monotonic time since when IP has been down (None while connected): the narrowband
        # fallback takes over after a while. Down from the start until the first connect.
        self.down_since: float | None = time.monotonic()
        self.counters = UplinkCounters()
        self._t_state, self._t_birth, self._t_data = (topics.up(gw, n) for n in ("state", "birth", "data"))
        self._t_ack, self._t_cmd = topics.down(gw, "ack"), topics.down(gw, "cmd")
        self._inflight: dict[int, _InFlight] = {}
        # Seqs sent and not yet acked, across ack timeouts and reconnects (a late ack of an
        # earlier send is genuine); and the seqs acked, to tell a duplicate from a forgery.
        self._sent_unacked: Ranges = ()
        self._acked: Ranges = ()
        self._refused_logged = 0
        self._inflight_records = 0
        self._batch_ids = 0
        self._wake = asyncio.Event()
        self._backlog = 0
        self._foreign_logged: set[str] = set()
        self._down_logged = False
        # Grows while central stays silent so that a dead central does not cost the link a
        # full window every ack_timeout_s; any ack resets it.
        self._timeout_factor = 1
        # Slots only priority batches may take; backlog gets the rest, paced.
        self.reserve = max(1, max_inflight // 4)
        self.pacer = BacklogPacer(max_window=max(1, max_inflight - self.reserve),
                                  batch_size=backlog_batch_size,
                                  max_points_per_s=backlog_max_points_per_s,
                                  target_rtt_s=backlog_target_rtt_s, min_batch_size=batch_size,
                                  queue_delay_s=backlog_queue_delay_s)
        self._backlog_batches = 0

    def notify(self) -> None:
        """Wake the send loop (new records, a freed slot); cheap, callable any time on the loop."""
        self._wake.set()

    @property
    def in_flight(self) -> int:
        """Records sent and not yet acknowledged."""
        return self._inflight_records

    def _skip(self) -> Ranges:
        """The seqs in flight, as ranges for `Outbox.next_batch`."""
        return merge_ranges(r for fl in self._inflight.values() for r in fl.ranges)

    # --- connection ------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep connected and drain the outbox until cancelled."""
        remove_listener = self.outbox.add_append_listener(self.notify)
        backoff = self.backoff_initial_s
        try:
            while True:
                up_since: float | None = None
                try:
                    async with self._client() as client:
                        up_since = time.monotonic()
                        await self._session(client)
                except* aiomqtt.MqttError as group:
                    await self._went_down(group.exceptions[0])
                # Only a connection that held resets the back-off: a broker that accepts and
                # drops at once (ACL, a twin with our client id) must not be hammered.
                if up_since is not None and time.monotonic() - up_since >= _STABLE_S:
                    backoff = self.backoff_initial_s
                # Jittered so that a city of gateways does not reconnect in lockstep.
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, self.backoff_max_s)
        finally:
            remove_listener()
            self._drop_inflight()
            if self.connected:
                self.connected = False
                self.down_since = time.monotonic()
                with contextlib.suppress(OutboxError, asyncio.CancelledError):
                    await asyncio.shield(self.outbox.set_meta("uplink_state", "stopped"))

    def _client(self) -> aiomqtt.Client:
        will = aiomqtt.Will(topic=self._t_state, payload=encode(self._state(online=False)),
                            qos=1, retain=True)
        return _Client(self.host, self.port, identifier=self.client_id,
                              clean_session=False, will=will, keepalive=self.keepalive_s,
                              protocol=aiomqtt.ProtocolVersion.V311, tls_context=self.tls,
                              username=self.username, password=self.password,
                              timeout=max(self.ack_timeout_s, 5.0))

    def _state(self, *, online: bool) -> State:
        return State(online=online, boot_id=self.boot_id, version=self.version,
                     bearer=self.bearer, backlog=self._backlog, ts_ms=_now_ms(),
                     stream=self.outbox.stream)

    async def _session(self, client: aiomqtt.Client) -> None:
        try:
            await self._announce(client)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._receive_loop(client), name="uplink.receive")
                tg.create_task(self._send_loop(client), name="uplink.send")
                tg.create_task(self._state_loop(client), name="uplink.state")
        except asyncio.CancelledError:
            # A clean DISCONNECT suppresses the Will, so say "offline" ourselves.
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(self._t_state, encode(self._state(online=False)),
                                     qos=1, retain=True, timeout=1.0)
            raise

    async def _announce(self, client: aiomqtt.Client) -> None:
        # The previous connection's batches may be lost anywhere: send everything again.
        self._drop_inflight()
        await client.subscribe(self._t_ack, qos=1)
        await client.subscribe(self._t_cmd, qos=1)
        await self._refresh_backlog()
        await client.publish(self._t_state, encode(self._state(online=True)), qos=1, retain=True)
        birth = replace(self.birth, gw=self.gw, stream=self.outbox.stream,
                        boot_id=self.boot_id, version=self.version)
        await client.publish(self._t_birth, encode(birth), qos=1)
        self.connected = True
        self.down_since = None
        self.counters.connects += 1
        self._down_logged = False
        log.info("uplink_connected", host=self.host, port=self.port, backlog=self._backlog)
        await self._set_meta("uplink_state", "connected")
        await self._set_meta("uplink_since_ms", str(_now_ms()))

    async def _went_down(self, exc: BaseException) -> None:
        was_up = self.connected
        self.connected = False
        if was_up or self.down_since is None:
            self.down_since = time.monotonic()
        self._drop_inflight()
        if was_up or not self._down_logged:
            # Once per outage, not once per attempt.
            log.warning("uplink_disconnected", host=self.host, port=self.port, error=str(exc))
            self._down_logged = True
            await self._set_meta("uplink_state", "disconnected")
            await self._set_meta("uplink_since_ms", str(_now_ms()))
        else:
            log.debug("uplink_connect_failed", error=str(exc))

    async def _set_meta(self, key: str, value: str) -> None:
        try:
            await self.outbox.set_meta(key, value)
        except OutboxError as exc:
            log.warning("uplink_meta_failed", key=key, error=str(exc))

    async def _refresh_backlog(self) -> None:
        try:
            self._backlog = await self.outbox.backlog()
        except OutboxError as exc:
            log.warning("uplink_stats_failed", error=str(exc))

    # --- loops -----------------------------------------------------------------------------

    async def _receive_loop(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = bytes(message.payload) if isinstance(message.payload, (bytes, bytearray)) else b""
            if message.topic.matches(self._t_ack):
                await self._handle_ack(payload)
            elif message.topic.matches(self._t_cmd):
                await self._handle_command(payload)

    async def _handle_ack(self, payload: bytes) -> None:
        try:
            ack = decode(payload)
        except EnvelopeError as exc:
            ack = None
            log.warning("ack_malformed", error=str(exc))
        if not isinstance(ack, Ack):
            self.counters.acks_malformed += 1
            return
        if ack.stream != self.outbox.stream:
            self.counters.acks_foreign += 1
            if ack.stream not in self._foreign_logged:
                self._foreign_logged.add(ack.stream)
                log.warning("ack_foreign_stream", stream=ack.stream, ours=self.outbox.stream)
            return
        self.counters.acks += 1
        allowed = self._screen_ack(merge_ranges(ack.ranges))
        if not allowed:
            return
        try:
            self.counters.records_acked += await self.outbox.mark_delivered(allowed)
        except OutboxError as exc:
            # Not marked: the records go again after the timeout and central acks them again.
            log.warning("ack_mark_failed", error=str(exc))
            return
        self._sent_unacked = subtract_ranges(self._sent_unacked, allowed)
        self._acked = _bounded(merge_ranges((*self._acked, *allowed)))
        # Only a timely ack brings the timeout back down: late acks of batches that already
        # went again mean central is overloaded, and resending on the short timeout would
        # multiply its load.
        if self._forget_acked(allowed):
            self._timeout_factor = 1
        self.notify()

    def _screen_ack(self, ranges: Ranges) -> Ranges:
        """The part of an ack this uplink may act on: seqs it sent and has not seen acked.
        The rest is counted and ignored; a seq never sent is logged (a forged ack, §8)."""
        allowed = _intersect(ranges, self._sent_unacked)
        rest = subtract_ranges(ranges, allowed)
        if not rest:
            return allowed
        duplicate = count_in_ranges(_intersect(rest, self._acked))
        unsent = count_in_ranges(rest) - duplicate
        self.counters.ack_records_duplicate += duplicate
        if unsent:
            self.counters.acks_refused += 1
            self.counters.ack_records_unsent += unsent
            if self._refused_logged < 10:  # a flood must not flood the log too
                self._refused_logged += 1
                unsent_ranges = subtract_ranges(rest, self._acked)
                log.warning("ack_unsent_records", records=unsent,
                            first=unsent_ranges[0][0], last=unsent_ranges[-1][1],
                            acks_refused=self.counters.acks_refused)
        return allowed

    async def _handle_command(self, payload: bytes) -> None:
        self.counters.commands += 1
        if self.on_command is None:
            log.warning("command_ignored", reason="no handler", size=len(payload))
            return
        try:
            result = self.on_command(payload)
            if inspect.isawaitable(result):
                await result
        except Exception:  # a bad handler must not take the ack path down with it
            log.exception("command_handler_failed", size=len(payload))

    async def _send_loop(self, client: aiomqtt.Client) -> None:
        while True:
            self._expire_unacked()
            self._wake.clear()  # before reading, so an append during the read is not missed
            wait = self._next_expiry_in()
            try:
                if self._priority_slot_free():
                    records = await self.outbox.next_batch(
                        self.batch_size, skip=self._skip(), part="priority")
                    if records:
                        await self._publish(client, records, backlog=False)
                        continue
                if self._backlog_slot_free():
                    now = time.monotonic()
                    allowed = self.pacer.allowance(now)
                    if allowed:
                        records = await self.outbox.next_batch(
                            allowed, skip=self._skip(), part="backlog")
                        if records:
                            self.pacer.took(len(records), now)
                            await self._publish(client, records, backlog=True)
                            continue
                    else:
                        wait = min(wait, self.pacer.wait_s(now))
            except OutboxError as exc:
                log.warning("outbox_read_failed", error=str(exc))
                await asyncio.sleep(1.0)
            await self._idle(wait)

    def _priority_slot_free(self) -> bool:
        return (len(self._inflight) < self.max_inflight
                or len(self._inflight) - self._backlog_batches < self.reserve)

    def _backlog_slot_free(self) -> bool:
        return (self._backlog_batches < self.pacer.window
                and len(self._inflight) < self.max_inflight)

    async def _publish(self, client: aiomqtt.Client, records: list[Record], *,
                       backlog: bool) -> None:
        self._batch_ids += 1
        # In flight before the publish returns: the ack may beat our PUBACK.
        ranges = ranges_from_seqs(r.seq for r in records)
        self._inflight[self._batch_ids] = _InFlight(ranges, len(records), time.monotonic(),
                                                    backlog)
        self._sent_unacked = _bounded(merge_ranges((*self._sent_unacked, *ranges)))
        self._inflight_records += len(records)
        if backlog:
            self._backlog_batches += 1
            self.counters.backlog_batches_sent += 1
            self.counters.backlog_records_sent += len(records)
        batch = DataBatch(gw=self.gw, stream=self.outbox.stream, records=tuple(records),
                          sent_ms=_now_ms())
        await client.publish(self._t_data, encode(batch), qos=1)
        self.counters.batches_sent += 1
        self.counters.records_sent += len(records)

    async def _state_loop(self, client: aiomqtt.Client) -> None:
        while True:
            await asyncio.sleep(self.state_interval_s)
            await self._refresh_backlog()
            await client.publish(self._t_state, encode(self._state(online=True)), qos=1,
                                 retain=True)
            pacing = self.pacer.snapshot(time.monotonic()).to_jsonable()
            c = self.counters
            await self._set_meta("uplink_acks", json.dumps({
                "acks": c.acks, "acks_refused": c.acks_refused,
                "ack_records_unsent": c.ack_records_unsent,
                "ack_records_duplicate": c.ack_records_duplicate}))
            await self._set_meta("uplink_pacing", json.dumps(
                pacing | {"backlog_in_flight": self._backlog_batches,
                          "in_flight": len(self._inflight)}))

    async def _idle(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, min(0.5, timeout))):
                await self._wake.wait()

    # --- in-flight bookkeeping -------------------------------------------------------------

    def _forget_acked(self, ranges: Ranges) -> int:
        """Drop acknowledged seqs from the in-flight batches; returns how many batches the ack
        completed within the base `ack_timeout_s` of their sending (timely acks)."""
        acked = merge_ranges(ranges)
        completed = 0
        now = time.monotonic()
        for bid, fl in list(self._inflight.items()):
            left = subtract_ranges(fl.ranges, acked)
            if left != fl.ranges:
                n = count_in_ranges(left)
                self._inflight_records -= fl.count - n
                fl.ranges, fl.count = left, n
                if not left:
                    del self._inflight[bid]
                    completed += now - fl.sent_at <= self.ack_timeout_s
                    if fl.backlog:
                        self._backlog_batches -= 1
                        self.pacer.on_ack(now - fl.sent_at, now)
        return completed

    def _ack_timeout(self) -> float:
        return self.ack_timeout_s * self._timeout_factor

    def _expire_unacked(self) -> None:
        deadline = time.monotonic() - self._ack_timeout()
        expired = [bid for bid, fl in self._inflight.items() if fl.sent_at <= deadline]
        for bid in expired:
            fl = self._inflight.pop(bid)
            self._inflight_records -= fl.count
            self.counters.batches_resent += 1
            if fl.backlog:
                self._backlog_batches -= 1
                self.pacer.on_timeout()
            log.info("batch_ack_timeout", records=fl.count, first=fl.ranges[0][0],
                     timeout_s=self._ack_timeout())
        if expired:
            self._timeout_factor = min(self._timeout_factor * 2, _MAX_TIMEOUT_FACTOR)

    def _next_expiry_in(self) -> float:
        if not self._inflight:
            return self._ack_timeout()
        oldest = min(fl.sent_at for fl in self._inflight.values())
        return oldest + self._ack_timeout() - time.monotonic()

    def _drop_inflight(self) -> None:
        self._timeout_factor = 1
        self._inflight.clear()
        self._inflight_records = 0
        self._backlog_batches = 0
        self.pacer.reset()


def _intersect(a: Ranges, b: Ranges) -> Ranges:
    return subtract_ranges(a, subtract_ranges(a, b))


def _bounded(ranges: Ranges) -> Ranges:
    return ranges[-_MAX_RANGES:] if len(ranges) > _MAX_RANGES else ranges


__all__ = ["CommandHandler", "Uplink", "UplinkCounters", "UplinkError"]
