"""Central's MQTT ingest against a real Mosquitto: store, then ack; bad input; broker restarts."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiomqtt
import pytest

from central.config.settings import Settings
from central.health.metrics import Metrics
from central.ingest import subscriber
from central.ingest.subscriber import Ingest
from central.storage import DatabaseWriteError, Storage, WriteResult, open_storage
from central.storage.sqlite import SqliteStorage
from protocols import envelope as env
from protocols import topics
from runtime.mqtt import Client as MqttClient
from tests.helpers import Mosquitto, free_port, python_env

T0 = 1_700_000_000_000


def data(gw: str, stream: str, seqs: list[int], point: str = "d1/gas") -> env.DataBatch:
    return env.DataBatch(gw=gw, stream=stream, records=tuple(
        env.Record(seq=s, kind=env.RecordKind.TELEMETRY, ts_ms=T0 + s, point=point, value=float(s))
        for s in seqs))


@contextlib.asynccontextmanager
async def running_ingest(broker: Mosquitto, tmp_path: Path, client_id: str | None = None,
                         **kw: object) -> AsyncIterator[tuple[Ingest, Storage, Metrics]]:
    settings = Settings(db_url=f"sqlite:///{tmp_path}/central.db", mqtt_host=broker.host,
                        mqtt_port=broker.port,
                        mqtt_client_id=client_id or f"central-{uuid.uuid4().hex[:8]}",
                        **kw)  # type: ignore[arg-type]
    metrics = Metrics()
    async with open_storage(settings.db_url) as storage:
        ingest = Ingest(settings, storage, metrics)
        task = asyncio.create_task(ingest.run(), name="ingest.mqtt")
        try:
            await ingest.wait_connected()
            yield ingest, storage, metrics
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@contextlib.asynccontextmanager
async def gateway(broker: Mosquitto, gw: str) -> AsyncIterator[aiomqtt.Client]:
    """A fake gateway subscribed to its own down/ack."""
    async with MqttClient(broker.host, broker.port, identifier=f"{gw}-{uuid.uuid4().hex[:6]}",
                              protocol=aiomqtt.ProtocolVersion.V311) as client:
        await client.subscribe(topics.down(gw, "ack"), qos=1)
        yield client


async def next_ack(client: aiomqtt.Client, timeout: float = 10.0) -> env.Ack:
    async with asyncio.timeout(timeout):
        msg = await anext(client.messages)
    ack = env.decode(bytes(msg.payload))  # type: ignore[arg-type]
    assert isinstance(ack, env.Ack)
    return ack


async def test_batch_is_stored_then_acked(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """A published batch lands in the tables and is acked with exactly its seq ranges."""
    async with running_ingest(mosquitto, tmp_path) as (_, storage, metrics), \
            gateway(mosquitto, "gw-1") as gw:
        await gw.publish(topics.up("gw-1", "data"), env.encode(data("gw-1", "s1", [1, 2, 3, 7])),
                         qos=1)
        ack = await next_ack(gw)
        assert ack == env.Ack(stream="s1", ranges=((1, 3), (7, 7)))
        # the ack came after the commit, so the rows are there now
        assert (await storage.count_records("gw-1")).readings == 4
        (p,) = await storage.device_points("gw-1:d1")
        assert p.latest is not None and p.latest.value == 7.0
        assert (metrics.batches, metrics.records_inserted) == (1, 4)


async def test_resent_batch_is_acked_but_stored_once(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """A batch sent twice (lost ack) is acked both times and stored once."""
    async with running_ingest(mosquitto, tmp_path) as (_, storage, metrics), \
            gateway(mosquitto, "gw-1") as gw:
        raw = env.encode(data("gw-1", "s1", [1, 2]))
        for _ in range(2):
            await gw.publish(topics.up("gw-1", "data"), raw, qos=1)
            assert (await next_ack(gw)).ranges == ((1, 2),)
        assert (await storage.count_records("gw-1")).readings == 2
        assert metrics.records_duplicate == 2


async def test_queued_batches_are_drained_into_one_write(mosquitto: Mosquitto,
                                                         tmp_path: Path) -> None:
    """Batches queued while central was away arrive on its return, in fewer commits, all acked."""
    async with running_ingest(mosquitto, tmp_path) as (ingest, _, _):
        client_id = ingest.settings.mqtt_client_id
    async with gateway(mosquitto, "gw-1") as gw:
        for i in range(20):  # central is away: the broker queues these for its session
            await gw.publish(topics.up("gw-1", "data"),
                             env.encode(data("gw-1", "s1", [i * 10 + 1, i * 10 + 2])), qos=1)
        async with running_ingest(mosquitto, tmp_path, client_id=client_id) as (_, storage,
                                                                                metrics):
            acks = [await next_ack(gw) for _ in range(20)]
            assert sorted(a.ranges[0] for a in acks) == [(i * 10 + 1, i * 10 + 2)
                                                         for i in range(20)]
            assert (await storage.count_records("gw-1")).readings == 40
            assert metrics.batches == 20 and metrics.commits < 20


async def test_a_write_waits_out_the_store_interval_and_takes_what_came_meanwhile(
        mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write starts no sooner than `STORE_INTERVAL_MIN_S` after the one before, and the
    batches that came in that time share it: one commit for three, not one each."""
    interval = 1.0  # long enough that the three batches all come within it
    monkeypatch.setattr(subscriber, "STORE_INTERVAL_MIN_S", interval)
    async with running_ingest(mosquitto, tmp_path) as (_, _, metrics), \
            gateway(mosquitto, "gw-1") as gw:
        first_sent = time.monotonic()  # before central has it, so before its write starts
        await gw.publish(topics.up("gw-1", "data"), env.encode(data("gw-1", "s1", [1])), qos=1)
        assert await next_ack(gw) == env.Ack(stream="s1", ranges=((1, 1),))
        await asyncio.gather(*(
            gw.publish(topics.up("gw-1", "data"), env.encode(data("gw-1", "s1", [seq])), qos=1)
            for seq in (2, 3, 4)))
        acks = [await next_ack(gw) for _ in range(3)]
        acked = time.monotonic()
    assert sorted(a.ranges for a in acks) == [((2, 2),), ((3, 3),), ((4, 4),)]
    assert (metrics.batches, metrics.commits) == (4, 2)
    assert acked - first_sent >= interval  # the second write waited out the interval


