"""MQTT ingest (DESIGN.md §4.3, §9): subscribe to every gateway's `up/`, store, then ack.

The invariant: a `down/ack` names only seqs whose transaction has committed. The messages
that come while one group is written (up to `ingest_drain_max`, `central.ingest.gather`) are
written together in the next transaction, then each batch is acked — duplicates too, since
central holds them. Writes start at most every
`STORE_INTERVAL_MIN_S`, so that under load many batches share one commit. On disconnect (the
broker may be SIGKILLed at any time) the session reconnects with capped, jittered back-off
(`runtime.mqtt`), and subscribes again before it says central is online.

Bad input never stops the loop (README "Hostile input at central"). Every message passes the
envelope's validation layer (`protocols.limits`). A message refused whole (not CBOR, a field
out of range or too long, too many records, a topic or gateway that does not match) is counted
in `messages_rejected_total{reason}` and dropped, not acked: there is no sound seq to ack.
A record refused inside a good batch is counted in `records_rejected_total{reason}`, recorded
as reported lost in the delivery view, and acked with the good records beside it, which are
stored: so a poisoned record is not resent for ever and good data is not held back. Both are
logged once per gateway and reason per minute (`central.ingest.rejects.RejectLog`). A write
the database refuses for a value in it is retried in halves until the bad record is alone
(`write_isolating`); any other storage error leaves that batch unacked (the gateway resends).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Protocol

import aiomqtt
import paho.mqtt.client as paho
import structlog

from central import CentralError, __version__
from central.config.settings import Settings
from central.health.metrics import Metrics
from central.ingest import broker
from central.ingest.gather import Gathering, until
from central.ingest.rejects import RejectLog, count_bad_attrs, write_isolating
from central.storage import DatabaseWriteError, Storage, StorageError, UnstorableValueError
from protocols import topics
from protocols.envelope import (
    VERSIONS,
    Ack,
    Birth,
    DataBatch,
    EnvelopeError,
    Message,
    RejectedRecord,
    State,
    decode,
    encode,
    ranges_from_seqs,
)
from protocols.errors import DetailedError
from runtime.mqtt import MqttSession
from runtime.tasks import Backoff

log = structlog.get_logger(__name__)

BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 10.0
_EXPECTED = {"data": DataBatch, "state": State, "birth": Birth}
_SEQ = attrgetter("seq")
# The shortest time between the starts of two group writes. Each write transaction has a fixed
# cost (BEGIN, COMMIT and its fsync, the hand-over to the database thread: about 0.6 ms of CPU
# on SQLite, measured by writing the same batches in groups of 5 and of 20), so at a high rate
# central wrote ever smaller groups as fast as it could and spent that cost ever more often
# (4-6 batches per commit at 400 batches/s); waiting out this interval lets the batches
# that come meanwhile share the commit (at most `ingest_drain_max`). A batch waits at most this
# long for it; a lone batch after a quiet spell does not wait, nor does a full group (above
# `ingest_drain_max` / this interval, 2,500 batches/s at the defaults, groups are full).
STORE_INTERVAL_MIN_S = 0.02


class IngestError(CentralError):
    """Base of ingest's own errors about a message; `reason` is its counter label."""

    reason = "rejected"


class GatewayMismatchError(IngestError, DetailedError):
    reason = "gateway_mismatch"

    template = "topic names gateway {topic_gw!r}, payload names {payload_gw!r}"
    topic_gw: str
    payload_gw: str


class MessageTypeMismatchError(IngestError, DetailedError):
    reason = "type_mismatch"

    template = "topic up/{topic_name} carries a {got} message"
    topic_name: str
    got: str


@dataclass(frozen=True, slots=True)
class Inbound:
    """A message that passed every check, with the gateway its topic names."""

    gw: str
    msg: Message
    retained: bool


def check_message(topic: str, payload: bytes, retained: bool = False) -> Inbound:
    """Validate one MQTT message against the contract; raises `TopicError`, `EnvelopeError`
    or an `IngestError` subclass."""
    t = topics.parse(topic)
    if t.direction != "up":
        raise topics.TopicError(topic, "central ingests only up/ topics")
    msg = decode(payload)
    if not isinstance(msg, _EXPECTED[t.name]):
        raise MessageTypeMismatchError(t.name, type(msg).__name__)
    if isinstance(msg, (DataBatch, Birth)) and msg.gw != t.gw:
        raise GatewayMismatchError(t.gw, msg.gw)
    return Inbound(gw=t.gw, msg=msg, retained=retained)


def _payload_bytes(payload: object) -> bytes:
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode()
    return b""


