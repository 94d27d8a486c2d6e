"""The MQTT uplink: drains the outbox to central and marks records delivered on `down/ack`.

DESIGN.md §4: a record is delivered only when central's `down/ack` names it; the broker's
PUBACK means nothing. Unacknowledged batches go again after `ack_timeout_s` and after every
reconnect (all in-flight state is dropped on disconnect). A batch is "re-sent" by forgetting
that it is in flight: its undelivered records come out of `Outbox.next_batch` again, in lane
order and with fresh backlog flags, and central deduplicates on `(gw, stream, seq)`. While
no timely ack arrives, the timeout doubles after each expiry (up to 8x), so a silent or
overloaded central does not cost a narrow link a full window every `ack_timeout_s`; the next
ack of a batch still in flight resets it.

Central's return: the uplink also reads central's retained state (`topics.CENTRAL_STATE`),
which central publishes right after it has subscribed. A broker restarted without persistence
forgets central's subscription; an agent that reconnects first publishes into a broker with no
subscriber, and those batches are dropped. So when central's state turns online while we are
connected (a live online message after offline or none, or from another central boot), every
batch in flight is in doubt: it goes again as soon as the ack of a newer batch shows central
did not get it (central acks a gateway's batches in order), or after a short grace with
nothing newer in flight, instead of after an ack timeout; a batch that reached central between
its subscription and its online state is acked in that time and not sent twice. A retained
state delivered on our own subscribe says nothing new: everything in flight was sent after that
subscribe.

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
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import aiomqtt
import msgspec
import structlog

from edge_agent import EdgeError
from edge_agent.config.site import OutboxConfig
from edge_agent.outbox.lanes import records_of
from edge_agent.outbox.store import Outbox, OutboxError
from edge_agent.uplink.ledger import AckLedger, UplinkCounters
from edge_agent.uplink.mqtt_config import MqttConfig, TlsFiles
from edge_agent.uplink.pacing import BacklogPacer
from protocols import topics
from protocols.columnar import COLUMNAR_VERSION, Columns
from protocols.envelope import (
    VERSION,
    VERSIONS,
    Ack,
    Birth,
    DataBatch,
    EnvelopeError,
    Record,
    State,
    decode,
    encode,
    encode_columns,
    merge_ranges,
    ranges_from_seqs,
)
from runtime.clock import now_ms
from runtime.mqtt import Endpoint, MqttSession
from runtime.mqtt_refusal import Refusal
from runtime.tasks import Backoff

log = structlog.get_logger(__name__)

CommandHandler = Callable[[bytes], Awaitable[None] | None]

_STABLE_S = 10.0  # a connection up this long counts as healthy (resets the back-off)
# After central's online state, how long a batch still in flight may wait for its ack when no
# newer batch is in flight to tell whether central had it (`AckLedger.suspect_all`).
_CENTRAL_ONLINE_GRACE_S = 0.5
# The outbox meta key of the seqs sent and not yet acked (`AckLedger.sent_unacked`), and its form.
_SENT_UNACKED = "uplink_sent_unacked"
_RANGES = msgspec.json.Decoder(list[tuple[int, int]])


class UplinkError(EdgeError):
    """Base of the uplink's own errors."""


@dataclass(frozen=True, slots=True)
class BrokerRefusal:
    """Why a broker refused the uplink's last attempt: `cause` (our certificate revoked or
    untrusted, a CONNACK refusal, another TLS refusal) and what the refusal said."""

    cause: Refusal
    error: str

    def to_jsonable(self) -> dict[str, str]:
        """As `edge-agent status` shows it and the outbox keeps it (`uplink_refused`)."""
        return {"cause": str(self.cause), "error": self.error}


