"""Issue 10: every hostile payload the issue names, published through a real Mosquitto to a
running ingest on SQLite and PostgreSQL: the loop never restarts, good data lands, each
refusal is counted by reason, and refused records with a sound seq are acked."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomqtt
import pytest

from central.config.settings import Settings
from central.health.metrics import Metrics
from central.ingest.subscriber import Ingest
from central.storage import Storage, open_storage
from protocols import topics
from protocols.envelope import Ack, decode
from runtime.mqtt import Client as MqttClient
from tests.helpers import Mosquitto
from tests.hostile import (
    BIG,
    birth,
    cyclic_attrs,
    data,
    oversized_batch,
    row,
    state,
    wire,
)
from tests.pg import BACKENDS, database_url

GW = "gw-h"


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database_url(request.param, tmp_path) as url:
        yield url


@contextlib.asynccontextmanager
async def client(broker: Mosquitto, name: str) -> AsyncIterator[aiomqtt.Client]:
    async with MqttClient(broker.host, broker.port, identifier=f"{name}-{uuid.uuid4().hex[:6]}",
                          protocol=aiomqtt.ProtocolVersion.V311) as c:
        yield c


async def next_ack(c: aiomqtt.Client, timeout: float = 20.0) -> Ack:
    async with asyncio.timeout(timeout):
        msg = await anext(c.messages)
    ack = decode(bytes(msg.payload))  # type: ignore[arg-type]
    assert isinstance(ack, Ack)
    return ack


async def test_hostile_payloads_are_refused_and_good_data_lands(mosquitto: Mosquitto,
                                                                db_url: str) -> None:
    """Huge ints in state/birth/seq, cyclic CBOR attrs, a 10 MB point key, a 1 MB stream id, an
    oversized batch and a retained poison state: all counted by reason, none stops ingest."""
    async with client(mosquitto, "poisoner") as p:  # retained before central ever connects
        await p.publish(topics.up(GW, "state"), wire(state(backlog=BIG)), qos=1, retain=True)
    settings = Settings(db_url=db_url, mqtt_host=mosquitto.host, mqtt_port=mosquitto.port,
                        mqtt_client_id=f"central-{uuid.uuid4().hex[:8]}")
    metrics = Metrics()
    async with open_storage(db_url) as storage, client(mosquitto, GW) as gw:
        await gw.subscribe(topics.down(GW, "ack"), qos=1)
        ingest = Ingest(settings, storage, metrics)
        task = asyncio.create_task(ingest.run(), name="ingest.mqtt")
        try:
            await ingest.wait_connected()
            await _run_cases(gw, storage, metrics)
            assert not task.done(), "the ingest loop ended"
            assert metrics.mqtt_connects == 1, "ingest reconnected (restarted) on poison"
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _run_cases(gw: aiomqtt.Client, storage: Storage, metrics: Metrics) -> None:
    up = topics.up(GW, "data")
    next_seq = iter(range(1, 10_000))
    good: list[int] = []

    async def good_batch() -> None:
        seqs = [next(next_seq) for _ in range(3)]
        await gw.publish(up, wire(data(GW, "s1", [row(s, value=float(s)) for s in seqs])), qos=1)
        ack = await next_ack(gw)  # ingest is in order: whatever came before is handled now
        assert ack.ranges == ((seqs[0], seqs[-1]),)
        good.extend(seqs)

    await good_batch()
    assert metrics.messages_rejected == {"int_range": 1}  # the retained state, at subscribe
    await gw.publish(topics.up(GW, "state"), wire(state(backlog=BIG)), qos=1)
    await good_batch()
    await gw.publish(topics.up(GW, "state"), wire(state(ts=BIG)), qos=1)
    await good_batch()
    await gw.publish(topics.up(GW, "birth"), wire(birth(GW, ordinal=2**63)), qos=1)
    await good_batch()
    assert metrics.messages_rejected == {"int_range": 4}

    # A seq of 2**63-1 beside two good records: they land and are acked, it is not (no edge
    # makes such a seq, so there is nothing sound to acknowledge).
    await gw.publish(up, wire(data(GW, "s1", [row(100), row(2**63 - 1), row(101)])), qos=1)
    assert (await next_ack(gw)).ranges == ((100, 101),)
    good += [100, 101]
    # Cyclic attrs (CBOR tags 28/29) on an alarm between two good records: refused alone and
    # acked with them, so the gateway does not send it again.
    await gw.publish(up, wire(data(GW, "s1", [row(200), row(201, kind=1, attrs=cyclic_attrs()),
                                              row(202)]), sharing=True), qos=1)
    assert (await next_ack(gw)).ranges == ((200, 202),)
    good += [200, 202]
    # A 10 MB point key: the record naming it is refused, the one beside it lands.
    huge_key = "d9/" + "k" * 10_000_000
    await gw.publish(up, wire(data(GW, "s1", [row(300), row(301, point=1)],
                                   pts=["d1/gas", huge_key])), qos=1)
    assert (await next_ack(gw)).ranges == ((300, 301),)
    good.append(300)
    # A 1 MB stream id, and an oversized batch from a gateway central never heard of:
    # refused whole, nothing acked.
    await gw.publish(up, wire(data(GW, "s" * 1_000_000, [row(400)])), qos=1)
    await gw.publish(topics.up("gw-unknown", "data"), oversized_batch("gw-unknown"), qos=1)
    await good_batch()

    assert metrics.messages_rejected == {"int_range": 4, "string_too_long": 1,
                                         "too_many_items": 1}
    assert metrics.records_rejected == {"int_range": 1, "shared_reference": 1,
                                        "string_too_long": 1}
    counts = await storage.count_records(GW)
    assert counts.readings == len(good)
    assert (await storage.count_records("gw-unknown")).readings == 0
    (stream,) = (await storage.delivery(GW)).streams
    assert stream.lost_records_reported == 2  # 201 and 301, refused and acked
    assert [p.point for p in await storage.latest_values(GW)] == ["gas"]
    text = metrics.render()
    assert 'fieldlink_central_records_rejected_total{reason="shared_reference"} 1.0' in text
    assert 'fieldlink_central_messages_rejected_total{reason="too_many_items"} 1.0' in text
