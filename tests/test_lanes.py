"""Lanes after an outage (§4.2): newest state first, then alarms and events, then history
oldest-first, with live data flowing through a paced backlog drain (real Mosquitto)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from edge_agent.cli.app import app
from edge_agent.config.site import OutboxConfig
from edge_agent.outbox.lanes import records_of
from edge_agent.outbox.store import NewRecord, Outbox
from edge_agent.uplink.link import Uplink
from edge_agent.uplink.mqtt_config import MqttConfig
from edge_agent.uplink.pacing import BacklogPacer
from protocols import topics
from protocols.envelope import (
    Ack,
    Birth,
    DataBatch,
    Flag,
    RecordKind,
    decode,
    encode,
    ranges_from_seqs,
)
from runtime.mqtt import Client as MqttClient
from tests.helpers import Mosquitto, python_env, until
from tests.netproxy import LinkProxy

TEL, ALARM, EVENT = RecordKind.TELEMETRY, RecordKind.ALARM, RecordKind.EVENT
runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})


def tel(i: int, point: str) -> NewRecord:
    return NewRecord(TEL, 1_767_300_000_000 + i * 1000, point, float(i))


# --- order ------------------------------------------------------------------------------------


async def _outage(ob: Outbox, age_s: float = 0.25) -> dict[str, list[int]]:
    """Three points' history with alarms and events in between, all older than the window."""
    seqs: dict[str, list[int]] = {"history": [], "alarm": [], "event": []}
    for i in range(6):
        s = await ob.append([tel(i, f"d/p{k}") for k in range(3)])
        seqs["history"] += s
        if i % 2:
            seqs["alarm"] += await ob.append([NewRecord(ALARM, i, "d/p1", 30.0)])
        if i % 3 == 0:
            seqs["event"] += await ob.append([NewRecord(EVENT, i, None, "door")])
    await asyncio.sleep(age_s)  # everything so far is now older than the live window
    return seqs


async def test_after_an_outage_newest_state_then_alarms_events_then_history(tmp_path: Path) -> None:
    """Newest record per point first, then alarms, events, and history oldest-first, flagged."""
    async with Outbox.open(tmp_path / "o.db", live_window_s=0.2) as ob:
        seqs = await _outage(ob)
        (live,) = await ob.append([tel(100, "d/p0")])  # the link is back; p0 has a new value
        batch = await ob.next_batch(1000)
        order = [r.seq for r in batch]
        newest = [live, seqs["history"][-2], seqs["history"][-1]]  # p0 live, p1 and p2 last
        assert sorted(order[:3]) == sorted(newest)
        assert order[3:3 + len(seqs["alarm"])] == seqs["alarm"]
        n = 3 + len(seqs["alarm"])
        assert order[n:n + len(seqs["event"])] == seqs["event"]
        history = [s for s in seqs["history"] if s not in newest]
        assert order[n + len(seqs["event"]):] == history
        by_seq = {r.seq: r for r in batch}
        assert all(by_seq[s].historical for s in history)
        assert not by_seq[live].historical
        assert not any(by_seq[s].flags & Flag.HISTORICAL for s in seqs["alarm"] + seqs["event"])


async def test_priority_and_backlog_parts_split_the_lanes(tmp_path: Path) -> None:
    """`part="priority"` never returns history; `next_backlog` only history, oldest first."""
    async with Outbox.open(tmp_path / "o.db", live_window_s=0.2) as ob:
        seqs = await _outage(ob)
        (live,) = await ob.append([tel(100, "d/p9")])
        prio = [r.seq for r in await ob.next_batch(1000, part="priority")]
        back = list((await ob.next_backlog(1000)).seqs)
        newest = {live, *seqs["history"][-3:]}
        assert set(prio) == newest | set(seqs["alarm"]) | set(seqs["event"])
        assert back == seqs["history"]  # in-flight exclusion is the caller's job
        rest = await ob.next_backlog(1000, skip=ranges_from_seqs(prio))
        assert list(rest.seqs) == [s for s in seqs["history"] if s not in newest]


