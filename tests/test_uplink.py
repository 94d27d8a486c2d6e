"""The MQTT uplink against a real Mosquitto and a tiny acking "central" in the test."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from edge_agent.outbox.store import NewRecord, Outbox, read_status
from edge_agent.uplink.link import Uplink
from edge_agent.uplink.mqtt_config import MqttConfig
from protocols import topics
from protocols.envelope import (
    Ack,
    Birth,
    DataBatch,
    RecordKind,
    State,
    decode,
    encode,
    ranges_from_seqs,
)
from runtime.mqtt import Client as MqttClient
from tests.helpers import Mosquitto, background, python_env, until


class TinyCentral:
    """Subscribes to every gateway's `up/#`, records what arrives, and acks data when told to."""

    def __init__(self, broker: Mosquitto) -> None:
        self.broker = broker
        self.acking = True
        self.ack_delay_s = 0.0  # > 0: an overloaded central that acks late
        self.seen: Counter[int] = Counter()
        self.first_seen: dict[int, float] = {}
        self.births: list[Birth] = []
        self.historical: set[int] = set()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:  # reconnect: the tests kill the broker
            try:
                async with MqttClient(self.broker.host, self.broker.port,
                                          identifier=f"central-{uuid.uuid4().hex[:6]}") as client:
                    await client.subscribe(f"{topics.PREFIX}/+/up/#", qos=1)
                    async for msg in client.messages:
                        await self._handle(client, msg)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.1)

    async def _handle(self, client: aiomqtt.Client, msg: aiomqtt.Message) -> None:
        assert isinstance(msg.payload, bytes)
        decoded = decode(msg.payload)
        if isinstance(decoded, Birth):
            self.births.append(decoded)
        elif isinstance(decoded, DataBatch):
            now = time.monotonic()
            for r in decoded.records:
                self.seen[r.seq] += 1
                self.first_seen.setdefault(r.seq, now)
                if r.historical:
                    self.historical.add(r.seq)
            if self.acking:
                ack = Ack(decoded.stream, ranges_from_seqs(r.seq for r in decoded.records))
                if self.ack_delay_s:
                    asyncio.get_running_loop().call_later(
                        self.ack_delay_s, lambda: asyncio.ensure_future(
                            client.publish(topics.down(decoded.gw, "ack"), encode(ack), qos=1,
                                           timeout=0.5)))
                    return
                # Short timeout: aiomqtt's publish waits out its timeout if the broker dies.
                await client.publish(topics.down(decoded.gw, "ack"), encode(ack), qos=1,
                                     timeout=0.5)

    async def __aenter__(self) -> TinyCentral:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0.2)  # subscribed before the uplink starts
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def new_gw() -> str:
    return f"gw-{uuid.uuid4().hex[:8]}"


@contextlib.asynccontextmanager
async def running(uplink: Uplink) -> AsyncIterator[Uplink]:
    async with background(uplink.run(), "uplink.mqtt"):
        yield uplink


def make_uplink(ob: Outbox, broker: Mosquitto, gw: str, **kw: Any) -> Uplink:
    birth = Birth(gw=gw, stream="", boot_id="", version="")
    on_command = kw.pop("on_command", None)
    kw.setdefault("backlog_batch_size", kw.get("batch_size", 500))
    return Uplink(gw=gw, outbox=ob, mqtt=MqttConfig(host=broker.host, port=broker.port, **kw),
                  boot_id="boot-1", version="0.1.0", birth=birth, on_command=on_command)


def tel(i: int) -> NewRecord:
    return NewRecord(RecordKind.TELEMETRY, 1_700_000_000_000 + i, f"d{i % 5}/gas", float(i))


async def retained_state(broker: Mosquitto, gw: str) -> State:
    async with MqttClient(broker.host, broker.port) as client:
        await client.subscribe(topics.up(gw, "state"), qos=1)
        async with asyncio.timeout(5):
            async for msg in client.messages:
                assert isinstance(msg.payload, bytes)
                state = decode(msg.payload)
                assert isinstance(state, State)
                return state
    raise AssertionError("unreachable")


