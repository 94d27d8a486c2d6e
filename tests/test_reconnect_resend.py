"""Issue 13, must-show 4: after a broker restart without persistence, an agent that reconnects
before central has subscribed publishes its in-flight batches into the void; when central's
online state comes, it resends them at once instead of after an ack timeout.

Real parts: the private Mosquitto (persistence off), central's ingest with SQLite, the agent's
uplink with its outbox, in one process as in tests/test_uplink.py and test_central_ingest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from edge_agent.outbox.store import Outbox
from protocols import topics
from protocols.envelope import State, decode
from runtime.mqtt import Client as MqttClient
from tests.helpers import Mosquitto, until
from tests.test_central_ingest import running_ingest
from tests.test_uplink import make_uplink, new_gw, running, tel

ACK_TIMEOUT_S = 10.0  # the default: without the resend on central's return, ~10 s to commit


@contextlib.asynccontextmanager
async def central_online_watch(broker: Mosquitto) -> AsyncIterator[list[float]]:
    """Monotonic arrival times of central's online states, as a gateway sees them."""
    seen: list[float] = []

    async def watch() -> None:
        async with MqttClient(broker.host, broker.port,
                              identifier=f"watch-{uuid.uuid4().hex[:6]}") as client:
            await client.subscribe(topics.CENTRAL_STATE, qos=1)
            subscribed.set()
            async for msg in client.messages:
                state = decode(bytes(msg.payload))  # type: ignore[arg-type]
                if isinstance(state, State) and state.online:
                    seen.append(time.monotonic())

    subscribed = asyncio.Event()
    task = asyncio.create_task(watch(), name="watch.central_state")
    try:
        async with asyncio.timeout(5):
            await subscribed.wait()
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_in_flight_batches_go_again_when_central_subscribes(mosquitto: Mosquitto,
                                                                  tmp_path: Path) -> None:
    """Broker restarted without persistence, agent back first and publishing into a broker
    with no subscriber, central back later: the first record is committed within 2 s of
    central's online state (its subscription), not after the 10 s ack timeout."""
    gw = new_gw()
    central_id = f"central-{uuid.uuid4().hex[:8]}"
    async with Outbox.open(tmp_path / "o.db") as ob:
        uplink = make_uplink(ob, mosquitto, gw, ack_timeout_s=ACK_TIMEOUT_S, batch_size=500,
                             backlog_batch_size=500, reconnect_min_s=0.1, reconnect_max_s=0.5)
        async with running(uplink):
            async with running_ingest(mosquitto, tmp_path, client_id=central_id):
                await ob.append([tel(i) for i in range(5)])
                await until(lambda: uplink.counters.records_acked == 5, "the first records acked")
            # Central is away (its persistent session would queue for it), then the broker
            # restarts without persistence: the session and its subscription are gone.
            mosquitto.kill()
            await until(lambda: not uplink.connected, "the agent to notice the broker's death")
            await ob.append([tel(i) for i in range(5, 35)])
            sent = uplink.counters.records_sent
            mosquitto.start()
            await until(lambda: uplink.connected and uplink.counters.records_sent >= sent + 30,
                        "the agent to reconnect and publish into the void")
            assert uplink.in_flight == 30  # published (PUBACKed by the broker), not acked
            resent = uplink.counters.batches_resent
            async with central_online_watch(mosquitto) as online_at:
                started = time.monotonic()
                async with running_ingest(mosquitto, tmp_path, client_id=central_id) as (
                        _, storage, metrics):
                    committed_at = await until(
                        lambda: metrics.records_inserted > 0 and time.monotonic(),
                        "the first record committed after the restart",
                        timeout=3 * ACK_TIMEOUT_S, interval=0.01)
                    await until(lambda: online_at, "central's online state")
                    first_s = committed_at - online_at[0]
                    assert online_at[0] >= started
                    assert first_s <= 2.0, (
                        f"first record committed {first_s:.2f} s after central subscribed")
                    await until(lambda: uplink.counters.records_acked == 35,
                                "every record acked", timeout=2.0)
                    assert (await storage.count_records(gw)).readings == 35
            assert uplink.counters.batches_resent > resent  # the batches lost in the void
            assert uplink.counters.central_online >= 1
            assert (await ob.stats()).backlog == 0


async def test_only_central_coming_online_resends(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """Central's online state retained when the agent connects resends nothing (what is in
    flight went after that subscribe); central stopping and starting again resends once."""
    gw = new_gw()
    async with Outbox.open(tmp_path / "o.db") as ob, contextlib.AsyncExitStack() as stack:
        uplink = make_uplink(ob, mosquitto, gw, reconnect_min_s=0.1)
        async with running_ingest(mosquitto, tmp_path):
            await stack.enter_async_context(running(uplink))  # central's state is retained
            await ob.append([tel(i) for i in range(5)])
            await until(lambda: uplink.counters.records_acked == 5, "the first records acked")
            assert (uplink.counters.central_online, uplink.counters.batches_resent) == (0, 0)
        await until(lambda: uplink.central_state is not None and not uplink.central_state.online,
                    "central's offline state")
        async with running_ingest(mosquitto, tmp_path):
            await until(lambda: uplink.counters.central_online == 1, "central's return")
            await ob.append([tel(i) for i in range(5, 10)])
            await until(lambda: uplink.counters.records_acked == 10, "the next records acked")
        assert uplink.counters.central_online == 1