async def test_backlog_columns_are_the_records_the_lane_read_gives(tmp_path: Path) -> None:
    """The drain reads the backlog as columns (SQLite flags it HISTORICAL): the same records,
    values of every type and attrs included, as the record-by-record read of `part="all"`,
    whether a row's age comes from this boot's clock or, for another boot's rows or rows
    without a boot-time stamp, from the wall clock."""
    path = tmp_path / "o.db"
    async with Outbox.open(path, live_window_s=0.2) as ob:
        values: list[Any] = [1.5, 7, True, False, "open", None, 2.0**40 + 0.5]
        await ob.append([NewRecord(TEL, 1_767_300_000_000 + i, f"d/p{i % 3}", v,
                                   flags=Flag.BAD_QUALITY if i == 1 else Flag.NONE,
                                   attrs={"unit": "ppm"} if i == 4 else None)
                         for i, v in enumerate(values * 3)])
        await asyncio.sleep(0.25)
        now_ms = time.time_ns() // 1_000_000
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            # another boot's rows, young and old by the wall clock; rows without mono_ms
            conn.execute("UPDATE records SET boot = 999, created_ms = ? WHERE seq % 4 = 1",
                         (now_ms,))
            conn.execute("UPDATE records SET boot = 999, created_ms = ? WHERE seq % 4 = 2",
                         (now_ms - 60_000,))
            conn.execute("UPDATE records SET mono_ms = NULL, created_ms = ? WHERE seq % 4 = 3",
                         (now_ms,))
        back = records_of(await ob.next_backlog(1000))
        by_seq = {r.seq: r for r in await ob.next_batch(1000)}
        assert [r.seq for r in back] == list(range(1, len(values) * 3 + 1))
        assert [(r, type(r.value)) for r in back] == [(by_seq[r.seq], type(by_seq[r.seq].value))
                                                      for r in back]
        assert {r.seq % 4 for r in back if not r.historical} == {1, 3}
        cols = await ob.next_backlog(1000, skip=((3, 5),))
        assert list(cols.seqs) == [1, 2, *range(6, len(values) * 3 + 1)]


async def test_without_backlog_lanes_are_plain_priority_order(tmp_path: Path) -> None:
    """With nothing older than the window there is no snapshot: alarms, events, telemetry."""
    async with Outbox.open(tmp_path / "o.db", live_window_s=60) as ob:
        await ob.append([tel(1, "a"), tel(2, "b")])
        (alarm,) = await ob.append([NewRecord(ALARM, 3, "a", 1.0)])
        assert [r.seq for r in await ob.next_batch(10)] == [alarm, 1, 2]


# --- pacing -----------------------------------------------------------------------------------


def test_pacer_slow_starts_then_grows_under_target_and_halves_over_it() -> None:
    """Slow start (+1 batch per good ack) up to the first slow ack; then AIMD: +1 batch per
    window of good acks, halve on a slow ack (once per RTT), 1 on timeout."""
    p = BacklogPacer(max_window=20, batch_size=100, target_rtt_s=0.1)
    t = 0.0
    for n in range(1, 8):
        t += 0.05
        p.on_ack(0.05, t)
        assert p.window == 1 + n  # slow start: one more batch per timely ack
    p.on_ack(0.5, t + 0.01)
    assert p.window == 4  # halved, and slow start is over
    p.on_ack(0.5, t + 0.02)  # within one smoothed RTT of the last decrease: no second halving
    assert p.window == 4
    t += 0.05
    for _ in range(5):  # congestion avoidance: about a window of timely acks adds one batch
        p.on_ack(0.05, t)
    assert p.window == 5
    for _ in range(200):
        p.on_ack(0.05, t)
    assert p.window == 20  # capped below the uplink's in-flight limit
    p.on_timeout()
    assert p.window == 1 and p.ssthresh == 10
    p.on_ack(0.05, t + 1)
    p.on_ack(0.05, t + 1)
    assert p.window == 3  # slow start again, up to the halved threshold
    p.reset()
    assert p.window == 1 and p.ssthresh == 20