async def test_records_are_delivered_and_marked(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Everything appended reaches central, is marked delivered on ack, and new appends go promptly."""
    gw = new_gw()
    commands: list[bytes] = []
    async with Outbox.open(tmp_path / "o.db") as ob, TinyCentral(mosquitto) as central:
        await ob.append([tel(i) for i in range(1200)])
        await ob.append([NewRecord(RecordKind.ALARM, 5, "d1/gas", 30.0)])
        uplink = make_uplink(ob, mosquitto, gw, batch_size=200, on_command=commands.append)
        async with running(uplink):
            await until(lambda: uplink.connected, what="connect")
            await until(lambda: len(central.seen) == 1201, what="all records at central")
            await until(lambda: ob.stats(), what="stats")  # the outbox answers while busy
            await until(lambda: _backlog_is(ob, 0), what="backlog drained")
            assert central.first_seen[1201] <= min(central.first_seen.values())  # alarm first
            assert [b.stream for b in central.births] == [ob.stream]

            t0 = time.monotonic()
            (seq,) = await ob.append([tel(5000)])
            await until(lambda: seq in central.seen, timeout=2, what="new record")
            assert time.monotonic() - t0 < 1.0

            async with MqttClient(mosquitto.host, mosquitto.port) as op:
                await op.publish(topics.down(gw, "cmd"), b"\x01signed", qos=1)
            await until(lambda: commands, what="command")
            assert commands == [b"\x01signed"]
            await until(lambda: uplink.counters.records_acked == 1202, what="last ack")
            assert uplink.counters.acks >= 7
            assert await ob.get_meta("uplink_state") == "connected"
        stats = await ob.stats()
        assert (stats.backlog, stats.delivered_total) == (0, 1202)
        assert await ob.get_meta("uplink_state") == "stopped"
    assert (await retained_state(mosquitto, gw)).online is False  # graceful stop says so


async def _backlog_is(ob: Outbox, n: int) -> bool:
    return (await ob.stats()).backlog == n


async def test_unacked_batches_are_resent_after_timeout(tmp_path: Path,
                                                       mosquitto: Mosquitto) -> None:
    """Without acks a batch goes again after ack_timeout_s (not before); foreign acks mark nothing."""
    gw = new_gw()
    async with Outbox.open(tmp_path / "o.db") as ob, TinyCentral(mosquitto) as central:
        central.acking = False
        await ob.append([tel(i) for i in range(10)])
        uplink = make_uplink(ob, mosquitto, gw, ack_timeout_s=0.6)
        async with running(uplink):
            await until(lambda: central.seen, what="first send")
            t_first = time.monotonic()
            async with MqttClient(mosquitto.host, mosquitto.port) as other:
                foreign = Ack(stream="f" * 32, ranges=((1, 1000),))
                await other.publish(topics.down(gw, "ack"), encode(foreign), qos=1)
            await until(lambda: uplink.counters.acks_foreign == 1, what="foreign ack")
            await until(lambda: min(central.seen.values()) >= 2, what="resend")
            assert time.monotonic() - t_first >= 0.5
            assert uplink.counters.batches_resent >= 1
            assert (await ob.stats()).backlog == 10

            central.acking = True
            await until(lambda: _backlog_is(ob, 0), what="delivered once acked")


async def test_broker_kill_mid_stream_loses_nothing(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """After a broker SIGKILL and restart every record reaches central and the outbox drains."""
    gw = new_gw()
    async with Outbox.open(tmp_path / "o.db") as ob, TinyCentral(mosquitto) as central:
        await ob.append([tel(i) for i in range(3000)])
        uplink = make_uplink(ob, mosquitto, gw, batch_size=100, max_inflight=4, ack_timeout_s=1.0)
        async with running(uplink):
            await until(lambda: len(central.seen) >= 300, what="stream under way")
            mosquitto.kill()
            await until(lambda: not uplink.connected, what="uplink notices")
            await ob.append([tel(i) for i in range(3000, 3500)])  # written while offline
            await asyncio.sleep(0.3)
            mosquitto.start()
            await until(lambda: _backlog_is(ob, 0), timeout=20, what="backlog drained")
            assert set(central.seen) == set(range(1, 3501))
            assert uplink.connected and uplink.counters.connects == 2


async def _wait_status(db: Path, uplink_state: str) -> Any:
    await until(lambda: read_status(db).meta.get("uplink_state") == uplink_state, what="status")
    return read_status(db)


_UPLINK_PROC = """
import asyncio, sys
from pathlib import Path
from edge_agent.outbox.store import Outbox
from edge_agent.uplink.link import Uplink
from edge_agent.uplink.mqtt_config import MqttConfig
from protocols.envelope import Birth

async def main(db, host, port, gw):
    async with Outbox.open(Path(db)) as ob:
        up = Uplink(gw=gw, outbox=ob, mqtt=MqttConfig(host=host, port=int(port), keepalive_s=5,
                                                      backlog_batch_size=500),
                    boot_id="b", version="v", birth=Birth(gw=gw, stream="", boot_id="", version=""))
        await up.run()

asyncio.run(main(*sys.argv[1:]))
"""


async def test_state_is_online_and_will_says_offline_on_kill(tmp_path: Path,
                                                            mosquitto: Mosquitto) -> None:
    """The retained state is online while the agent runs and the Will turns it offline on kill -9."""
    gw, db = new_gw(), tmp_path / "o.db"
    proc = subprocess.Popen([sys.executable, "-c", _UPLINK_PROC, str(db), mosquitto.host,
                             str(mosquitto.port), gw], env=python_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with MqttClient(mosquitto.host, mosquitto.port) as client:
            await client.subscribe(topics.up(gw, "state"), qos=1)
            states: list[State] = []

            async def next_state() -> State:
                async for msg in client.messages:
                    assert isinstance(msg.payload, bytes)
                    state = decode(msg.payload)
                    assert isinstance(state, State)
                    states.append(state)
                    return state
                raise AssertionError("unreachable")

            async with asyncio.timeout(10):
                online = await next_state()
            assert online.online and online.boot_id == "b"
            status = await _wait_status(db, "connected")
            assert online.stream == status.stream

            proc.send_signal(signal.SIGKILL)
            async with asyncio.timeout(5):
                while (await next_state()).online:
                    pass
            assert states[-1].stream == status.stream
    finally:
        proc.kill()
        proc.wait(timeout=10)


async def test_late_acks_do_not_shorten_the_resend_timeout(tmp_path: Path,
                                                          mosquitto: Mosquitto) -> None:
    """A central that acks after the timeout gets fewer resends over time, not one per timeout."""
    gw = new_gw()
    async with Outbox.open(tmp_path / "o.db") as ob, TinyCentral(mosquitto) as central:
        central.ack_delay_s = 0.9
        uplink = make_uplink(ob, mosquitto, gw, ack_timeout_s=0.3)
        async with running(uplink):
            await until(lambda: uplink.connected, what="connect")
            t0 = time.monotonic()
            while time.monotonic() - t0 < 6.0:  # a steady trickle of new records
                await ob.append([tel(int((time.monotonic() - t0) * 1000))])
                await asyncio.sleep(0.2)
            resent = uplink.counters.batches_resent
            sent = uplink.counters.batches_sent
    # Resetting the timeout on every (late) ack would resend nearly every batch once or more;
    # backing off keeps resends a small fraction of what was sent.
    assert sent > 10
    assert resent < sent / 2, (resent, sent)


async def test_a_connection_closed_before_connack_fails_the_attempt_at_once() -> None:
    """A link that closes every connection at once (proxy in drop mode) fails each connect
    attempt within its CONNACK wait instead of after the client's whole timeout (here 60 s),
    so the gateway notices a returning link within its reconnect back-off."""
    from runtime.mqtt import Client as _Client
    from tests.netproxy import LinkProxy

    proxy = LinkProxy("127.0.0.1", 9)  # upstream never reached in drop mode
    proxy.start()
    proxy.set_mode("drop")
    try:
        for _ in range(3):
            with pytest.raises(aiomqtt.MqttError, match="before CONNACK"):
                # The CONNACK wait is shortened from its 5 s default: what is checked is that
                # it, not the 60 s timeout, ends the attempt.
                async with asyncio.timeout(30):
                    async with _Client("127.0.0.1", proxy.port, identifier="gw-x", timeout=60,
                                       connect_timeout=1.0):
                        pass
    finally:
        proxy.stop()