async def test_a_full_group_does_not_wait_out_the_store_interval(
        mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A group that reaches `ingest_drain_max` is written at once, not at the end of the
    interval: with a 60 s interval its acks still come within seconds."""
    monkeypatch.setattr(subscriber, "STORE_INTERVAL_MIN_S", 60.0)
    async with running_ingest(mosquitto, tmp_path, ingest_drain_max=3) as (_, _, metrics), \
            gateway(mosquitto, "gw-1") as gw:
        await gw.publish(topics.up("gw-1", "data"), env.encode(data("gw-1", "s1", [1])), qos=1)
        assert await next_ack(gw) == env.Ack(stream="s1", ranges=((1, 1),))
        for seq in (2, 3, 4):
            await gw.publish(topics.up("gw-1", "data"), env.encode(data("gw-1", "s1", [seq])),
                             qos=1)
        acks = [await next_ack(gw, timeout=10.0) for _ in range(3)]
    assert sorted(a.ranges for a in acks) == [((2, 2),), ((3, 3),), ((4, 4),)]
    assert (metrics.batches, metrics.commits) == (4, 2)


class _HeldStorage(SqliteStorage):
    """The real SQLite storage, with one fault injected: the first write waits for `release`
    (a slow disk); every write's seqs are recorded."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.writes: list[list[int]] = []

    async def write_batches(self, batches: Sequence[env.DataBatch], *,
                            now_ms: int | None = None) -> list[WriteResult]:
        self.writes.append([r.seq for b in batches for r in b.records])
        if len(self.writes) == 1:
            self.entered.set()
            await self.release.wait()
        return await super().write_batches(batches, now_ms=now_ms)


async def test_every_batch_that_comes_during_a_write_joins_the_next(mosquitto: Mosquitto,
                                                                    tmp_path: Path) -> None:
    """Batches that come one by one while a write runs are all in the next write: each waits
    for one write, not for the write after it (central.ingest.gather)."""
    settings = Settings(db_url=f"sqlite:///{tmp_path}/central.db", mqtt_host=mosquitto.host,
                        mqtt_port=mosquitto.port, mqtt_client_id=f"central-{uuid.uuid4().hex[:8]}")
    storage = _HeldStorage(tmp_path / "central.db")
    await storage.open()
    ingest = Ingest(settings, storage, Metrics())
    task = asyncio.create_task(ingest.run(), name="ingest.mqtt")
    try:
        await ingest.wait_connected()
        async with gateway(mosquitto, "gw-1") as gw:
            await gw.publish(topics.up("gw-1", "data"), env.encode(data("gw-1", "s1", [1])), qos=1)
            async with asyncio.timeout(10):
                await storage.entered.wait()
            for seq in range(2, 7):  # one by one, well apart, while the first write is held
                await gw.publish(topics.up("gw-1", "data"), env.encode(data("gw-1", "s1", [seq])),
                                 qos=1)
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.5)  # the last one reaches central
            storage.release.set()
            acks = [await next_ack(gw) for _ in range(6)]
        assert sorted(a.ranges for a in acks) == [((s, s),) for s in range(1, 7)]
        assert storage.writes == [[1], [2, 3, 4, 5, 6]]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await storage.close()


