"""The uplink's record of what it sent survives a SIGKILL (DESIGN.md §4.4, §8): the agent keeps
the seqs sent and not yet acked in the outbox while it sends (`Uplink._save_sent`, every state
interval), so after a kill its restart takes central's acks of the killed run's batches as the
genuine acks they are: it marks them delivered and does not send those records again.

Real parts: the agent is a process (`edge-agent run`), killed with SIGKILL while its batches
wait for acks; a private Mosquitto; in this test a plain subscriber in central's place, which
acks only when the test says so, so that what is in flight at the kill is known.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import aiomqtt
from typer.testing import CliRunner

from edge_agent.cli.app import app as edge_cli
from edge_agent.config.site import load_config
from edge_agent.control.client import ControlClientError, request
from edge_agent.outbox.store import NewRecord, Outbox
from protocols import topics
from protocols.envelope import Ack, DataBatch, RecordKind, decode, encode, ranges_from_seqs
from runtime.mqtt import Client as MqttClient
from tests.helpers import AgentProcess, Mosquitto, background, until

GW = "gw-sent-kill"
EVENTS = 60  # in the outbox before the agent starts
BATCH, IN_FLIGHT = 10, 4  # the first run: 40 events in flight when it is killed
T0 = 1_795_000_000_000

until = partial(until, timeout=40.0, interval=0.2)  # the save comes every 10 s (state loop)


class Receiver:
    """Central's place on the broker: every data batch the gateway publishes, in order; acks
    each one once `acking` is on (and, when turned on, those it holds unacked)."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.batches: list[DataBatch] = []
        self.unacked: list[DataBatch] = []
        self.acking = False

    @property
    def seqs(self) -> list[int]:
        """Every seq received, repeats included, in arrival order."""
        return [r.seq for b in self.batches for r in b.records]

    async def ack(self, batches: list[DataBatch]) -> None:
        for b in batches:
            ack = Ack(stream=b.stream, ranges=ranges_from_seqs([r.seq for r in b.records]))
            await self.client.publish(topics.down(GW, "ack"), encode(ack), qos=1)

    async def start_acking(self) -> None:
        self.acking = True
        held, self.unacked = self.unacked, []
        await self.ack(held)

    async def receive_loop(self) -> None:
        async for msg in self.client.messages:
            batch = decode(bytes(msg.payload))
            assert isinstance(batch, DataBatch)
            self.batches.append(batch)
            if self.acking:
                await self.ack([batch])
            else:
                self.unacked.append(batch)


@contextlib.asynccontextmanager
async def receiving(broker: Mosquitto) -> AsyncIterator[Receiver]:
    async with MqttClient(broker.host, broker.port,
                          identifier=f"receiver-{uuid.uuid4().hex[:6]}") as client:
        await client.subscribe(topics.up(GW, "data"), qos=1)
        receiver = Receiver(client)
        async with background(receiver.receive_loop(), "receiver"):
            yield receiver


def event(i: int) -> NewRecord:
    return NewRecord(RecordKind.EVENT, T0 + i * 1000, None, None, attrs={"event": "door", "n": i})


def site(path: Path, broker: Mosquitto, *, batch_size: int, max_inflight: int) -> Path:
    path.write_text(f'[gateway]\nid = "{GW}"\ndata_dir = "{path.parent / "data"}"\n'
                    f"[mqtt]\nport = {broker.port}\nbatch_size = {batch_size}\n"
                    f"max_inflight = {max_inflight}\nack_timeout_s = 120\n"
                    "reconnect_min_s = 0.1\nreconnect_max_s = 0.5\n")
    return path


async def status(config: Path) -> dict[str, Any]:
    """`edge-agent status --json`, as a technician runs it."""
    res = await asyncio.to_thread(CliRunner().invoke, edge_cli,
                                  ["status", "-c", str(config), "--json"])
    assert res.exit_code == 0, res.output
    report: dict[str, Any] = json.loads(res.stdout)
    return report


