"""The outbox disk budget (§4.6) on real SQLite files: thinning keeps every k-th sample and
each window's min/max, the oldest go first, alarms and events are never evicted, every
eviction is counted and reported as an EVENT record, and a full cap (`max_page_count`, a
real SQLITE_FULL) is survived by evicting and retrying once."""

from __future__ import annotations

import asyncio
import math
import sqlite3
from pathlib import Path
from typing import Any

import cbor2
import pytest

from edge_agent.config.site import ConfigError, parse_config
from edge_agent.outbox.budget import BudgetPolicy, DiskBudget
from edge_agent.outbox.store import NewRecord, Outbox, OutboxDiskFullError, read_status
from protocols.envelope import RecordKind

TEL, ALARM = RecordKind.TELEMETRY, RecordKind.ALARM
T0 = 1_767_300_000_000


def rows(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def budget_events(db: Path) -> list[dict[str, Any]]:
    found = rows(db, "SELECT attrs FROM records WHERE kind = ? ORDER BY seq", int(RecordKind.EVENT))
    attrs = [cbor2.loads(b) for (b,) in found if b]
    return [a for a in attrs if str(a.get("event", "")).startswith("outbox_")]


def run_pass(db: Path, policy: BudgetPolicy) -> tuple[Any, Any]:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        result = DiskBudget(policy).reclaim(conn, horizon=2**62)
        conn.execute("COMMIT")
        return result
    finally:
        conn.close()


# --- thinning and dropping, one pass -------------------------------------------------------


async def test_thinning_keeps_every_kth_sample_and_the_window_min_max(tmp_path: Path) -> None:
    """Per point: samples 0, 4, 8 and the window's min and max stay; bools keep every 4th;
    the alarm and each point's newest record are untouched."""
    db = tmp_path / "o.db"
    a = [5, 7, 6, 9, 8, 6, 1, 3, 4, 20, 5, 6, 7]  # min at 6, max at 9; the last is newest
    async with Outbox.open(db) as ob:
        for i, v in enumerate(a):
            await ob.append([NewRecord(TEL, T0 + i, "d/a", float(v)),
                             NewRecord(TEL, T0 + i, "d/b", i % 2 == 0),
                             *([NewRecord(ALARM, T0 + i, "d/a", 20.0)] if v == 20 else [])])
    seq_a = [s for (s,) in rows(db, "SELECT seq FROM records WHERE point = 'd/a' AND kind = 0"
                                    " ORDER BY seq")]
    seq_b = [s for (s,) in rows(db, "SELECT seq FROM records WHERE point = 'd/b' ORDER BY seq")]
    (alarm,) = rows(db, "SELECT seq FROM records WHERE kind = 1")

    thinned, dropped = run_pass(db, BudgetPolicy(max_bytes=1, keep_every=4, max_rounds=1,
                                                 window_rows=1000, rows_per_pass=1))

    left = {s for (s,) in rows(db, "SELECT seq FROM records")}
    keep_a = {seq_a[i] for i in (0, 4, 8, 6, 9, 12)}
    keep_b = {seq_b[i] for i in (0, 4, 8, 12)}
    assert left == keep_a | keep_b | {alarm[0]}
    gone = (set(seq_a) | set(seq_b)) - left
    assert thinned.records == len(gone) == 13 + 13 - 6 - 4
    assert (thinned.first_seq, thinned.last_seq) == (min(gone), max(gone))
    assert thinned.points == {"d/a", "d/b"} and dropped.records == 0
    assert rows(db, "SELECT value FROM counters WHERE name = 'thinned_total'") == [(len(gone),)]


async def test_dropping_takes_the_oldest_telemetry_first(tmp_path: Path) -> None:
    """With no thinning rounds left the oldest telemetry window goes; alarms stay."""
    db = tmp_path / "o.db"
    async with Outbox.open(db) as ob:
        tel = await ob.append([NewRecord(TEL, T0 + i, f"d/p{i % 2}", float(i)) for i in range(20)])
        (alarm,) = await ob.append([NewRecord(ALARM, T0, "d/p0", 1.0)])
    thinned, dropped = run_pass(db, BudgetPolicy(max_bytes=1, max_rounds=0, window_rows=6,
                                                 rows_per_pass=1))
    assert thinned.records == 0 and dropped.records == 6
    left = [s for (s,) in rows(db, "SELECT seq FROM records ORDER BY seq")]
    assert left == tel[6:] + [alarm]


# --- the budget in the running outbox -----------------------------------------------------


async def _fill(ob: Outbox, n: int, *, alarm_every: int = 0, points: int = 10,
                step_ms: int = 1000, chunk: int = 500) -> list[int]:
    """Append n telemetry records, one every `step_ms` of device time round-robin over
    `points`, and an alarm after every `alarm_every`-th; returns the alarm seqs."""
    alarms: list[int] = []
    for start in range(0, n, chunk):
        recs: list[NewRecord] = []
        at: list[int] = []
        for i in range(start, min(n, start + chunk)):
            recs.append(NewRecord(TEL, T0 + i * step_ms, f"dev-{i % points}/gas",
                                  round(20 + 5 * math.sin(i / 300), 2)))
            if alarm_every and i % alarm_every == 0:
                at.append(len(recs))
                recs.append(NewRecord(ALARM, T0 + i * step_ms, "dev-1/gas", 30.0,
                                      attrs={"alarm_id": f"a{i}", "level": 1}))
        seqs = await ob.append(recs)
        alarms += [seqs[j] for j in at]
    return alarms


def _accounted(db: Path) -> tuple[int, int, int]:
    """(thinned_total, dropped_total, seqs missing from the file other than delivered ones,
    which go at once without retention)."""
    c = dict(rows(db, "SELECT name, value FROM counters"))
    (last,) = rows(db, "SELECT seq FROM sqlite_sequence WHERE name = 'records'")[0]
    (count,) = rows(db, "SELECT count(*) FROM records")[0]
    (kept,) = rows(db, "SELECT count(*) FROM records WHERE delivered != 0")[0]
    return c["thinned_total"], c["dropped_total"], last - count - (c["delivered_total"] - kept)


async def test_budget_evicts_telemetry_only_and_reports_every_eviction(tmp_path: Path) -> None:
    """Past 90 % the outbox thins then drops backlog telemetry; alarms all stay; the counters
    match the missing seqs and the outbox_thinned/outbox_dropped events add up to them."""
    db = tmp_path / "o.db"
    async with Outbox.open(db, max_bytes=2**20, live_window_s=0.05, thin_max_rounds=1,
                           prune_interval_s=3600) as ob:
        alarms = await _fill(ob, 40_000, alarm_every=2000)
        assert await ob.used_bytes() <= 2**20
        sent = await ob.next_batch(10)
        assert await ob.mark_delivered([(r.seq, r.seq) for r in sent]) == 10
        assert await ob.backlog() == (await ob.stats()).backlog  # O(1) count from counters
    assert {s for (s,) in rows(db, "SELECT seq FROM records WHERE kind = 1")} == set(alarms)
    thinned, dropped, missing = _accounted(db)
    assert thinned > 0 and dropped > 0 and thinned + dropped == missing
    events = budget_events(db)
    assert sum(e["records"] for e in events if e["event"] == "outbox_thinned") == thinned
    assert sum(e["records"] for e in events if e["event"] == "outbox_dropped") == dropped
    for e in events:
        assert e["first_seq"] <= e["last_seq"] and e["points"] and e["records"] > 0
    latest = dict(rows(db, "SELECT point, seq FROM latest"))
    delivered = {r.seq for r in sent}
    assert len(latest) == 10 and all(rows(db, "SELECT 1 FROM records WHERE seq = ?", s)
                                     for s in latest.values() if s not in delivered)
    st = read_status(db)
    assert (st.counters["thinned_total"], st.counters["dropped_total"]) == (thinned, dropped)
    assert st.counters["budget_events"] == len(events) and st.max_bytes == 2**20


async def test_a_budget_reached_by_live_data_still_thins_once_it_ages(tmp_path: Path) -> None:
    """Over the mark while everything is live, nothing is evicted; once it is backlog it is
    thinned first (not dropped: the empty passes did not use up the thinning rounds)."""
    db = tmp_path / "o.db"
    async with Outbox.open(db, max_bytes=2**20, live_window_s=1.0, thin_at=0.5, thin_to=0.4) as ob:
        await _fill(ob, 8000)
        assert await ob.used_bytes() > 0.5 * 2**20
        assert (await ob.stats()).counters["thinned_total"] == 0
        await asyncio.sleep(1.1)
        await _fill(ob, 100)
        c = (await ob.stats()).counters
    assert c["thinned_total"] > 0 and c["dropped_total"] == 0


async def test_full_cap_is_met_by_evicting_and_one_retry(tmp_path: Path) -> None:
    """An append that overruns the page cap (a real SQLITE_FULL) evicts backlog telemetry and
    commits on the retry; the caller never sees the error."""
    db = tmp_path / "o.db"
    async with Outbox.open(db, max_bytes=2**20, live_window_s=0.05, thin_at=0.99,
                           thin_to=0.98) as ob:
        while await ob.used_bytes() < 0.8 * 2**20:
            await _fill(ob, 1000)
        await asyncio.sleep(0.1)  # all of it is backlog now
        big = [NewRecord(TEL, T0, f"big/{i}", "x" * 100) for i in range(2500)]
        seqs = await ob.append(big)
        assert len(seqs) == 2500
        st = await ob.stats()
    assert st.counters["full_retries"] == 1
    thinned, dropped, missing = _accounted(db)
    assert thinned + dropped == missing > 0
    assert rows(db, "SELECT count(*) FROM records WHERE point LIKE 'big/%'") == [(2500,)]


async def test_full_cap_with_nothing_evictable_holds_alarms_in_memory(tmp_path: Path) -> None:
    """A cap filled with alarms holds further alarms in memory (append returns no seqs),
    refuses telemetry with OutboxDiskFullError, and evicts no committed alarm."""
    db = tmp_path / "o.db"
    async with Outbox.open(db, max_bytes=2**20, live_window_s=0.05) as ob:
        for i in range(10_000):
            if await ob.append([NewRecord(ALARM, T0 + i, "d/p", "x" * 200) for _ in range(20)]) == []:
                break
        stats = await ob.stats()
        assert stats.backlog == stats.last_seq  # every committed alarm is still there
        disk = await ob.disk_status()
        assert disk["full"] and disk["held"] == 20 and disk["held_lost"] == 0
        with pytest.raises(OutboxDiskFullError) as refused:
            await ob.append([NewRecord(TEL, T0, "d/q", 1.0)])
        assert (refused.value.dropped, refused.value.held) == (1, 0)
        assert (await ob.disk_status())["telemetry_dropped"] == 1


async def test_72_hour_outage_fits_the_budget_by_thinning_scaled_model(tmp_path: Path) -> None:
    """A 72 h outage at 100 points/s into 1 GiB, as a 1/100 model: 72 h at 1 point/s into 10 MiB.

    Real: 100 points/s x 259 200 s = 25 920 000 records into 1 GiB = 41.4 bytes per record.
    Model: 1 point/s (10 points every 10 s) x 259 200 s = 259 200 records into 10 MiB
    = 40.5 bytes per record: the same ratio (the model is 2 % tighter). An SQLite row here
    takes ~75 bytes with its index entries, so the raw data is ~1.9x the budget and must be
    thinned about in half; at 4:1 thinning (k = 4) one round over the oldest part suffices,
    so nothing is dropped. An alarm every 10 simulated minutes (432) must all survive, and
    the newest simulated hour must keep every sample (oldest windows go first).
    """
    db = tmp_path / "o.db"
    budget = 10 * 2**20
    n, per_append = 259_200, 1200  # 20 simulated minutes per append
    async with Outbox.open(db, max_bytes=budget, live_window_s=0.001) as ob:
        alarms = await _fill(ob, n, alarm_every=600, chunk=per_append)
        used = await ob.used_bytes()
    assert used <= budget
    assert db.stat().st_size <= budget  # the page cap holds for the file itself
    assert len(alarms) == 432
    assert {s for (s,) in rows(db, "SELECT seq FROM records WHERE kind = 1")} == set(alarms)
    thinned, dropped, missing = _accounted(db)
    assert thinned > n // 3 and dropped == 0 and thinned + dropped == missing
    newest_hour = rows(db, "SELECT count(*) FROM records WHERE kind = 0 AND ts_ms >= ?",
                       T0 + (n - 3600) * 1000)[0][0]
    assert newest_hour == 3600
    events = budget_events(db)
    assert sum(e["records"] for e in events) == thinned


def _on_disk(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())


async def test_a_drained_outbox_gives_its_pages_back(tmp_path: Path) -> None:
    """New files use incremental auto-vacuum; after the backlog is delivered the file shrinks."""
    db = tmp_path / "o.db"
    async with Outbox.open(db, prune_interval_s=3600) as ob:
        await _fill(ob, 30_000)
        before = _on_disk(db)
        await ob.mark_delivered([(1, 30_000)])
        await ob.maintain()
        after = _on_disk(db)
    assert rows(db, "PRAGMA auto_vacuum") == [(2,)]
    assert after < before / 2


def test_outbox_budget_keys_in_the_config() -> None:
    """`[outbox]` takes the budget keys; thin_to must be below thin_at (error names the line)."""
    text = ('[gateway]\nid = "gw-1"\n\n[outbox]\nmax_bytes = 1073741824\nthin_at = 0.9\n'
            'thin_to = 0.8\nthin_keep_every = 5\nbacklog_max_points_per_s = 500\n')
    ob = parse_config(text, check_profiles=False).outbox
    assert (ob.max_bytes, ob.thin_keep_every, ob.backlog_max_points_per_s) == (2**30, 5, 500.0)
    with pytest.raises(ConfigError) as err:
        parse_config(text.replace("thin_to = 0.8", "thin_to = 0.95"), check_profiles=False)
    assert err.value.line == 4 and "thin_to must be below thin_at" in str(err.value)
