"""The uplink's ack screening (DESIGN.md §8): only seqs sent and not yet acked are marked
delivered; central's duplicate acks are told apart from acks naming what was never sent."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import structlog

from edge_agent.outbox.store import NewRecord, Outbox
from edge_agent.uplink.link import Uplink
from edge_agent.uplink.mqtt_config import MqttConfig
from protocols import topics
from protocols.envelope import Ack, DataBatch, RecordKind, decode, encode
from runtime.mqtt import Client as MqttClient
from tests.helpers import Mosquitto, until
from tests.uplinks import running_uplink

GW = "gw-acks"


def tel(i: int) -> NewRecord:
    return NewRecord(RecordKind.TELEMETRY, 1_700_000_000_000 + i, "d/gas", float(i))


@contextlib.asynccontextmanager
async def running(ob: Outbox, broker: Mosquitto, **kw: object) -> AsyncIterator[Uplink]:
    kw.setdefault("backlog_batch_size", kw.get("batch_size", 500))
    mqtt = MqttConfig(host=broker.host, port=broker.port, **kw)  # type: ignore[arg-type]
    async with running_uplink(GW, ob, mqtt) as up:
        await until(lambda: up.connected, "uplink connected")
        yield up


async def test_acks_of_sent_records_mark_them_and_repeats_are_duplicates(
        mosquitto: Mosquitto, tmp_path: Path) -> None:
    """A genuine ack marks its records; the same ack again is a duplicate, not a forgery; an
    ack beyond what was sent marks only the sent part."""
    async with Outbox.open(tmp_path / "o.db") as ob, MqttClient(
            mosquitto.host, mosquitto.port, identifier=f"c-{uuid.uuid4().hex[:6]}") as central:
        await central.subscribe(topics.up(GW, "data"), qos=1)
        async with running(ob, mosquitto, batch_size=10, max_inflight=1,
                           ack_timeout_s=30.0) as up:
            await ob.append([tel(i) for i in range(30)])
            async with asyncio.timeout(10):
                async for msg in central.messages:
                    batch = decode(bytes(msg.payload))  # type: ignore[arg-type]
                    if isinstance(batch, DataBatch):
                        break
            seqs = [r.seq for r in batch.records]
            assert seqs == list(range(1, 11))
            ack = encode(Ack(stream=ob.stream, ranges=((1, 10),)))
            await central.publish(topics.down(GW, "ack"), ack, qos=1)
            await until(lambda: up.counters.records_acked == 10, "the genuine ack")
            await central.publish(topics.down(GW, "ack"), ack, qos=1)
            await until(lambda: up.counters.ack_records_duplicate == 10, "the repeat")
            assert up.counters.acks_refused == 0
            await until(lambda: up.counters.records_sent == 20, "the second batch")
            # Acks 11..30: only 11..20 were sent, 21..30 wait in the outbox.
            await central.publish(topics.down(GW, "ack"), encode(
                Ack(stream=ob.stream, ranges=((11, 30),))), qos=1)
            await until(lambda: up.counters.acks_refused == 1, "the over-reaching ack")
            assert up.counters.ack_records_unsent == 10
            # records_acked counts only after the outbox commit, which follows the screening.
            await until(lambda: up.counters.records_acked == 20, "11..20 marked delivered")
            stats = await ob.stats()
            assert stats.backlog == 10 and stats.delivered_total == 20


async def test_late_ack_after_a_resend_still_counts(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """An ack that arrives after the batch timed out (and went again) is still genuine."""
    async with Outbox.open(tmp_path / "o.db") as ob, MqttClient(
            mosquitto.host, mosquitto.port, identifier=f"c-{uuid.uuid4().hex[:6]}") as central:
        async with running(ob, mosquitto, ack_timeout_s=0.3) as up:
            await ob.append([tel(i) for i in range(5)])
            await until(lambda: up.counters.batches_resent >= 1, "a timed-out batch")
            await central.publish(topics.down(GW, "ack"), encode(
                Ack(stream=ob.stream, ranges=((1, 5),))), qos=1)
            await until(lambda: up.counters.records_acked == 5, "the late ack")
            assert up.counters.acks_refused == 0


async def test_ack_of_the_previous_run_is_genuine_after_a_reload(
        mosquitto: Mosquitto, tmp_path: Path) -> None:
    """A batch sent by the uplink before a reload (a new `Uplink` on the same outbox, as after a
    remote config apply) and acked after it: marked delivered, not refused; an ack of seqs
    never sent is still refused and counted, and its warning logged."""
    async with Outbox.open(tmp_path / "o.db") as ob, MqttClient(
            mosquitto.host, mosquitto.port, identifier=f"c-{uuid.uuid4().hex[:6]}") as central:
        async with running(ob, mosquitto, batch_size=10, max_inflight=1,
                           ack_timeout_s=30.0) as before:
            await ob.append([tel(i) for i in range(10)])
            await until(lambda: before.counters.records_sent == 10, "a batch in flight")
        # Central's ack comes while the agent reloads: the broker keeps it for the session.
        await central.publish(topics.down(GW, "ack"), encode(
            Ack(stream=ob.stream, ranges=((1, 10),))), qos=1)
        # An alarm (seq 11) goes first and alone, and holds the only slot: the reloaded uplink
        # has not sent 1..10 again when the ack reaches it.
        await ob.append([NewRecord(RecordKind.ALARM, 1_700_000_000_000, "d/gas", 1.0)])
        with structlog.testing.capture_logs() as logs:
            async with running(ob, mosquitto, batch_size=1, max_inflight=1,
                               ack_timeout_s=30.0) as after:
                await until(lambda: after.counters.records_acked == 10, "the late genuine ack")
                assert after.counters.acks_refused == 0
                assert not [e for e in logs if e["log_level"] == "warning"], logs
                await central.publish(topics.down(GW, "ack"), encode(
                    Ack(stream=ob.stream, ranges=((12, 21),))), qos=1)
                await until(lambda: after.counters.acks_refused == 1, "the forged ack")
                assert after.counters.ack_records_unsent == 10
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
            "ack_unsent_records"]
        assert (await ob.stats()).delivered_total == 10