def test_pacer_shrinks_backlog_batches_that_time_out_and_grows_them_back() -> None:
    """A narrow link where a big batch cannot get through within the ack timeout: each
    timeout halves the backlog batch (not below the live size), timely acks double it back."""
    p = BacklogPacer(max_window=4, batch_size=5000, min_batch_size=500, target_rtt_s=1.0)
    assert p.allowance(0.0) == 5000
    sizes = []
    for _ in range(5):
        p.on_timeout()
        sizes.append(p.allowance(0.0))
    assert sizes == [2500, 1250, 625, 500, 500]
    p.on_ack(2.0, 1.0)  # late (over the target): no growth
    assert p.allowance(1.0) == 500
    p.on_ack(0.5, 2.0)
    p.on_ack(0.5, 3.0)
    assert p.allowance(3.0) == 2000
    p.reset()  # a reconnect keeps what was learnt about the link
    assert p.allowance(3.0) == 2000 and p.snapshot(3.0).to_jsonable()["batch"] == 2000


def test_pacer_target_follows_the_base_rtt() -> None:
    """Without a fixed target, the target is max(2 x base, base + queue_delay_s) of the lowest
    RTT seen."""
    p = BacklogPacer(max_window=4, batch_size=100, queue_delay_s=0.25)
    p.on_ack(0.4, 1.0)
    p.on_ack(0.3, 2.0)
    assert p.base_rtt == 0.3 and abs((p.target or 0) - 0.6) < 1e-9  # 2 x base
    p.on_ack(0.02, 3.0)
    assert p.base_rtt == 0.02 and abs((p.target or 0) - 0.27) < 1e-9  # base + 250 ms


def test_pacer_token_bucket_caps_records_per_second() -> None:
    """Over 10 s of asking as fast as allowed, the bucket hands out ~rate x 10 records."""
    p = BacklogPacer(max_window=4, batch_size=500, max_points_per_s=1000)
    t, sent = 0.0, 0
    while t < 10.0:
        n = p.allowance(t)
        if n:
            p.took(n, t)
            sent += n
        t += 0.01
    assert 9_500 <= sent <= 10_600  # rate x 10 s, plus at most the first chunk
    p.took(p.allowance(t), t)  # bucket emptied: the next chunk (100 ms of tokens) is ahead
    assert p.allowance(t) == 0 and 0 < p.wait_s(t) <= 0.1


# --- a real drain -----------------------------------------------------------------------------


class SlowCentral:
    """Acks every data batch after `commit_s` (central's commit), noting when each seq was acked."""

    def __init__(self, broker: Mosquitto, commit_s: float) -> None:
        self.broker, self.commit_s = broker, commit_s
        self.acked_at: dict[int, float] = {}
        self.historical: set[int] = set()
        self.first_backlog_at: float | None = None

    async def run(self) -> None:
        async with MqttClient(self.broker.host, self.broker.port,
                                  identifier=f"central-{uuid.uuid4().hex[:6]}") as client:
            await client.subscribe(f"{topics.PREFIX}/+/up/data", qos=1)
            async for msg in client.messages:
                assert isinstance(msg.payload, bytes)
                batch = decode(msg.payload)
                assert isinstance(batch, DataBatch)
                await asyncio.sleep(self.commit_s)
                ack = Ack(batch.stream, ranges_from_seqs(r.seq for r in batch.records))
                await client.publish(topics.down(batch.gw, "ack"), encode(ack), qos=1)
                now = time.monotonic()
                for r in batch.records:
                    self.acked_at.setdefault(r.seq, now)
                    if r.historical:
                        self.historical.add(r.seq)
                        if self.first_backlog_at is None:
                            self.first_backlog_at = now


@contextlib.asynccontextmanager
async def running(*coros: Any) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


