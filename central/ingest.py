"""MQTT ingest (DESIGN.md §4.3, §9): subscribe to every gateway's `up/`, store, then ack.

The invariant: a `down/ack` names only seqs whose transaction has committed. Messages already
queued are drained (up to `ingest_drain_max` batches) and written in one transaction, then
each batch is acked — duplicates too, since central holds them. Bad input is logged once per
message with its class, counted, and never stops the loop. On disconnect (the broker may be
SIGKILLed at any time) the loop reconnects with capped, jittered back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from dataclasses import dataclass
from operator import attrgetter
from typing import Protocol

import aiomqtt
import structlog

from central import __version__, mqtt_client
from central.errors import CentralError
from central.metrics import Metrics
from central.settings import Settings
from central.storage import DatabaseWriteError, Storage
from protocols import topics
from protocols.envelope import (
    Ack,
    Birth,
    DataBatch,
    EnvelopeError,
    Message,
    State,
    decode,
    encode,
    ranges_from_seqs,
)

log = structlog.get_logger(__name__)

BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 10.0
_EXPECTED = {"data": DataBatch, "state": State, "birth": Birth}
_SEQ = attrgetter("seq")
_POINT = attrgetter("point")


class IngestError(CentralError):
    """Base of ingest's own errors about a message."""


class GatewayMismatchError(IngestError):
    def __init__(self, topic_gw: str, payload_gw: str) -> None:
        super().__init__(f"topic names gateway {topic_gw!r}, payload names {payload_gw!r}")
        self.topic_gw = topic_gw
        self.payload_gw = payload_gw


class MessageTypeMismatchError(IngestError):
    def __init__(self, topic_name: str, got: str) -> None:
        super().__init__(f"topic up/{topic_name} carries a {got} message")
        self.topic_name = topic_name
        self.got = got


class BadPointKeyError(IngestError):
    def __init__(self, key: str) -> None:
        super().__init__(f"point key {key!r} is not device/point")
        self.key = key


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
    if isinstance(msg, DataBatch):
        # Each distinct key once (a batch names few points many times), in batch order.
        for key in dict.fromkeys(map(_POINT, msg.records)):
            if key is not None and "/" not in key:
                raise BadPointKeyError(key)
    return Inbound(gw=t.gw, msg=msg, retained=retained)


def _payload_bytes(payload: object) -> bytes:
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode()
    return b""