async def test_bad_messages_are_counted_and_good_ones_still_land(mosquitto: Mosquitto,
                                                                 tmp_path: Path) -> None:
    """Garbage, a topic outside the contract and a gw mismatch are counted; the next batch lands."""
    async with running_ingest(mosquitto, tmp_path) as (_, storage, metrics), \
            gateway(mosquitto, "gw-1") as gw:
        await gw.publish(topics.up("gw-1", "data"), b"\xff\x00garbage", qos=1)
        await gw.publish("fieldlink/v1/gw-1/up/bogus", env.encode(data("gw-1", "s1", [1])), qos=1)
        await gw.publish(topics.up("gw-1", "data"), env.encode(data("gw-2", "s1", [1])), qos=1)
        await gw.publish(topics.up("gw-1", "state"), env.encode(data("gw-1", "s1", [1])), qos=1)
        await gw.publish(topics.up("gw-1", "data"), env.encode(data("gw-1", "s1", [5, 6])), qos=1)
        assert (await next_ack(gw)).ranges == ((5, 6),)
        assert dict(metrics.decode_errors) == {
            "NotCborError": 1, "TopicError": 1, "GatewayMismatchError": 1,
            "MessageTypeMismatchError": 1}
        assert dict(metrics.messages_rejected) == {
            "not_cbor": 1, "bad_topic": 1, "gateway_mismatch": 1, "type_mismatch": 1}
        assert (await storage.count_records()).readings == 2
        assert 'decode_errors_total{class="TopicError"} 1' in metrics.render()