def in_flight(report: dict[str, Any]) -> int:
    """Batches in flight as the agent's state loop last kept them, right after its save."""
    return int(json.loads(report["meta"].get("uplink_pacing", "{}")).get("in_flight", -1))


async def test_a_restart_after_sigkill_knows_what_the_killed_run_sent(
        mosquitto: Mosquitto, tmp_path: Path) -> None:
    """SIGKILLed with 4 batches in flight, the agent has kept their seqs as sent-unacked;
    restarted, it takes the acks central sent meanwhile as genuine (none refused), does not
    send those records again, and at the end central holds every record exactly once."""
    config = site(tmp_path / "site.toml", mosquitto, batch_size=BATCH, max_inflight=IN_FLIGHT)
    outbox = tmp_path / "data" / "outbox.db"
    async with Outbox.open(outbox) as ob:
        await ob.append([event(i) for i in range(EVENTS)])
    async with receiving(mosquitto) as central:
        with AgentProcess(config) as agent:
            agent.start()
            await until(lambda: len(central.batches) == IN_FLIGHT, "4 batches in flight")
            # The state loop saves the seqs sent, then keeps its pacing: once that shows the
            # 4 batches, the save before it has seen them. Then the kill, mid-send.
            await until(lambda: _in_flight_is(config, IN_FLIGHT), "the state loop's save")
            agent.kill()
            sent = sorted(central.seqs)
            assert sent == list(range(1, BATCH * IN_FLIGHT + 1))
            killed = await status(config)
            assert not killed["agent"]["running"] and killed["delivered_total"] == 0
            assert json.loads(killed["meta"]["uplink_sent_unacked"]) == [[1, len(sent)]]

            # Central commits and acks while the agent is down: the broker keeps the acks for
            # the agent's session. An alarm comes meanwhile; the restarted agent sends it
            # first, alone, and it holds the only slot (unacked) until those acks are in.
            await central.ack(central.unacked)
            central.unacked = []
            async with Outbox.open(outbox) as ob:
                [alarm] = await ob.append([NewRecord(
                    RecordKind.ALARM, T0, "gas-1/gas_lel", 57.5,
                    attrs={"alarm_id": "gas-1/gas_lel/high", "rule": "high", "state": "raised",
                           "level": 2})])
            config = site(config, mosquitto, batch_size=1, max_inflight=1)
            agent.start()
            live = await until(partial(_acks_heard, config, IN_FLIGHT), "the acks kept for it")
            assert live["acks_refused"] == 0 and live["ack_records_unsent"] == 0, live
            await until(partial(_delivered, config, len(sent)), "the 40 marked delivered")
            assert central.seqs[len(sent):] == [alarm]  # the alarm holds the one slot

            await central.start_acking()
            done = await until(partial(_drained, config), "every record delivered")
            assert agent.stop() == 0
    copies = Counter(central.seqs)
    assert sorted(copies) == list(range(1, done["last_seq"] + 1))
    assert set(copies.values()) == {1}, {s: n for s, n in copies.items() if n > 1}
    assert done["uplink"]["acks_refused"] == 0


async def _in_flight_is(config: Path, n: int) -> bool:
    return in_flight(await status(config)) == n


async def _acks_heard(config: Path, n: int) -> dict[str, Any] | None:
    """The running agent's uplink counters (its own status, over the control socket) once it
    has heard `n` acks."""
    cfg = load_config(config, check_profiles=False)
    try:
        live = await asyncio.to_thread(request, cfg.control_socket_path, "status")
    except ControlClientError:  # not listening yet
        return None
    uplink: dict[str, Any] = live["uplink"]
    return uplink if uplink.get("acks", 0) >= n else None


async def _delivered(config: Path, n: int) -> bool:
    return int((await status(config))["delivered_total"]) == n


async def _drained(config: Path) -> dict[str, Any] | None:
    report = await status(config)
    return report if report["live"] and report["backlog"] == 0 else None
