"""The outbox on a full disk (issue 10): faults injected into the real SQLite connection
(`max_page_count` pinned, or statements failing with SQLITE_FULL), and a real tmpfs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from typer.testing import CliRunner

from edge_agent.agent import _cancel_stragglers
from edge_agent.alarms.rules import Rule, RuleEngine, RuleKind
from edge_agent.alarms.store import AlarmStore, read_alarms
from edge_agent.alarms.wiring import AlarmRules
from edge_agent.cli.app import app
from edge_agent.outbox.db import backlog_from_counters, translate
from edge_agent.outbox.store import NewRecord, Outbox, OutboxDiskFullError, OutboxFullError
from protocols.envelope import RecordKind
from runtime.sqlite import SqliteOwner
from tests.diskfull import fill, free_bytes, small_fs

TEL, ALARM, EVENT = RecordKind.TELEMETRY, RecordKind.ALARM, RecordKind.EVENT
T0 = 1_700_000_000_000
DEV, P = "gas-1", "gas-1/gas_lel"


def tel(i: int, point: str = "d/p") -> NewRecord:
    return NewRecord(TEL, T0 + i, point, float(i))


def fat(i: int, point: str = "d/p") -> NewRecord:
    """Telemetry too big for the free room of any page: it needs a new (overflow) page."""
    return NewRecord(TEL, T0 + i, point, "x" * 5000)


def alarm(i: int, state: str = "raised") -> NewRecord:
    # padded like `fat`, so that a pinned page count refuses it for certain
    return NewRecord(ALARM, T0 + i, P, float(i),
                     attrs={"alarm_id": f"{P}/high", "state": state, "pad": "x" * 5000})


# --- injecting the fault into the real connection -------------------------------------------


def _pin_pages(conn: sqlite3.Connection, pages: int | None) -> None:
    if pages is None:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {int(pages)}")


async def squeeze(owner: SqliteOwner) -> None:
    """The disk is full: the real connection may not add a page (SQLITE_FULL on growth)."""
    await owner.call(lambda: _pin_pages(owner.conn, None))


async def relieve(owner: SqliteOwner) -> None:
    await owner.call(lambda: _pin_pages(owner.conn, 2**30))


def full_error() -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError("database or disk is full")
    exc.sqlite_errorcode = sqlite3.SQLITE_FULL
    exc.sqlite_errorname = "SQLITE_FULL"
    return exc


class FailingStatements:
    """The real connection, except that statements containing `needle` fail with SQLITE_FULL
    (a DELETE in WAL mode needs WAL room, which `max_page_count` cannot take away)."""

    def __init__(self, conn: sqlite3.Connection, needle: str) -> None:
        self.real = conn
        self.needle = needle

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if self.needle in sql:
            raise full_error()
        return self.real.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if self.needle in sql:
            raise full_error()
        return self.real.executemany(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@contextlib.contextmanager
def failing(owner: SqliteOwner, needle: str) -> Iterator[None]:
    real = owner._conn
    assert real is not None
    owner._conn = FailingStatements(real, needle)  # type: ignore[assignment]
    try:
        yield
    finally:
        owner._conn = real


def rows(db: Path, sql: str, *params: object) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def events(db: Path) -> list[tuple[int, dict[str, Any]]]:
    return [(s, cbor2.loads(a)) for s, a in rows(
        db, "SELECT seq, attrs FROM records WHERE kind = ? ORDER BY seq", int(EVENT))]


# --- the degradation, in the outbox ---------------------------------------------------------


async def test_full_disk_holds_alarms_in_order_and_burns_the_dropped_telemetry(
        tmp_path: Path) -> None:
    """On SQLITE_FULL alarms are held in order, telemetry is dropped and counted; once there is
    room the alarms get seqs in their order, the dropped telemetry a gap of its exact size,
    and an outbox_dropped plus an outbox_disk_full report; the counters stay consistent."""
    db = tmp_path / "o.db"
    async with Outbox.open(db) as ob:
        before = await ob.append([tel(i) for i in range(5)])
        await squeeze(ob._sqlite)
        assert await ob.append([alarm(1, "raised")]) == []  # held, no seq yet
        with pytest.raises(OutboxDiskFullError) as refused:
            await ob.append([fat(10), fat(11), fat(12), alarm(2, "cleared")])
        assert (refused.value.held, refused.value.dropped, refused.value.lost) == (1, 3, 0)
        assert isinstance(refused.value, OutboxFullError)  # callers that knew only that one
        with pytest.raises(OutboxDiskFullError):
            await ob.append([fat(13), fat(14)])
        assert await ob.append([alarm(3, "raised")]) == []
        disk = await ob.disk_status()
        assert disk["full"] and disk["held"] == 3 and disk["telemetry_dropped"] == 5
        assert (await ob.stats()).last_seq == before[-1]  # nothing of it was committed
        await relieve(ob._sqlite)
        (after,) = await ob.append([tel(20)])
        assert not (await ob.disk_status())["full"]
    kept = rows(db, "SELECT seq, kind, attrs FROM records WHERE kind = ? ORDER BY seq", int(ALARM))
    seqs = [s for s, _, _ in kept]
    assert [cbor2.loads(a)["state"] for _, _, a in kept] == ["raised", "cleared", "raised"]
    # alarm 1 at 6; telemetry 10-12 burned 7..9; alarm 2 at 10; 13-14 burned 11..12; alarm 3 at 13
    assert seqs == [6, 10, 13]
    reports = events(db)
    dropped = [a for _, a in reports if a["event"] == "outbox_dropped"]
    episode = [a for _, a in reports if a["event"] == "outbox_disk_full"]
    assert len(dropped) == 1 and len(episode) == 1
    assert (dropped[0]["records"], dropped[0]["first_seq"], dropped[0]["last_seq"],
            dropped[0]["reason"], dropped[0]["points"]) == (5, 7, 12, "disk_full", ["d/p"])
    assert (episode[0]["held"], episode[0]["telemetry_dropped"], episode[0]["held_lost"]) == (3, 5, 0)
    assert after == reports[-1][0] + 1
    present = {s for (s,) in rows(db, "SELECT seq FROM records")}
    assert set(range(1, after + 1)) - present == set(range(7, 10)) | set(range(11, 13))
    conn = sqlite3.connect(db)
    try:
        assert backlog_from_counters(conn) == len(present)
        counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
    finally:
        conn.close()
    assert counters["dropped_total"] == 5 and counters["disk_full_episodes"] == 1
    assert counters["disk_full_held"] == 3 and counters["disk_full_telemetry_dropped"] == 5


async def test_an_overflowing_ring_gives_up_the_oldest_alarm_and_reports_it(
        tmp_path: Path) -> None:
    """With room for 3 held records, 5 alarms keep the newest 3; the 2 given up burn seqs
    and are named in the loss report (held_lost), so central sees and counts the gap."""
    db = tmp_path / "o.db"
    async with Outbox.open(db, hold_records=3) as ob:
        await squeeze(ob._sqlite)
        for i in range(5):
            assert await ob.append([alarm(i, "raised" if i % 2 == 0 else "cleared")]) == []
        disk = await ob.disk_status()
        assert (disk["held"], disk["held_lost"]) == (3, 2)
        await relieve(ob._sqlite)
        assert await ob.flush_held()
    kept = rows(db, "SELECT seq, ts_ms FROM records WHERE kind = ? ORDER BY seq", int(ALARM))
    assert [(s, ts - T0) for s, ts in kept] == [(3, 2), (4, 3), (5, 4)]
    (dropped,) = [a for _, a in events(db) if a["event"] == "outbox_dropped"]
    assert (dropped["records"], dropped["first_seq"], dropped["last_seq"],
            dropped["held_lost"], dropped["telemetry"]) == (2, 1, 2, 2, 0)


async def test_delivery_marks_on_a_full_disk_are_retried_and_not_resent(tmp_path: Path) -> None:
    """An ack whose mark cannot be written is kept: those records are not handed out again,
    and the mark is written once the disk has room (the backlog then drops)."""
    async with Outbox.open(tmp_path / "o.db") as ob:
        await ob.append([tel(i) for i in range(6)])
        with failing(ob._sqlite, "DELETE FROM records"):
            assert await ob.mark_delivered([(1, 4)]) == 0
            assert [r.seq for r in await ob.next_batch(100)] == [5, 6]
            assert (await ob.disk_status())["marks_pending"] == 4
            assert await ob.backlog() == 6  # not written yet
            assert not await ob.flush_held()
        assert await ob.flush_held()
        batch = await ob.next_batch(100)
        assert await ob.backlog() == 3  # 5, 6 and the episode's report (7)
        assert [r.seq for r in batch] == [7, 5, 6]  # the event lane goes first
        (episode,) = [dict(r.attrs) for r in batch
                      if r.attrs and r.attrs.get("event") == "outbox_disk_full"]
    assert episode["marks_retried"] == 4 and episode["telemetry_dropped"] == 0


async def test_a_commit_refused_by_a_full_disk_rolls_back_cleanly(tmp_path: Path) -> None:
    """SQLITE_FULL inside a transaction leaves no transaction open and no error but the full
    one (not "cannot rollback - no transaction is active"); the next write works."""
    owner = SqliteOwner(thread_name="t", error=OutboxFullError, closed_message="closed",
                        wrap=translate)

    def open_sync() -> sqlite3.Connection:
        conn = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE t (x BLOB)")
        return conn

    async with owner.running(open_sync):
        await squeeze(owner)
        with pytest.raises(OutboxFullError, match="full"):
            await owner.call(owner.transaction, lambda c: c.executemany(
                "INSERT INTO t VALUES (?)", [(b"x" * 3000,)] * 50))
        assert not await owner.call(lambda: owner.conn.in_transaction)
        await relieve(owner)
        await owner.call(owner.transaction, lambda c: c.execute("INSERT INTO t VALUES (1)"))
        assert await owner.call(lambda: owner.conn.execute("SELECT count(*) FROM t").fetchone()) == (1,)


# --- alarm rules on a full disk -------------------------------------------------------------


async def test_alarm_rules_keep_evaluating_while_nothing_can_be_written(tmp_path: Path) -> None:
    """Outbox and alarm store both full: raise, clear, raise are still evaluated (the engine's
    state follows the gas), the records come out in order once there is room, and the alarm
    store gets the latest state when it can write again."""
    rule = Rule(DEV, P, RuleKind.HIGH, (25.0, 50.0), 2.0)
    async with Outbox.open(tmp_path / "outbox.db") as ob, \
            AlarmStore.open(tmp_path / "alarms.db") as store:
        rules = AlarmRules(RuleEngine([rule]), store, ob)
        states = []
        with failing(ob._sqlite, "INSERT INTO records"), \
                failing(store._sqlite, "INSERT INTO alarms"):
            for ts, value in ((1000, 60.0), (2000, 5.0), (3000, 30.0)):
                with pytest.raises(OutboxDiskFullError):
                    await rules.append([NewRecord(TEL, ts, P, value)])
                states.append([a.level for a in rules.engine.active()])
            assert states == [[2], [], [1]]
            assert rules.unsaved == 1 and await store.load_active() == []
        assert await ob.flush_held()
        assert await rules.save_pending()
    kept = rows(tmp_path / "outbox.db", "SELECT ts_ms, attrs FROM records WHERE kind = ?"
                " ORDER BY seq", int(ALARM))
    assert [(ts, cbor2.loads(a)["state"], cbor2.loads(a)["level"]) for ts, a in kept] == [
        (1000, "raised", 2), (2000, "cleared", 0), (3000, "raised", 1)]
    assert [(a.alarm_id, a.level, a.changed_ms) for a in read_alarms(tmp_path / "alarms.db")] == [
        (f"{P}/high", 1, 3000)]


# --- on a real small file system ------------------------------------------------------------


@pytest.fixture
def tiny(tmp_path: Path) -> Iterator[Path]:
    with small_fs(tmp_path / "fs", 4 * 2**20) as where:
        yield where


async def test_the_reserve_thins_and_drops_telemetry_long_before_enospc(tiny: Path) -> None:
    """A 4 MiB file system, 1.5 MiB reserve, no max_bytes worth mentioning: writing far more
    telemetry than fits never meets ENOSPC; the budget drops (and reports) old telemetry to
    keep the reserve free, and what it owns on disk (WAL and -shm counted) stays bounded."""
    db = tiny / "outbox.db"
    reserve = 3 * 2**19
    async with Outbox.open(db, live_window_s=0.05, disk_reserve_bytes=reserve,
                           thin_max_rounds=1) as ob:
        for chunk in range(120):  # ~6 MB of rows, well past the file system's size
            await ob.append([NewRecord(TEL, T0 + chunk * 1000 + i, f"d/p{i % 7}", float(i))
                             for i in range(600)])
        disk = await ob.disk_status()
        st = await ob.stats()
    assert not disk["full"] and disk["telemetry_dropped"] == 0
    assert st.counters["thinned_total"] + st.counters["dropped_total"] > 0
    assert free_bytes(tiny) >= reserve // 2, disk
    reports = [a for _, a in events(db) if a["event"] in ("outbox_thinned", "outbox_dropped")]
    assert sum(a["records"] for a in reports) == (st.counters["thinned_total"]
                                                  + st.counters["dropped_total"])


async def test_the_outbox_opens_on_a_full_disk_by_spending_its_ballast(tiny: Path) -> None:
    """Another process fills the disk while the agent is down: the outbox still opens (its
    ballast makes room for -shm and -wal), holds what it cannot write, writes it at close
    and lays the ballast again once the disk has room."""
    db = tiny / "outbox.db"
    ballast = tiny / "outbox.db-ballast"
    async with Outbox.open(db, ballast_bytes=256 * 1024, disk_reserve_bytes=64 * 1024) as ob:
        await ob.append([tel(i) for i in range(10)])
    assert ballast.stat().st_size == 256 * 1024
    fill(tiny / "filler")
    assert free_bytes(tiny) < 16 * 1024
    with pytest.raises(sqlite3.OperationalError), \
            contextlib.closing(sqlite3.connect(db)) as plain:  # what the agent used to die of
        plain.execute("SELECT count(*) FROM records").fetchone()
    async with Outbox.open(db, ballast_bytes=256 * 1024, disk_reserve_bytes=64 * 1024) as ob:
        assert not ballast.exists()
        fill(tiny / "filler")  # and it is taken at once
        for i in range(50):  # until the last free pages are used up
            try:
                await ob.append([tel(100 + i)] * 50)
            except OutboxDiskFullError:
                break
        assert await ob.append([alarm(1)]) == []
        assert (await ob.disk_status())["full"]
        (tiny / "filler").unlink()
        await ob.maintain()
        assert not (await ob.disk_status())["full"]
        assert ballast.stat().st_size == 256 * 1024
    (states,) = rows(db, "SELECT count(*) FROM records WHERE kind = ?", int(ALARM))
    assert states == (1,)


async def test_status_and_doctor_say_disk_full_with_the_numbers(tiny: Path) -> None:
    """With the agent stopped and its disk full (too full to open the outbox even read-only),
    `status` and `doctor` still answer, saying "disk full" with free, total and reserve."""
    data = tiny / "gw"
    config = tiny / "site.toml"
    config.write_text(f'[gateway]\nid = "gw-1"\ndata_dir = "{data}"\n\n[outbox]\n'
                      f"disk_reserve_bytes = {2**20}\nballast_bytes = 0\n")
    async with Outbox.open(data / "outbox.db") as ob:
        await ob.append([tel(i) for i in range(10)])
    fill(tiny / "filler")
    runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})
    as_json = runner.invoke(app, ["status", "--config", str(config), "--json"])
    assert as_json.exit_code == 1, (as_json.stdout, as_json.stderr, as_json.exception)
    disk = json.loads(as_json.stdout)["disk"]
    assert disk["state"] == "disk full" and disk["fs_free_bytes"] < 64 * 1024
    assert disk["fs_total_bytes"] == 4 * 2**20 and disk["reserve_bytes"] == 2**20
    text = runner.invoke(app, ["status", "--config", str(config)])
    assert re.search(r"disk full: [\d.]+ (B|KiB) free of 4\.0 MiB \(reserve 1\.0 MiB\)",
                     text.output), text.output
    # doctor runs its own event loop
    doctor = await asyncio.to_thread(runner.invoke, app, ["doctor", "--config", str(config),
                                                          "--json"])
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["free disk"]["status"] == "fail"
    assert checks["free disk"]["detail"].startswith("disk full: "), checks["free disk"]


async def test_a_stop_cancels_again_a_task_that_swallowed_its_cancel() -> None:
    """A task that lost its cancel (3.11's wait_for racing a reply) is cancelled again, so the
    agent still stops (it used to wait for ever on a busy, full-disk gateway)."""
    swallowed = []

    async def stubborn() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            swallowed.append(True)  # as asyncio.wait_for may, when the reply races the cancel
        await asyncio.sleep(30)

    task = asyncio.create_task(stubborn(), name="poll[stubborn]")
    await asyncio.sleep(0)
    task.cancel()
    await _cancel_stragglers([task], grace_s=0.05)
    assert swallowed == [True] and task.cancelled()


async def test_opening_on_a_full_disk_without_ballast_is_a_typed_error(tiny: Path) -> None:
    """Without a ballast, an open whose first write meets the full disk fails with
    OutboxFullError, rolled back cleanly (not "cannot rollback - no transaction is active")."""
    db = tiny / "outbox.db"
    async with Outbox.open(db) as running:  # keeps -shm there, as a running agent does
        await running.append([tel(i) for i in range(10)])
        await running._sqlite.call(lambda: running._sqlite.conn.execute(
            "PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
        fill(tiny / "filler")
        with pytest.raises(OutboxFullError) as refused:
            async with Outbox.open(db):
                pass
        assert "rollback" not in str(refused.value)
        (tiny / "filler").unlink()
        assert len(await running.append([tel(11)])) == 1