class Ingest:
    """The MQTT ingest worker. `run()` is the `ingest_loop`; it returns only when cancelled."""

    def __init__(self, settings: Settings, storage: Storage, metrics: Metrics, *,
                 command_hooks: CommandHooks | None = None,
                 batch_hooks: Sequence[BatchHook] = (), gate: Gate | None = None) -> None:
        """`command_hooks`: the command service (births and command results, §6);
        `batch_hooks`: further consumers of committed batches (叫应, central.callresp);
        `gate`: drops (and counts) the messages of retired gateways (central.identity.retire)."""
        self.settings = settings
        self.storage = storage
        self.metrics = metrics
        self.command_hooks = command_hooks
        self.batch_hooks = tuple(batch_hooks)
        self.gate = gate
        self.boot_id = uuid.uuid4().hex[:12]
        self._connected = asyncio.Event()
        self.reject_log = RejectLog()
        s = settings
        self.session = MqttSession(
            # One central: a persistent session, so the broker queues QoS 1 messages while it
            # is away. Shared workers: a clean session, because Mosquitto keeps a dead member's
            # persistent session in the $share group and parks its share of the messages
            # there; the survivors then get everything and the edge resends what was in flight.
            broker.endpoint(s, client_id=s.mqtt_client_id, clean_session=s.mqtt_shared),
            name="ingest", backoff=Backoff(BACKOFF_FIRST_S, BACKOFF_MAX_S, healthy_after_s=0),
            will=lambda: aiomqtt.Will(topics.CENTRAL_STATE, self._state(False), qos=1,
                                      retain=True))

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            await self._connected.wait()

    def _state(self, online: bool) -> bytes:
        # `envelope`: the gateways may send data batches as version 2 (columnar).
        return encode(State(online=online, boot_id=self.boot_id, version=__version__,
                            bearer="central", backlog=0, ts_ms=time.time_ns() // 1_000_000,
                            envelope=VERSIONS[-1]))

    async def run(self) -> None:
        """Connect, consume, and reconnect with capped, jittered back-off, for ever."""
        await self.session.run(self._serve, on_down=self._went_down)

    async def _went_down(self, exc: aiomqtt.MqttError, first: bool) -> None:
        """Count an attempt the broker refused (central's own certificate revoked or
        untrusted, a CONNACK refusal); the session logged it."""
        if (cause := self.session.refused) is not None:
            self.metrics.mqtt_connect_refusals[cause] += 1

    async def _serve(self, client: aiomqtt.Client) -> None:
        sub = topics.SHARED_UP if self.settings.mqtt_shared else topics.UP_WILDCARD
        try:
            # Subscribed before central says it is online (retained): a gateway that acts on
            # that state publishes into a subscription that is already there.
            await client.subscribe(sub, qos=1)
            await client.publish(topics.CENTRAL_STATE, self._state(True), qos=1, retain=True)
            self._connected.set()  # only now: "connected" means "receiving"
            self.metrics.mqtt_connected = True
            self.metrics.mqtt_connects += 1
            log.info("ingest_subscribed", subscription=sub)
            await self._consume(client)
        except asyncio.CancelledError:
            await self._say_offline(client)
            raise
        finally:
            self._connected.clear()
            self.metrics.mqtt_connected = False

    async def _say_offline(self, client: aiomqtt.Client) -> None:
        """On a clean stop the broker does not send the Will, so say offline ourselves."""
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(2):
                await client.publish(topics.CENTRAL_STATE, self._state(False), qos=1,
                                     retain=True)
        log.info("mqtt_stopped")

    async def _consume(self, client: aiomqtt.Client) -> None:
        """Gather group N+1 while group N is written and acked: a pipeline two deep, so at
        most one group is being written while the next gathers every message that comes
        meanwhile, each decoded as it comes (`central.ingest.gather`). Groups are stored in
        arrival order (alarm ordering relies on it), each acked only after its own commit,
        by `_store` itself (its acks do not wait for the next group). A store starts no
        sooner than `STORE_INTERVAL_MIN_S` after the one before; what came meanwhile joins
        the group (see `STORE_INTERVAL_MIN_S`)."""
        gathering: Gathering[Inbound, DataBatch] = Gathering(
            self.decode_group, self.settings.ingest_drain_max)
        receiver = asyncio.create_task(gathering.receive(client.messages),
                                       name="ingest.receive")
        loop = asyncio.get_running_loop()
        storing: asyncio.Task[None] | None = None
        next_store = 0.0  # loop time before which no store starts
        try:
            while True:
                if storing is not None:
                    await until(storing, receiver)  # raises what the store raised
                await until(gathering.ready(), receiver)
                if (wait := next_store - loop.time()) > 0:
                    await until(gathering.full_or_after(wait), receiver)
                group = gathering.take()
                if not (group.infos or group.batches):
                    continue  # only refused messages: nothing to write
                next_store = loop.time() + STORE_INTERVAL_MIN_S
                storing = asyncio.create_task(self._store(client, group.infos, group.batches),
                                              name="ingest.store")
        finally:
            # Cancelled (shutdown) or disconnected: a gathered group not yet written is
            # dropped, one being written may commit without its acks; the edge resends what
            # is unacked. Never an ack without its commit: `_store` acks only after.
            receiver.cancel()
            writing = storing is not None and not storing.done()
            if storing is not None:
                storing.cancel()
            await asyncio.wait({receiver} | ({storing} if storing is not None else set()))
            if writing:
                log.info("ingest_store_stopped", committed_unacked_possible=True)
            if storing is not None and not storing.cancelled():
                storing.exception()  # already raised above, or secondary to what is raised
            if not receiver.cancelled():
                receiver.exception()  # likewise

    def decode_group(self, group: list[aiomqtt.Message]) -> tuple[list[Inbound], list[DataBatch]]:
        """Check every message of a group: the state and birth messages, and the data batches
        with records (or refused records), each in arrival order. Bad ones are counted and
        logged."""
        infos: list[Inbound] = []
        batches: list[DataBatch] = []
        for m in group:
            topic = m.topic.value
            try:
                inbound = check_message(topic, _payload_bytes(m.payload), bool(m.retain))
            except (topics.TopicError, EnvelopeError, IngestError) as exc:
                self._message_rejected(topic, exc, bool(m.retain))
                continue
            msg = inbound.msg
            if isinstance(msg, DataBatch):
                count_bad_attrs(msg, self.metrics, self.reject_log)
                if msg.rejected:
                    self._records_rejected(msg, msg.rejected)
                if msg.records or msg.rejected:
                    batches.append(msg)
            else:
                infos.append(inbound)
        return infos, batches

    def _message_rejected(self, topic: str, exc: Exception, retained: bool) -> None:
        cls = type(exc).__name__
        reason = "bad_topic" if isinstance(exc, topics.TopicError) else str(
            getattr(exc, "reason", "rejected"))
        self.metrics.count_error(cls)
        self.metrics.messages_rejected[reason] += 1
        parts = topic.split("/")
        gw = parts[2][:64] if len(parts) > 2 else "-"
        self.reject_log("message_rejected", gw, reason, topic=topic[:200], error_class=cls,
                        field=getattr(exc, "field", None), error=str(exc)[:300],
                        retained=retained)

    def _records_rejected(self, batch: DataBatch, rejected: tuple[RejectedRecord, ...]) -> None:
        by_reason: dict[str, list[RejectedRecord]] = {}
        for rj in rejected:
            by_reason.setdefault(str(rj.error.reason), []).append(rj)
        for reason, items in by_reason.items():
            self.metrics.records_rejected[reason] += len(items)
            first = items[0]
            self.reject_log("records_rejected", batch.gw, reason, stream=batch.stream[:64],
                            records=len(items), first_seq=first.seq,
                            field=getattr(first.error, "field", None),
                            error=str(first.error)[:300])

    async def _store(self, client: aiomqtt.Client, infos: list[Inbound],
                     batches: list[DataBatch]) -> None:
        """Write one decoded group, then ack what it committed."""
        for b in await self.store_group(infos, batches):
            self._ack(client, b)

    async def store_group(self, infos: list[Inbound],
                          batches: list[DataBatch]) -> list[DataBatch]:
        """Write one decoded group (its states and births first, as they came); returns the
        batches that may now be acked. Raises nothing for bad input or a failed write."""
        if self.gate is not None:  # a retired gateway's: refused, counted, not acked
            infos, batches = await self.gate.admit(infos, batches)
        if len(infos) > 1:
            try:
                # One transaction for them all: a fleet (re)connecting at once sends thousands.
                await self.storage.record_gateway_infos(
                    [(i.gw, i.msg, not i.retained) for i in infos
                     if isinstance(i.msg, (State, Birth))])
            except StorageError:
                await self._store_infos(infos)  # one by one: only a bad one is lost
            else:
                for inbound in infos:
                    self._info_stored(inbound)
        else:
            await self._store_infos(infos)
        return await self._write(batches) if batches else []

    async def _store_infos(self, infos: list[Inbound]) -> None:
        for inbound in infos:
            msg = inbound.msg
            try:
                if isinstance(msg, State):
                    await self.storage.record_state(inbound.gw, msg, seen=not inbound.retained)
                elif isinstance(msg, Birth):
                    await self.storage.record_birth(inbound.gw, msg)
                self._info_stored(inbound)
            except StorageError as exc:  # a state or birth only; the loop goes on
                self.metrics.write_failures += 1
                self.reject_log("gateway_info_write_failed", inbound.gw,
                                "unstorable" if isinstance(exc, UnstorableValueError)
                                else "write_failed", error=str(exc)[:300])

    def _info_stored(self, inbound: Inbound) -> None:
        if isinstance(inbound.msg, State):
            self.metrics.states += 1
        elif isinstance(inbound.msg, Birth):
            self.metrics.births += 1
            if self.command_hooks is not None:  # commands wiring (§6)
                self.command_hooks.gateway_up(inbound.gw)

    async def _write(self, batches: list[DataBatch]) -> list[DataBatch]:
        started = time.monotonic()  # batch latency (metrics): the write transaction(s)
        try:
            results = await self.storage.write_batches(batches)
            written = batches
        except DatabaseWriteError as exc:
            # One poisoned batch must not hold back the good ones beside it: retry alone.
            self.metrics.write_failures += 1
            log.error("batch_group_write_failed", batches=len(batches), error=str(exc))
            written, results = [], []
            for b in batches:
                try:
                    try:
                        results.extend(await self.storage.write_batches([b]))
                    except UnstorableValueError:
                        # A value the validation let through: store the rest, refuse it.
                        result, refused = await write_isolating(self.storage, b)
                        results.append(result)
                        if refused:
                            self._records_rejected(b, refused)
                    written.append(b)
                except DatabaseWriteError as exc1:
                    self.metrics.write_failures += 1
                    log.error("batch_write_failed", gw=b.gw, stream=b.stream, error=str(exc1))
        # Committed: from here on the acks may go out.
        self.metrics.observe_write(time.monotonic() - started)
        self.metrics.commits += 1 if written is batches else len(written)
        for _b, res in zip(written, results, strict=True):
            self.metrics.batches += 1
            self.metrics.records_inserted += res.inserted
            self.metrics.records_duplicate += res.duplicates
            self.metrics.records_clock_suspect += res.clock_suspect
            self.metrics.records_time_corrected += res.corrected
            self.metrics.records_merged += res.merged
        return await self._apply_command_results(written)  # commands wiring (§6)

    def _ack(self, client: aiomqtt.Client, batch: DataBatch) -> None:
        """Queue the batch's ack (QoS 1) on the connection without waiting for its PUBACK.

        Awaiting each PUBACK cost a task, a timer and a pending-call entry per batch (and
        aiomqtt's "pending publish calls" warning at every ack past ten), a fifth of central's
        CPU with thousands of gateways; a PUBACK tells central nothing it acts on. An ack
        lost with the connection is made again: the gateway resends the batch after its ack
        timeout, storage finds it held, and it is acked then."""
        # The refused records too (those with a seq the edge could have made): central has
        # counted them and will never store them, so the edge must not send them again.
        seqs = batch.columns.seqs if batch.columns is not None else list(
            map(_SEQ, batch.records))
        if isinstance(seqs, range) and not batch.rejected and seqs:  # a v2 batch, 1 by 1
            ranges: tuple[tuple[int, int], ...] = ((seqs[0], seqs[-1]),)
        else:
            ranges = ranges_from_seqs([*seqs, *(rj.seq for rj in batch.rejected
                                                if rj.seq is not None)])
        payload = encode(Ack(stream=batch.stream, ranges=ranges))
        # aiomqtt's paho client: its publish only queues the packet on the event loop's socket.
        info = client._client.publish(topics.down(batch.gw, "ack"), payload, qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            self.metrics.acks_failed += 1
            log.warning("ack_publish_failed", gw=batch.gw, error=paho.error_string(info.rc))
            return
        self.metrics.acks_published += 1

    # --- commands wiring (DESIGN.md §6) ---------------------------------------------------

    async def _apply_command_results(self, written: list[DataBatch]) -> list[DataBatch]:
        """Let command results move their commands' states; returns the batches to ack.

        A batch whose results cannot be applied is not acked: the gateway sends it again,
        storage deduplicates it, and the results are applied then.
        """
        # Further consumers of committed batches (叫应 receipts and acks, central.callresp):
        # each applies its records idempotently; a failure withholds the ack, as for results.
        hooks: list[BatchHook] = [] if self.command_hooks is None else [self.command_hooks]
        hooks.extend(self.batch_hooks)
        if not hooks:
            return written
        ackable = []
        for b in written:
            try:
                for hook in hooks:
                    await hook.apply_batch(b)
                ackable.append(b)
            except CentralError as exc:
                self.metrics.write_failures += 1
                log.error("command_results_failed", gw=b.gw, stream=b.stream, error=str(exc))
        return ackable


class BatchHook(Protocol):
    async def apply_batch(self, batch: DataBatch) -> None: ...


class CommandHooks(Protocol):
    """What ingest tells the command service (`central.commands.dispatch.CommandService`)."""

    def gateway_up(self, gw: str) -> None: ...

    async def apply_batch(self, batch: DataBatch) -> None: ...


class Gate(Protocol):
    """Which messages ingest may store (`central.identity.retire.RetiredGate`)."""

    async def admit(self, infos: list[Inbound],
                    batches: list[DataBatch]) -> tuple[list[Inbound], list[DataBatch]]: ...