async def test_live_record_is_acked_promptly_during_a_big_backlog_drain(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    """A live record appended mid-drain is acked while >5000 history records still wait, and
    the drain stays under its records-per-second ceiling."""
    gw, rate, n_backlog = f"gw-{uuid.uuid4().hex[:8]}", 5000.0, 20_000
    central = SlowCentral(mosquitto, commit_s=0.01)
    async with Outbox.open(tmp_path / "o.db", live_window_s=0.3) as ob:
        for i in range(0, n_backlog, 500):
            await ob.append([tel(j, f"d{j % 100}/v") for j in range(i, i + 500)])
        await asyncio.sleep(0.4)  # the outage: all of it is history now
        uplink = Uplink(gw=gw, outbox=ob, boot_id="b", version="v",
                        birth=Birth(gw=gw, stream="", boot_id="", version=""),
                        mqtt=MqttConfig(host=mosquitto.host, port=mosquitto.port,
                                        batch_size=250, backlog_batch_size=250, max_inflight=8,
                                        ack_timeout_s=5.0),
                        backlog=OutboxConfig(backlog_max_points_per_s=rate))
        async with running(central.run()):
            await asyncio.sleep(0.2)  # subscribed before the uplink publishes
            async with running(uplink.run()):
                await until(lambda: len(central.acked_at) >= 2000, what="drain under way")
                (live,) = await ob.append([NewRecord(TEL, 1, "live/p", 1.0)])
                await until(lambda: live in central.acked_at, timeout=5, what="live record acked")
                # It went ahead of history: when it was acked, more than a second's worth of
                # backlog at the ceiling still waited. (No wall-clock bound: CI may be slow.)
                waiting = n_backlog - sum(1 for s in central.acked_at if s <= n_backlog)
                assert waiting > 5000, waiting
                assert live not in central.historical
                # Central has acked everything; the uplink marks the last acks delivered a moment
                # later, so wait for its count too before it is cancelled.
                await until(lambda: len(central.acked_at) == n_backlog + 1
                            and uplink.counters.records_acked == n_backlog + 1, timeout=30,
                            what="backlog drained")
                assert central.first_backlog_at is not None
                duration = max(central.acked_at.values()) - central.first_backlog_at
                # The snapshot (100 newest values) is not paced, and the bucket holds at most
                # half a second of tokens; the rest is held to the ceiling.
                assert (n_backlog - 100 - rate / 2) / duration <= rate * 1.1
                assert uplink.counters.backlog_batches_sent > 0
                assert uplink.pacer.window >= 1
        stats = await ob.stats()
        assert stats.backlog == 0 and stats.ack_rate_per_s and stats.ack_rate_per_s > 0
        assert len(central.historical) >= n_backlog - 100


async def test_backlog_drains_over_a_link_too_narrow_for_its_batches(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    """A link carrying 60 kB/s and a 0.5 s ack timeout: a 4,000-record backlog batch (~100 kB)
    cannot be acked in time, so the next batches are smaller (less to send again); every
    record arrives and the outbox drains (duplicates only on the wire)."""
    gw, n_backlog = f"gw-{uuid.uuid4().hex[:8]}", 8000
    central = SlowCentral(mosquitto, commit_s=0.0)
    sizes: list[int] = []
    proxy = LinkProxy(mosquitto.host, mosquitto.port)
    proxy.start()
    proxy.set_mode("narrow", rate_bps=60_000)
    try:
        async with Outbox.open(tmp_path / "o.db", live_window_s=0.3) as ob:
            for i in range(0, n_backlog, 500):
                await ob.append([tel(j, f"d{j % 100}/v") for j in range(i, i + 500)])
            await asyncio.sleep(0.4)  # all of it is history now
            uplink = Uplink(gw=gw, outbox=ob, boot_id="b", version="v",
                            birth=Birth(gw=gw, stream="", boot_id="", version=""),
                            mqtt=MqttConfig(host=proxy.host, port=proxy.port, batch_size=250,
                                            backlog_batch_size=4000, max_inflight=4,
                                            ack_timeout_s=0.5))
            first = uplink.pacer.allowance(0.0)
            pacer_timeout = uplink.pacer.on_timeout

            def on_timeout() -> None:  # what the next backlog batch may hold after a timeout
                pacer_timeout()
                sizes.append(uplink.pacer.batch)

            uplink.pacer.on_timeout = on_timeout  # type: ignore[method-assign]
            async with running(central.run()):
                await asyncio.sleep(0.2)
                async with running(uplink.run()):
                    def drained() -> bool:
                        return (len(central.acked_at) == n_backlog
                                and uplink.counters.records_acked == n_backlog)
                    await until(drained, timeout=60, what="every record acked")
            assert (await ob.stats()).backlog == 0
        assert first == 4000
        assert uplink.counters.batches_resent >= 1  # the big first batch timed out
        assert min(sizes) <= 2000  # and the next ones were smaller
        assert set(central.acked_at) == set(range(1, n_backlog + 1))
    finally:
        proxy.stop()


# --- the technician's view ------------------------------------------------------------------

SITE = """\
[gateway]
id = "gw-lanes"
data_dir = "data"

[outbox]
live_window_s = 1.0
max_bytes = 8388608
"""


async def test_status_json_shows_lanes_drain_and_budget(tmp_path: Path) -> None:
    """`status --json` shows per-lane counts and ages, drain rate/ETA, budget and counters."""
    (tmp_path / "site.toml").write_text(SITE)
    async with Outbox.open(tmp_path / "data" / "outbox.db", live_window_s=1.0,
                           max_bytes=8 * 2**20) as ob:
        seqs = await _outage(ob, age_s=1.1)
        await ob.append([tel(99, "d/p0")])
        await ob.mark_delivered([(seqs["history"][0], seqs["history"][2])])
    result = runner.invoke(app, ["status", "-c", str(tmp_path / "site.toml"), "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    lanes = {k: v["count"] for k, v in r["lanes"].items()}
    assert lanes == {"alarm": len(seqs["alarm"]), "event": len(seqs["event"]), "live": 1,
                     "backlog": len(seqs["history"]) - 3}
    assert r["lanes"]["backlog"]["oldest_age_s"] > 0
    assert r["drain"]["ack_rate_per_s"] > 0 and r["drain"]["eta_s"] > 0
    assert r["budget"]["max_bytes"] == 8 * 2**20 and r["budget"]["thinned_total"] == 0
    assert r["clock"]["suspect"] is False
    table = runner.invoke(app, ["status", "-c", str(tmp_path / "site.toml")])
    assert table.exit_code == 0 and "backlog 15" in table.output and "thinned 0" in table.output


async def test_buffer_watch_json_follows_the_drain_to_zero(tmp_path: Path) -> None:
    """`buffer watch --json` prints falling backlog lines and exits 0 when it reaches 0."""
    (tmp_path / "site.toml").write_text(SITE)
    db = tmp_path / "data" / "outbox.db"
    async with Outbox.open(db) as ob:
        await ob.append([tel(i, "d/p") for i in range(400)])
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "buffer", "watch", "-c",
             str(tmp_path / "site.toml"), "--json", "--interval", "0.1", "--timeout", "20"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=python_env(), cwd=tmp_path)
        try:
            assert proc.stdout is not None
            first_line = await asyncio.to_thread(proc.stdout.readline)
            for first in range(1, 401, 50):
                await asyncio.sleep(0.15)
                await ob.mark_delivered([(first, first + 49)])
            out, errs = await asyncio.to_thread(proc.communicate, timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, errs
    lines = [json.loads(line) for line in (first_line + out).decode().splitlines()]
    backlogs = [line["backlog"] for line in lines]
    assert backlogs == sorted(backlogs, reverse=True) and backlogs[0] > 0 and backlogs[-1] == 0
    assert lines[-1]["done"] is True and lines[-1]["delivered"] == 400
    assert any(line["rate_per_s"] for line in lines)