class Ingest:
    """The MQTT ingest worker. `run()` is the `ingest_loop`; it returns only when cancelled."""

    def __init__(self, settings: Settings, storage: Storage, metrics: Metrics) -> None:
        self.settings = settings
        self.storage = storage
        self.metrics = metrics
        self.boot_id = uuid.uuid4().hex[:12]
        self._connected = asyncio.Event()
        self._acks: set[asyncio.Task[None]] = set()  # acks being published

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            await self._connected.wait()

    def _state(self, online: bool) -> bytes:
        return encode(State(online=online, boot_id=self.boot_id, version=__version__,
                            bearer="central", backlog=0, ts_ms=time.time_ns() // 1_000_000))

    def _client(self) -> aiomqtt.Client:
        s = self.settings
        return mqtt_client.connect(
            s, identifier=s.mqtt_client_id,
            # One central: a persistent session, so the broker queues QoS 1 messages while it
            # is away. Shared workers: a clean session, because Mosquitto keeps a dead member's
            # persistent session in the $share group and parks its share of the messages
            # there; the survivors then get everything and the edge resends what was in flight.
            clean_session=s.mqtt_shared,
            will=aiomqtt.Will(topics.CENTRAL_STATE, self._state(False), qos=1, retain=True),
        )

    async def run(self) -> None:
        """Connect, consume, and reconnect with capped, jittered back-off, for ever."""
        backoff = BACKOFF_FIRST_S
        s = self.settings
        lg = log.bind(broker=f"{s.mqtt_host}:{s.mqtt_port}", client_id=s.mqtt_client_id)
        while True:
            try:
                async with self._client() as client:
                    await client.publish(topics.CENTRAL_STATE, self._state(True), qos=1,
                                         retain=True)
                    sub = topics.SHARED_UP if s.mqtt_shared else topics.UP_WILDCARD
                    await client.subscribe(sub, qos=1)
                    self._connected.set()  # only now: "connected" means "receiving"
                    self.metrics.mqtt_connected = True
                    self.metrics.mqtt_connects += 1
                    backoff = BACKOFF_FIRST_S
                    lg.info("mqtt_connected", subscription=sub)
                    try:
                        await self._consume(client)
                    except asyncio.CancelledError:
                        await self._say_offline(client)
                        raise
            except aiomqtt.MqttError as exc:
                lg.warning("mqtt_disconnected", error=str(exc), retry_in_s=round(backoff, 2))
            finally:
                self._connected.clear()
                self.metrics.mqtt_connected = False
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _say_offline(self, client: aiomqtt.Client) -> None:
        """On a clean stop the broker does not send the Will, so say offline ourselves."""
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(2):
                await client.publish(topics.CENTRAL_STATE, self._state(False), qos=1,
                                     retain=True)
        log.info("mqtt_stopped")

    async def _consume(self, client: aiomqtt.Client) -> None:
        """Receive and decode group N+1 while group N is written and acked: a pipeline two
        deep, so at most one group is being written and one decoded group waits for it.
        Groups are stored in arrival order (alarm ordering relies on it), each acked only
        after its own commit, by `_store` itself (its acks do not wait for the next group)."""
        messages = client.messages
        limit = self.settings.ingest_drain_max
        storing: asyncio.Task[None] | None = None
        try:
            while True:
                group = [await self._next_message(messages, storing)]
                # Drain what is already queued so that one commit (one fsync) covers many
                # batches.
                while len(messages) and len(group) < limit:
                    group.append(await anext(messages))
                infos, batches = self._decode(group)
                if storing is not None:
                    await storing  # raises what the previous group's store raised
                storing = asyncio.create_task(self._store(client, infos, batches),
                                              name="ingest.store")
        finally:
            # Cancelled (shutdown) or disconnected: a decoded group not yet written is
            # dropped, one being written may commit without its acks; the edge resends what
            # is unacked. Never an ack without its commit: `_write_and_ack` acks only after.
            if storing is not None and not storing.done():
                storing.cancel()
                await asyncio.wait((storing,))
                log.info("ingest_store_stopped", committed_unacked_possible=True)
            if storing is not None and not storing.cancelled():
                storing.exception()  # already raised above, or secondary to what is raised
            for task in list(self._acks):  # the connection is going: they cannot complete
                task.cancel()

    @staticmethod
    async def _next_message(messages: aiomqtt.MessagesIterator,
                            storing: asyncio.Task[None] | None) -> aiomqtt.Message:
        """The next message; raises at once what a failed store raised, not only when the
        next message comes."""
        if storing is None or storing.done():
            if storing is not None:
                storing.result()
            return await anext(messages)
        receiving = asyncio.ensure_future(anext(messages))
        try:
            await asyncio.wait((receiving, storing), return_when=asyncio.FIRST_COMPLETED)
            if storing.done() and storing.exception() is not None and not receiving.done():
                storing.result()
            return await receiving
        finally:
            if not receiving.done():
                receiving.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await receiving

    def _decode(self, group: list[aiomqtt.Message]) -> tuple[list[Inbound], list[DataBatch]]:
        """Check every message of a group: the state and birth messages, and the data batches
        with records, each in arrival order. Bad ones are counted and logged."""
        infos: list[Inbound] = []
        batches: list[DataBatch] = []
        for m in group:
            topic = m.topic.value
            try:
                inbound = check_message(topic, _payload_bytes(m.payload), bool(m.retain))
            except (topics.TopicError, EnvelopeError, IngestError) as exc:
                cls = type(exc).__name__
                self.metrics.count_error(cls)
                log.warning("message_rejected", topic=topic, error_class=cls, error=str(exc))
                continue
            msg = inbound.msg
            if isinstance(msg, DataBatch):
                if msg.records:
                    batches.append(msg)
            else:
                infos.append(inbound)
        return infos, batches

    async def _store(self, client: aiomqtt.Client, infos: list[Inbound],
                     batches: list[DataBatch]) -> None:
        """Write one decoded group (its states and births first, as they came), then ack."""
        for inbound in infos:
            msg = inbound.msg
            try:
                if isinstance(msg, State):
                    await self.storage.record_state(inbound.gw, msg, seen=not inbound.retained)
                    self.metrics.states += 1
                elif isinstance(msg, Birth):
                    await self.storage.record_birth(inbound.gw, msg)
                    self.metrics.births += 1
                    if self.command_hooks is not None:  # commands wiring (§6)
                        self.command_hooks.gateway_up(inbound.gw)
            except DatabaseWriteError as exc:
                self.metrics.write_failures += 1
                log.error("gateway_info_write_failed", gw=inbound.gw, error=str(exc))
        if batches:
            await self._write_and_ack(client, batches)

    async def _write_and_ack(self, client: aiomqtt.Client, batches: list[DataBatch]) -> None:
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
                    results.extend(await self.storage.write_batches([b]))
                    written.append(b)
                except DatabaseWriteError as exc1:
                    self.metrics.write_failures += 1
                    log.error("batch_write_failed", gw=b.gw, stream=b.stream, error=str(exc1))
        # Committed: from here on the acks may go out.
        self.metrics.commits += 1 if written is batches else len(written)
        for b, res in zip(written, results, strict=True):
            self.metrics.batches += 1
            self.metrics.records_inserted += res.inserted
            self.metrics.records_duplicate += res.duplicates
            self.metrics.records_clock_suspect += res.clock_suspect
            self.metrics.records_time_corrected += res.corrected
            self.metrics.records_merged += res.merged
        written = await self._apply_command_results(written)  # commands wiring (§6)
        # Published in the background: the next group's write must not wait for the broker's
        # PUBACKs of these acks (a round trip per group that left the database idle).
        for b in written:
            task = asyncio.create_task(self._ack(client, b), name="ingest.ack")
            self._acks.add(task)
            task.add_done_callback(self._ack_done)

    def _ack_done(self, task: asyncio.Task[None]) -> None:
        self._acks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # Not acked: the gateway sends the batch again after its ack timeout, storage
            # finds it held, and it is acked then.
            self.metrics.acks_failed += 1
            log.warning("ack_publish_failed", error_class=type(exc).__name__, error=str(exc))

    async def _ack(self, client: aiomqtt.Client, batch: DataBatch) -> None:
        ack = Ack(stream=batch.stream, ranges=ranges_from_seqs(map(_SEQ, batch.records)))
        # A short timeout: aiomqtt does not wake a pending publish when the link drops.
        await client.publish(topics.down(batch.gw, "ack"), encode(ack), qos=1, timeout=2)
        self.metrics.acks_published += 1

    # --- commands wiring (DESIGN.md §6) ---------------------------------------------------

    command_hooks: CommandHooks | None = None

    async def _apply_command_results(self, written: list[DataBatch]) -> list[DataBatch]:
        """Let command results move their commands' states; returns the batches to ack.

        A batch whose results cannot be applied is not acked: the gateway sends it again,
        storage deduplicates it, and the results are applied then.
        """
        hooks = self.command_hooks
        if hooks is None:
            return written
        ackable = []
        for b in written:
            try:
                await hooks.apply_batch(b)
                ackable.append(b)
            except CentralError as exc:
                self.metrics.write_failures += 1
                log.error("command_results_failed", gw=b.gw, stream=b.stream, error=str(exc))
        return ackable


class CommandHooks(Protocol):
    """What ingest tells the command service (`central.commands.CommandService`)."""

    def gateway_up(self, gw: str) -> None: ...

    async def apply_batch(self, batch: DataBatch) -> None: ...
