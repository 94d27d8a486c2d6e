"""Envelope v2 on the wire: the agent sends columnar batches only to a central that announced
it decodes them; central stores and acks both versions (a mixed fleet). Real Mosquitto, real
outbox and uplink, central's real ingest on SQLite."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import cbor2

from edge_agent.outbox.store import Outbox
from protocols import envelope as env
from protocols import topics
from runtime.mqtt import Client as MqttClient
from tests.helpers import Mosquitto, until
from tests.test_central_ingest import data, gateway, next_ack, running_ingest
from tests.test_uplink import make_uplink, new_gw, running, tel


@contextlib.asynccontextmanager
async def old_central(broker: Mosquitto, gw: str) -> AsyncIterator[list[int]]:
    """A central of before version 2: its retained state has no `env`; it acks every batch
    (without storing) and notes each batch's envelope version."""
    versions: list[int] = []
    async with MqttClient(broker.host, broker.port,
                          identifier=f"old-central-{uuid.uuid4().hex[:6]}") as client:
        await client.subscribe(topics.up(gw, "data"), qos=1)
        state = env.State(online=True, boot_id="old", version="0.0.9", bearer="central",
                          backlog=0)
        assert "env" not in cbor2.loads(env.encode(state))
        await client.publish(topics.CENTRAL_STATE, env.encode(state), qos=1, retain=True)

        async def serve() -> None:
            async for msg in client.messages:
                raw = bytes(msg.payload)  # type: ignore[arg-type]
                versions.append(cbor2.loads(raw)["v"])
                batch = env.decode(raw)  # what an old central could decode: version 1
                assert isinstance(batch, env.DataBatch)
                ack = env.Ack(batch.stream, env.ranges_from_seqs(r.seq for r in batch.records))
                await client.publish(topics.down(gw, "ack"), env.encode(ack), qos=1)

        task = asyncio.create_task(serve(), name="old_central")
        try:
            yield versions
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await client.publish(topics.CENTRAL_STATE, b"", qos=1, retain=True)


async def test_agent_sends_version_1_to_an_old_central(mosquitto: Mosquitto,
                                                       tmp_path: Path) -> None:
    """A central that announced no `env` gets version 1 batches only, and they are acked."""
    gw = new_gw()
    async with Outbox.open(tmp_path / "o.db") as ob, old_central(mosquitto, gw) as versions:
        uplink = make_uplink(ob, mosquitto, gw, batch_size=10)
        async with running(uplink):
            await until(lambda: uplink.central_state is not None, "central's state")
            await ob.append([tel(i) for i in range(30)])
            await until(lambda: uplink.counters.records_acked == 30, "every record acked")
        assert versions and set(versions) == {1}
        assert uplink.envelope_version() == 1


async def test_backlog_columns_go_as_version_1_records_to_an_old_central(
        mosquitto: Mosquitto, tmp_path: Path) -> None:
    """The backlog leaves the outbox as columns; an old central still gets them as version 1
    records, every one acked."""
    gw = new_gw()
    async with Outbox.open(tmp_path / "o.db", live_window_s=0.2) as ob, \
            old_central(mosquitto, gw) as versions:
        await ob.append([tel(i) for i in range(30)])
        await asyncio.sleep(0.3)  # older than the live window: backlog
        uplink = make_uplink(ob, mosquitto, gw, batch_size=10)
        async with running(uplink):
            await until(lambda: uplink.counters.records_acked == 30, "every record acked")
        assert set(versions) == {1}
        assert uplink.counters.backlog_records_sent > 0


async def test_agent_sends_version_2_to_a_new_central_which_stores_it(mosquitto: Mosquitto,
                                                                      tmp_path: Path) -> None:
    """Central announces `env: 2`; the agent's batches then go columnar, a third of the
    bytes, and central stores every record once and acks them."""
    gw = new_gw()
    async with running_ingest(mosquitto, tmp_path) as (_, storage, metrics), \
            Outbox.open(tmp_path / "o.db") as ob:
        uplink = make_uplink(ob, mosquitto, gw, batch_size=50)
        async with running(uplink):
            await until(lambda: uplink.envelope_version() == 2, "central's version 2 state")
            await ob.append([tel(i) for i in range(200)])
            await until(lambda: uplink.counters.records_acked == 200, "every record acked")
        assert (await storage.count_records(gw)).readings == 200
        assert metrics.records_inserted == 200
        assert uplink.counters.bytes_sent / uplink.counters.records_sent < 12


async def test_central_acks_both_versions_and_stores_a_resend_once(mosquitto: Mosquitto,
                                                                   tmp_path: Path) -> None:
    """The same records as version 1 and then as version 2 (a gateway upgraded mid-outage):
    both acked with the same ranges, stored once."""
    batch = data("gw-1", "s1", [1, 2, 3, 9])
    async with running_ingest(mosquitto, tmp_path) as (_, storage, metrics), \
            gateway(mosquitto, "gw-1") as gw:
        for version in (1, 2):
            await gw.publish(topics.up("gw-1", "data"), env.encode(batch, version=version),
                             qos=1)
            assert (await next_ack(gw)).ranges == ((1, 3), (9, 9))
        assert (await storage.count_records("gw-1")).readings == 4
        assert (metrics.records_inserted, metrics.records_duplicate) == (4, 4)