async def test_state_and_birth_are_recorded(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """up/state and up/birth update the gateway row and its points."""
    async with running_ingest(mosquitto, tmp_path) as (_, storage, metrics), \
            gateway(mosquitto, "gw-7") as gw:
        await gw.publish(topics.up("gw-7", "state"), env.encode(env.State(
            online=True, boot_id="b", version="0.1.0", bearer="4g", backlog=12, ts_ms=T0)),
            qos=1, retain=True)
        await gw.publish(topics.up("gw-7", "birth"), env.encode(env.Birth(
            gw="gw-7", stream="s1", boot_id="b", version="0.1.0", devices=(env.DeviceInfo(
                id="d1", profile="gas", profile_hash="h",
                points=(env.PointInfo(ordinal=0, key="d1/gas", name_zh="可燃气体",
                                      unit="%LEL"),)),))),
            qos=1)
        await gw.publish(topics.up("gw-7", "data"), env.encode(data("gw-7", "s1", [1])), qos=1)
        await next_ack(gw)
        g = await storage.get_gateway("gw-7")
        assert (g.online, g.backlog, g.bearer) == (True, 12, "4g")
        (p,) = await storage.device_points("gw-7:d1")
        assert (p.name_zh, p.unit, p.latest is not None) == ("可燃气体", "%LEL", True)
        assert (metrics.states, metrics.births) == (1, 1)


async def test_central_state_is_retained_online(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """Central publishes its own retained online state on connect."""
    async with running_ingest(mosquitto, tmp_path), gateway(mosquitto, "gw-1") as gw:
        await gw.subscribe(topics.CENTRAL_STATE, qos=1)
        async with asyncio.timeout(5):
            async for msg in gw.messages:
                if msg.topic.matches(topics.CENTRAL_STATE):
                    st = env.decode(bytes(msg.payload))  # type: ignore[arg-type]
                    assert isinstance(st, env.State) and st.online and msg.retain
                    break


async def test_shared_subscription_receives_data(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """With mqtt_shared, ingest subscribes via $share/central and still acks."""
    async with running_ingest(mosquitto, tmp_path, mqtt_shared=True), \
            gateway(mosquitto, "gw-1") as gw:
        await gw.publish(topics.up("gw-1", "data"), env.encode(data("gw-1", "s9", [4])), qos=1)
        assert await next_ack(gw) == env.Ack(stream="s9", ranges=((4, 4),))


async def test_reconnects_after_broker_is_killed(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """After the broker is SIGKILLed and restarted, ingest reconnects and acks a new batch."""
    async with running_ingest(mosquitto, tmp_path) as (ingest, storage, metrics):
        async with gateway(mosquitto, "gw-1") as gw:
            await gw.publish(topics.up("gw-1", "data"), env.encode(data("gw-1", "s1", [1])), qos=1)
            await next_ack(gw)
        mosquitto.kill()
        async with asyncio.timeout(5):
            while ingest.connected:
                await asyncio.sleep(0.02)
        await asyncio.to_thread(mosquitto.start)
        await ingest.wait_connected(timeout=15)
        async with gateway(mosquitto, "gw-1") as gw:
            await gw.publish(topics.up("gw-1", "data"), env.encode(data("gw-1", "s1", [2, 3])),
                             qos=1)
            assert (await next_ack(gw)).ranges == ((2, 3),)
        assert (await storage.count_records("gw-1")).readings == 3
        assert metrics.mqtt_connects == 2


@pytest.mark.parametrize("topic", ["fieldlink/v1/_central/up/data", "fieldlink/v1/gw-1/up"])
async def test_check_message_rejects_topics_outside_contract(topic: str) -> None:
    """Topics outside the contract raise TopicError before the payload is read."""
    from central.ingest.subscriber import check_message

    with pytest.raises(topics.TopicError):
        check_message(topic, env.encode(data("gw-1", "s1", [1])))


async def test_clean_stop_leaves_central_state_offline(mosquitto: Mosquitto,
                                                       tmp_path: Path) -> None:
    """When ingest is stopped cleanly, the retained central state says offline."""
    async with running_ingest(mosquitto, tmp_path):
        pass
    async with gateway(mosquitto, "gw-1") as gw:
        await gw.subscribe(topics.CENTRAL_STATE, qos=1)
        async with asyncio.timeout(5):
            msg = await anext(gw.messages)
        st = env.decode(bytes(msg.payload))  # type: ignore[arg-type]
        assert isinstance(st, env.State) and not st.online


async def test_sigkilled_central_never_acked_what_it_had_not_committed(
        mosquitto: Mosquitto, tmp_path: Path) -> None:
    """Central SIGKILLed mid-stream: every seq it acked is in the database file."""
    db = tmp_path / "central.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "central", "serve", "--db", f"sqlite:///{db}",
        "--mqtt-port", str(mosquitto.port), "--http-port", str(free_port()),
        "--mqtt-client-id", f"central-{uuid.uuid4().hex[:8]}", "--log-json",
        env=python_env(), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    acked: set[int] = set()
    try:
        async with gateway(mosquitto, "gw-k") as gw:
            await gw.subscribe(topics.CENTRAL_STATE, qos=1)
            async with asyncio.timeout(60):  # wait until central says it is online (a busy box)
                async for msg in gw.messages:
                    if msg.topic.matches(topics.CENTRAL_STATE):
                        st = env.decode(bytes(msg.payload))  # type: ignore[arg-type]
                        if isinstance(st, env.State) and st.online:
                            break
            await gw.unsubscribe(topics.CENTRAL_STATE)
            for b in range(60):
                await gw.publish(topics.up("gw-k", "data"), env.encode(
                    data("gw-k", "s1", list(range(b * 200 + 1, b * 200 + 201)))), qos=1)
            while len(acked) < 5 * 200:
                acked.update(env.seqs_in_ranges((await next_ack(gw)).ranges))
            proc.kill()
            await proc.wait()
            with contextlib.suppress(TimeoutError):  # acks already on their way
                while True:
                    acked.update(env.seqs_in_ranges((await next_ack(gw, timeout=0.5)).ranges))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    conn = sqlite3.connect(db)
    try:
        held = {s for (s,) in conn.execute("SELECT seq FROM readings WHERE gw = 'gw-k'")}
    finally:
        conn.close()
    assert acked and acked <= held


class _PoisonedStorage(SqliteStorage):
    """The real SQLite storage, with one fault injected: every write that carries a batch of
    `gw-bad` fails and rolls back, as a poisoned batch would."""

    async def write_batches(self, batches: Sequence[env.DataBatch], *,
                            now_ms: int | None = None) -> list[WriteResult]:
        if any(b.gw == "gw-bad" for b in batches):
            raise DatabaseWriteError("injected: gw-bad's batch is poisoned")
        return await super().write_batches(batches, now_ms=now_ms)


async def test_pipelined_acks_name_only_committed_seqs(mosquitto: Mosquitto,
                                                       tmp_path: Path) -> None:
    """While batches pipeline, each ack follows its commit; a failed batch is never acked."""
    db = tmp_path / "central.db"
    settings = Settings(db_url=f"sqlite:///{db}", mqtt_host=mosquitto.host,
                        mqtt_port=mosquitto.port, mqtt_client_id=f"central-{uuid.uuid4().hex[:8]}")
    storage = _PoisonedStorage(db)
    await storage.open()
    ingest = Ingest(settings, storage, Metrics())
    task = asyncio.create_task(ingest.run(), name="ingest.mqtt")
    reader = sqlite3.connect(db)
    try:
        await ingest.wait_connected()
        async with gateway(mosquitto, "gw-ok") as ok, gateway(mosquitto, "gw-bad") as bad:
            for b in range(30):  # interleaved, fast: groups queue up behind the write
                seqs = list(range(b * 500 + 1, b * 500 + 501))
                await ok.publish(topics.up("gw-ok", "data"), env.encode(data("gw-ok", "s1", seqs)),
                                 qos=1)
                if b % 10 == 0:
                    await bad.publish(topics.up("gw-bad", "data"),
                                      env.encode(data("gw-bad", "s9", seqs)), qos=1)
            acked: set[int] = set()
            while len(acked) < 30 * 500:
                ack = await next_ack(ok)
                got = set(env.seqs_in_ranges(ack.ranges))
                held = {s for (s,) in reader.execute(
                    "SELECT seq FROM readings WHERE gw = 'gw-ok' AND seq BETWEEN ? AND ?",
                    (min(got), max(got)))}
                assert got <= held  # committed before the ack went out
                acked |= got
            with pytest.raises(TimeoutError):
                await next_ack(bad, timeout=1.0)
        assert reader.execute("SELECT count(*) FROM readings WHERE gw = 'gw-bad'"
                              ).fetchone() == (0,)
    finally:
        reader.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await storage.close()
