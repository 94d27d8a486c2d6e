"""The outbox across a real power cut (the WAL cut back to its last fsync) and a reboot:
no seq is handed out twice (DESIGN.md §4.1) and the seqs it skips are reported lost."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.health.clock import ClockGuard
from edge_agent.outbox.db import backlog_from_counters
from edge_agent.outbox.store import NewRecord, Outbox, OutboxFullError
from protocols.envelope import RecordKind
from tests.powercut import cut_power, fsync_recorder, run_appender

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None,
                                reason="the fsync recorder needs gcc")

BEFORE, AFTER = "boot-before-the-cut", "boot-after-the-cut"


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield fsync_recorder(tmp_path_factory.mktemp("shim"))


def reading(i: int) -> NewRecord:
    return NewRecord(RecordKind.TELEMETRY, 1_700_000_100_000 + i, "d1/gas", 100.0 + i)


async def _fresh(db: Path) -> None:
    """Create the file and stop cleanly, so that the child starts on an empty WAL."""
    async with Outbox.open(db, clock=ClockGuard(boot_id=BEFORE), prune_interval_s=3600):
        pass


def _reports(db: Path) -> list[dict[str, Any]]:
    import cbor2
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT seq, attrs FROM records WHERE kind = ? AND attrs IS NOT NULL"
                            " ORDER BY seq", (int(RecordKind.EVENT),)).fetchall()
    conn.close()
    return [{"seq": s, **cbor2.loads(a)} for s, a in rows]


async def test_power_cut_never_reuses_a_seq_and_reports_the_skipped_ones(
        tmp_path: Path, shim: Path) -> None:
    """After a power cut and reboot, no seq handed out before the cut is handed out again, and
    the seqs the cut may have taken are named by an outbox_dropped report (reason power_cut)."""
    db, log = tmp_path / "o.db", tmp_path / "fsync.log"
    await _fresh(db)
    child = run_appender(db, boot=BEFORE, readings=3, shim=shim, log=log)
    assert child.seqs == [1, 2, 3, 4]
    assert cut_power(db, log) > 0  # the readings' commits were not on disk yet
    with sqlite3.connect(db) as conn:  # the cut took rows, and sqlite_sequence with them
        survived = [s for (s,) in conn.execute("SELECT seq FROM records ORDER BY seq")]
    conn.close()
    assert survived == [1]
    async with Outbox.open(db, clock=ClockGuard(boot_id=AFTER), prune_interval_s=3600) as ob:
        assert await ob.last_seq() >= max(child.seqs)
        [new] = await ob.append([reading(1)])
        assert new not in child.seqs and new > max(child.seqs)
        batch = await ob.next_batch(100)
    [report] = [r for r in _reports(db) if r.get("reason") == "power_cut"]
    assert report["event"] == "outbox_dropped"
    assert report["first_seq"] == 2 and report["last_seq"] >= max(child.seqs)
    assert report["records"] == report["last_seq"] - report["first_seq"] + 1
    assert report["seq"] == report["last_seq"] + 1 < new
    assert report["seq"] in {r.seq for r in batch}  # it goes to central like any record
    with sqlite3.connect(db) as conn:
        undelivered = conn.execute("SELECT count(*) FROM records WHERE delivered = 0").fetchone()
        assert backlog_from_counters(conn) == undelivered[0]
        counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
    conn.close()
    assert counters["power_cuts"] == 1 and counters["power_cut_seqs"] == report["records"]


async def test_power_cut_after_a_new_block_was_reserved(tmp_path: Path, shim: Path) -> None:
    """Readings that cross the reservation commit it synced, so a cut after them keeps the
    new reservation: the reopened outbox skips past every seq handed out before the cut."""
    db, log = tmp_path / "o.db", tmp_path / "fsync.log"
    await _fresh(db)
    child = run_appender(db, boot=BEFORE, readings=600, batch=50, shim=shim, log=log)
    assert child.syncs_after_readings > child.syncs_after_alarm  # a block boundary synced
    assert cut_power(db, log) > 0
    with sqlite3.connect(db) as conn:
        survived = conn.execute("SELECT max(seq) FROM records").fetchone()[0]
    conn.close()
    assert 1 < survived < max(child.seqs)  # the crossing survived, later readings did not
    async with Outbox.open(db, clock=ClockGuard(boot_id=AFTER), prune_interval_s=3600) as ob:
        [new] = await ob.append([reading(1)])
    assert new > max(child.seqs)
    [report] = [r for r in _reports(db) if r.get("reason") == "power_cut"]
    assert report["first_seq"] == survived + 1 and report["last_seq"] >= max(child.seqs)


async def test_telemetry_appends_stay_unsynced(tmp_path: Path, shim: Path) -> None:
    """Readings appended inside the reservation add no fsync (append stays fast); the alarm's
    append syncs."""
    db, log = tmp_path / "o.db", tmp_path / "fsync.log"
    await _fresh(db)
    child = run_appender(db, boot=BEFORE, readings=20, shim=shim, log=log)
    assert child.syncs_after_alarm >= 1
    assert child.syncs_after_readings == child.syncs_after_alarm


async def test_process_kill_in_the_same_boot_skips_nothing(tmp_path: Path, shim: Path) -> None:
    """A SIGKILLed agent restarted in the same boot lost nothing (WAL pages are in the OS
    cache), so it skips no seq and reports no loss."""
    db, log = tmp_path / "o.db", tmp_path / "fsync.log"
    await _fresh(db)
    child = run_appender(db, boot=BEFORE, readings=3, shim=shim, log=log)
    async with Outbox.open(db, clock=ClockGuard(boot_id=BEFORE), prune_interval_s=3600) as ob:
        assert await ob.append([reading(1)]) == [max(child.seqs) + 1]
    assert not [r for r in _reports(db) if r.get("reason") == "power_cut"]


async def test_clean_stop_then_reboot_skips_nothing(tmp_path: Path) -> None:
    """A clean stop gives the reservation back: a restart in another boot goes on at the next
    seq with no loss report."""
    db = tmp_path / "o.db"
    async with Outbox.open(db, clock=ClockGuard(boot_id=BEFORE), prune_interval_s=3600) as ob:
        seqs = await ob.append([reading(i) for i in range(5)])
    async with Outbox.open(db, clock=ClockGuard(boot_id=AFTER), prune_interval_s=3600) as ob:
        assert await ob.append([reading(9)]) == [seqs[-1] + 1]
    assert not [r for r in _reports(db) if r.get("reason") == "power_cut"]


async def test_every_seq_handed_out_is_reserved_on_disk(tmp_path: Path) -> None:
    """Across many appends (several reservation blocks) the durable reservation is never
    below a seq that has been handed out."""
    db = tmp_path / "o.db"
    async with Outbox.open(db, clock=ClockGuard(boot_id=BEFORE), prune_interval_s=3600) as ob:
        for i in range(60):
            seqs = await ob.append([reading(i * 100 + j) for j in range(100)])
            with sqlite3.connect(db) as conn:
                (reserved,) = conn.execute("SELECT reserved FROM seq_reserve").fetchone()
            conn.close()
            assert reserved >= seqs[-1]


async def test_seqs_burned_on_a_full_disk_stay_reserved(tmp_path: Path) -> None:
    """A full-disk episode that burns more seqs than a reservation block leaves the reservation
    on disk above every seq burned or handed out."""
    from tests.test_outbox_full import fat, relieve, squeeze
    db = tmp_path / "o.db"
    async with Outbox.open(db, clock=ClockGuard(boot_id=BEFORE), prune_interval_s=3600) as ob:
        await ob.append([reading(0)])
        await squeeze(ob._sqlite)
        for i in range(3):
            with pytest.raises(OutboxFullError):
                await ob.append([fat(i * 400 + j) for j in range(400)])
        await relieve(ob._sqlite)
        assert await ob.flush_held()  # burns 1200 seqs and appends the reports
        last = await ob.last_seq()
        assert last > 1200
        with sqlite3.connect(db) as conn:
            (reserved,) = conn.execute("SELECT reserved FROM seq_reserve").fetchone()
        conn.close()
        assert reserved >= last