class Uplink:
    """One MQTT connection to central, kept up for as long as `run()` runs.

    Example::

        uplink = Uplink(gw="gw-1", outbox=ob, birth=birth, mqtt=config.mqtt,
                        backlog=config.outbox, boot_id=boot, version=__version__)
        tg.create_task(uplink.run(), name="uplink.mqtt")
    """

    def __init__(self, *, gw: str, outbox: Outbox, birth: Birth, mqtt: MqttConfig,
                 boot_id: str, version: str, backlog: OutboxConfig | None = None,
                 on_command: CommandHandler | None = None, bearer: str = "ip",
                 state_interval_s: float = 10.0) -> None:
        """`mqtt` is the `[mqtt]` section (broker, TLS, credentials, batches, back-off),
        `backlog` the `[outbox]` one (the backlog drain's ceiling and queueing; None: no
        ceiling, as in tests and benches)."""
        topics.check_gateway_id(gw)
        self.gw = gw
        self.outbox = outbox
        self.mqtt = mqtt
        self.host, self.port = mqtt.host, mqtt.port
        self.boot_id, self.version, self.bearer = boot_id, version, bearer
        self.birth = birth
        self.batch_size, self.max_inflight = mqtt.batch_size, mqtt.max_inflight
        self.ack_timeout_s = mqtt.ack_timeout_s
        self.state_interval_s = state_interval_s
        self.on_command = on_command
        # --- mqtt tls (DESIGN.md §8): the gateway's certificate, or a password. The context
        # is built from the files at each connect: a renewed certificate needs no restart.
        self.tls = TlsFiles(mqtt.tls) if mqtt.tls is not None else None
        self.session = MqttSession(
            Endpoint(mqtt.host, mqtt.port, client_id=mqtt.client_id or gw, clean_session=False,
                     keepalive_s=mqtt.keepalive_s, timeout_s=max(mqtt.ack_timeout_s, 5.0),
                     username=mqtt.username, password=mqtt.password,
                     tls=None if self.tls is None else self.tls.context),
            name="uplink", will=self._will,
            backoff=Backoff(first_s=mqtt.reconnect_min_s,
                            max_s=max(mqtt.reconnect_min_s, mqtt.reconnect_max_s),
                            healthy_after_s=_STABLE_S),
            link_retry_max_s=mqtt.reconnect_link_max_s)
        self.connected = False
        # Monotonic time since when IP has been down (None while connected): the narrowband
        # fallback takes over after a while. Down from the start until the first connect.
        self.down_since: float | None = time.monotonic()
        self.counters = UplinkCounters()
        # `refused` as last kept in the outbox (`uplink_refused`); None: not yet in this run, so a
        # previous run's is replaced at the first connect or failure.
        self._saved_refused: str | None = None
        self._t_state, self._t_birth, self._t_data = (
            topics.up(gw, n) for n in ("state", "birth", "data"))
        self._t_ack, self._t_cmd = topics.down(gw, "ack"), topics.down(gw, "cmd")
        self._batch_ids = 0
        self._wake = asyncio.Event()
        self._backlog = 0
        self._foreign_logged: set[str] = set()
        # Central's last state heard on this connection (None: none yet), read-only outside.
        self.central_state: State | None = None
        # Slots only priority batches may take; backlog gets the rest, paced.
        self.reserve = max(1, self.max_inflight // 4)
        self.pacer = BacklogPacer(max_window=max(1, self.max_inflight - self.reserve),
                                  batch_size=mqtt.backlog_batch_size,
                                  max_points_per_s=None if backlog is None
                                  else backlog.backlog_max_points_per_s,
                                  min_batch_size=mqtt.batch_size,
                                  queue_delay_s=0.5 if backlog is None
                                  else backlog.backlog_queue_delay_s)
        self.ledger = AckLedger(mqtt.ack_timeout_s, self.pacer, self.counters)
        self._saved_sent: tuple[tuple[int, int], ...] = ()  # as last kept in the outbox

    def notify(self) -> None:
        """Wake the send loop (new records, a freed slot); cheap, callable any time on the loop."""
        self._wake.set()

    @property
    def refused(self) -> BrokerRefusal | None:
        """What refused the last attempt when a broker did, as the session has it now; None
        while connected or when the path is down."""
        cause, error = self.session.refused, self.session.refusal
        return None if cause is None else BrokerRefusal(cause, str(error))

    @property
    def in_flight(self) -> int:
        """Records sent and not yet acknowledged."""
        return self.ledger.records

    # --- connection ------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep connected and drain the outbox until cancelled."""
        await self._restore_sent()
        remove_listener = self.outbox.add_append_listener(self.notify)
        try:
            await self.session.run(self._session, on_down=self._went_down)
        finally:
            remove_listener()
            self.ledger.drop()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._save_sent())
            if self.connected:
                self.connected = False
                self.down_since = time.monotonic()
                with contextlib.suppress(OutboxError, asyncio.CancelledError):
                    await asyncio.shield(self.outbox.set_meta("uplink_state", "stopped"))

    def _will(self) -> aiomqtt.Will:
        return aiomqtt.Will(topic=self._t_state, payload=encode(self._state(online=False)),
                            qos=1, retain=True)

    def _state(self, *, online: bool) -> State:
        return State(online=online, boot_id=self.boot_id, version=self.version,
                     bearer=self.bearer, backlog=self._backlog, ts_ms=now_ms(),
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
        self.ledger.drop()
        self.central_state = None
        await client.subscribe(self._t_ack, qos=1)
        await client.subscribe(self._t_cmd, qos=1)
        # Before any data goes out: central's coming online afterwards reaches us live.
        await client.subscribe(topics.CENTRAL_STATE, qos=1)
        await self._refresh_backlog()
        await client.publish(self._t_state, encode(self._state(online=True)), qos=1, retain=True)
        birth = replace(self.birth, gw=self.gw, stream=self.outbox.stream,
                        boot_id=self.boot_id, version=self.version)
        await client.publish(self._t_birth, encode(birth), qos=1)
        self.connected = True
        self.down_since = None
        self.counters.connects += 1
        log.info("uplink_connected", host=self.host, port=self.port, backlog=self._backlog)
        await self._set_meta("uplink_state", "connected")
        await self._set_meta("uplink_since_ms", str(now_ms()))
        await self._save_refused()

    async def _went_down(self, exc: aiomqtt.MqttError, first: bool) -> None:
        """The session logged it (once per outage) and counted the refusal, if a broker
        refused; keep the state the CLI and the narrowband fallback read."""
        was_up = self.connected
        self.connected = False
        if was_up or self.down_since is None:
            self.down_since = time.monotonic()
        self.ledger.drop()
        if first:
            await self._set_meta("uplink_state", "disconnected")
            await self._set_meta("uplink_since_ms", str(now_ms()))
        await self._save_refused()

    async def _save_refused(self) -> None:
        """Keep why a broker refused us in the outbox for `edge-agent status` (when it
        changed: a refused attempt every back-off writes nothing new)."""
        refused = "" if (now := self.refused) is None else json.dumps(now.to_jsonable())
        if refused != self._saved_refused:
            await self._set_meta("uplink_refused", refused)
            self._saved_refused = refused

    async def _set_meta(self, key: str, value: str) -> None:
        try:
            await self.outbox.set_meta(key, value)
        except OutboxError as exc:
            log.warning("uplink_meta_failed", key=key, error=str(exc))

    async def _restore_sent(self) -> None:
        """What the previous uplink on this outbox sent and saw no ack for (a config reload
        or a restart came between): its ack may still come, and is genuine (`AckLedger`)."""
        try:
            text = await self.outbox.get_meta(_SENT_UNACKED)
        except OutboxError as exc:
            log.warning("uplink_meta_failed", key=_SENT_UNACKED, error=str(exc))
            return
        if text is None:
            return
        try:
            ranges = _RANGES.decode(text)
        except msgspec.DecodeError as exc:  # malformed JSON, or not a list of [first, last]
            log.warning("uplink_sent_unacked_malformed", error=str(exc))
            return
        self.ledger.restore(tuple((a, b) for a, b in ranges if 0 < a <= b))
        self._saved_sent = self.ledger.sent_unacked

    async def _save_sent(self) -> None:
        """Keep the seqs sent and not acked in the outbox (when they changed)."""
        sent = self.ledger.sent_unacked
        if sent != self._saved_sent:
            await self._set_meta(_SENT_UNACKED, json.dumps(sent))
            self._saved_sent = sent

    async def _refresh_backlog(self) -> None:
        try:
            self._backlog = await self.outbox.backlog()
        except OutboxError as exc:
            log.warning("uplink_stats_failed", error=str(exc))

    # --- loops -----------------------------------------------------------------------------

    async def _receive_loop(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = (bytes(message.payload)
                       if isinstance(message.payload, (bytes, bytearray)) else b"")
            if message.topic.matches(self._t_ack):
                await self._handle_ack(payload)
            elif message.topic.matches(self._t_cmd):
                await self._handle_command(payload)
            elif message.topic.matches(topics.CENTRAL_STATE):
                self._handle_central_state(payload, retained=bool(message.retain))

    def _handle_central_state(self, payload: bytes, *, retained: bool) -> None:
        """Central's state: when it turns online while we are connected, resend what is in
        flight now (see the module's docstring)."""
        try:
            state = decode(payload)
        except EnvelopeError as exc:
            log.warning("central_state_malformed", error=str(exc))
            return
        if not isinstance(state, State):
            log.warning("central_state_malformed", error=f"a {type(state).__name__} message")
            return
        before, self.central_state = self.central_state, state
        if not state.online or retained or (
                before is not None and before.online and before.boot_id == state.boot_id):
            return
        batches = self.ledger.suspect_all(_CENTRAL_ONLINE_GRACE_S)
        self.counters.central_online += 1
        log.info("central_online", central_boot_id=state.boot_id, batches_in_doubt=batches)
        self.notify()

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
        allowed = self.ledger.screen(merge_ranges(ack.ranges))
        if not allowed:
            return
        try:
            self.counters.records_acked += await self.outbox.mark_delivered(allowed)
        except OutboxError as exc:
            # Not marked: the records go again after the timeout and central acks them again.
            log.warning("ack_mark_failed", error=str(exc))
            return
        self.ledger.acked(allowed)
        self.notify()

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
            self.ledger.expire()
            self._wake.clear()  # before reading, so an append during the read is not missed
            wait = self.ledger.next_expiry_in()
            try:
                if self._priority_slot_free():
                    records = await self.outbox.next_batch(
                        self.batch_size, skip=self.ledger.skip(), part="priority")
                    if records:
                        await self._publish(client, records, backlog=False)
                        continue
                if self._backlog_slot_free():
                    now = time.monotonic()
                    allowed = self.pacer.allowance(now)
                    if allowed:
                        cols = await self.outbox.next_backlog(allowed, skip=self.ledger.skip())
                        if len(cols):
                            self.pacer.took(len(cols), now)
                            await self._publish(client, cols, backlog=True)
                            continue
                    else:
                        wait = min(wait, self.pacer.wait_s(now))
            except OutboxError as exc:
                log.warning("outbox_read_failed", error=str(exc))
                await asyncio.sleep(1.0)
            await self._idle(wait)

    def _priority_slot_free(self) -> bool:
        batches = len(self.ledger.batches)
        return batches < self.max_inflight or batches - self.ledger.backlog_batches < self.reserve

    def _backlog_slot_free(self) -> bool:
        return (self.ledger.backlog_batches < self.pacer.window
                and len(self.ledger.batches) < self.max_inflight)

    async def _publish(self, client: aiomqtt.Client, batch: list[Record] | Columns, *,
                       backlog: bool) -> None:
        """Send one batch: priority records, or backlog columns (`Outbox.next_backlog`)."""
        self._batch_ids += 1
        n = len(batch)
        seqs = batch.seqs if isinstance(batch, Columns) else [r.seq for r in batch]
        # In flight before the publish returns: the ack may beat our PUBACK.
        self.ledger.sent(self._batch_ids, ranges_from_seqs(seqs), n, backlog=backlog)
        if backlog:
            self.counters.backlog_batches_sent += 1
            self.counters.backlog_records_sent += n
        payload = self._payload(batch)
        await client.publish(self._t_data, payload, qos=1)
        self.counters.batches_sent += 1
        self.counters.records_sent += n
        self.counters.bytes_sent += len(payload)
        if backlog:
            self.counters.backlog_bytes_sent += len(payload)

    def _payload(self, batch: list[Record] | Columns) -> bytes:
        version = self.envelope_version()
        if isinstance(batch, Columns):
            if version == COLUMNAR_VERSION:
                return encode_columns(self.gw, self.outbox.stream, now_ms(), batch)
            batch = records_of(batch)
        return encode(DataBatch(gw=self.gw, stream=self.outbox.stream, records=tuple(batch),
                                sent_ms=now_ms()), version=version)

    def envelope_version(self) -> int:
        """The data batch's envelope version: 2 (columnar, a third of the bytes) once central's
        state on this connection says it decodes 2, else 1, which every central decodes. So
        a mixed fleet works: a new agent talks 1 to an old central, an old agent 1 to a new
        one; and the first batches after a connect, sent before central's retained state has
        come, go as 1."""
        state = self.central_state
        return VERSIONS[-1] if state is not None and state.envelope >= VERSIONS[-1] else VERSION

    async def _state_loop(self, client: aiomqtt.Client) -> None:
        while True:
            await asyncio.sleep(self.state_interval_s)
            await self._refresh_backlog()
            await client.publish(self._t_state, encode(self._state(online=True)), qos=1,
                                 retain=True)
            await self._save_sent()  # a kill or a power cut loses at most this interval's
            pacing = self.pacer.snapshot(time.monotonic()).to_jsonable()
            c = self.counters
            await self._set_meta("uplink_acks", json.dumps({
                "acks": c.acks, "acks_refused": c.acks_refused,
                "ack_records_unsent": c.ack_records_unsent,
                "ack_records_duplicate": c.ack_records_duplicate}))
            await self._set_meta("uplink_wire", json.dumps({
                "records_sent": c.records_sent, "bytes_sent": c.bytes_sent,
                "backlog_records_sent": c.backlog_records_sent,
                "backlog_bytes_sent": c.backlog_bytes_sent}))
            await self._set_meta("uplink_pacing", json.dumps(
                pacing | {"backlog_in_flight": self.ledger.backlog_batches,
                          "in_flight": len(self.ledger.batches)}))

    async def _idle(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, min(0.5, timeout))):
                await self._wake.wait()


__all__ = ["BrokerRefusal", "CommandHandler", "Uplink", "UplinkCounters", "UplinkError"]
