"""Wall-clock sanity (§4.7): jumps and impossible times are detected with the monotonic clock,
records are flagged CLOCK_SUSPECT, and a good time source corrects them within one boot."""

from __future__ import annotations

import json
import time
from pathlib import Path

from typer.testing import CliRunner

from edge_agent.cli.app import app
from edge_agent.health.clock import ClockGuard, SuspectReason, boottime_ns, current_boot_id
from edge_agent.outbox.store import NewRecord, Outbox
from protocols.envelope import Flag, Record, RecordKind

FLOOR = 1_767_225_600_000  # 2026-01-01
REAL = 1_795_000_000_000  # some good time after the floor (2026-11-18)
runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})


class FakeClock:
    """A wall clock that can be stepped, and a boot-time clock that only moves forward."""

    def __init__(self, wall_ms: int, mono_ms: int = 60_000) -> None:
        self.wall_ms, self.mono_ms = wall_ms, mono_ms

    def wall_ns(self) -> int:
        return self.wall_ms * 1_000_000

    def mono_ns(self) -> int:
        return self.mono_ms * 1_000_000

    def advance(self, ms: int) -> None:
        self.wall_ms += ms
        self.mono_ms += ms


def guard(clock: FakeClock, boot: str = "boot-a", synced: list[bool] | None = None) -> ClockGuard:
    state = synced if synced is not None else [False]
    return ClockGuard(floor_ms=FLOOR, wall_ns=clock.wall_ns, mono_ns=clock.mono_ns, boot_id=boot,
                      sync_probe=lambda: state[0])


def test_a_good_clock_is_trusted_and_slew_is_no_jump() -> None:
    """A clock after the floor that NTP slews by a few ms an hour is never suspect."""
    c = FakeClock(REAL)
    g = guard(c)
    for _ in range(100):
        c.advance(36_000)
        c.wall_ms += 5  # 5 ms per 36 s: far below the kernel's 500 ppm slew limit
        assert g.stamp().flags == Flag.NONE
    assert not g.suspect and g.high_water_ms == c.wall_ms


def test_a_clock_before_the_build_floor_is_suspect() -> None:
    """A gateway that booted at 1970 stamps CLOCK_SUSPECT and says why."""
    g = guard(FakeClock(30_000))
    assert g.stamp().flags == Flag.CLOCK_SUSPECT
    assert g.reason is SuspectReason.BEFORE_FLOOR


def test_a_wall_clock_step_is_caught_by_the_monotonic_clock() -> None:
    """A 1 h step forward or 5 s back is a jump; a 1 s step is within tolerance."""
    for step in (3_600_000, -5_000):
        c = FakeClock(REAL)
        g = guard(c)
        assert not g.stamp().suspect
        c.advance(1000)
        c.wall_ms += step
        assert g.stamp().suspect and g.reason is SuspectReason.JUMP
        c.advance(1000)
        assert g.stamp().suspect  # sticky until a good source confirms
    c = FakeClock(REAL)
    g = guard(c)
    g.stamp()
    c.wall_ms += 1000
    assert not g.stamp().suspect


def test_a_clock_behind_the_high_water_mark_after_reboot_is_suspect() -> None:
    """After a reboot (fake-hwclock days behind) the clock is suspect; a restart in the same
    boot keeps the verdict."""
    c = FakeClock(REAL)
    g1 = guard(c, boot="boot-a")
    g1.stamp()
    state = g1.state()
    c2 = FakeClock(REAL - 3 * 86_400_000, mono_ms=5_000)  # new boot, clock 3 days behind
    g2 = guard(c2, boot="boot-b")
    g2.restore(state)
    assert g2.stamp().suspect and g2.reason is SuspectReason.BEHIND_HIGH_WATER
    g3 = guard(c2, boot="boot-b")
    g3.restore(g2.state())
    assert g3.suspect and g3.stamp().suspect


def test_stepping_back_to_the_trusted_offset_clears_the_suspicion() -> None:
    """After clock_ok, a wrong step and a step back to the confirmed offset: trusted again."""
    c = FakeClock(REAL)
    g = guard(c)
    g.clock_ok("ntp")
    c.advance(1000)
    c.wall_ms -= 600_000
    assert g.stamp().suspect
    c.advance(1000)
    c.wall_ms += 600_000
    assert not g.stamp().suspect


def tel(ts: int, point: str = "d/p") -> NewRecord:
    return NewRecord(RecordKind.TELEMETRY, ts, point, 1.0)


async def _by_seq(ob: Outbox) -> dict[int, Record]:
    return {r.seq: r for r in await ob.next_batch(100)}


async def test_clock_ok_corrects_this_boots_records_and_leaves_older_boots_flagged(
        tmp_path: Path) -> None:
    """Records stamped at 1970 after a power cut get their real time once NTP is back (same
    boot, by the monotonic offset); a record of the previous boot stays flagged; delivered
    records are not rewritten."""
    db = tmp_path / "o.db"
    c0 = FakeClock(100_000, mono_ms=100_000)  # boot 0: no RTC, the clock started at 1970
    async with Outbox.open(db, clock=guard(c0, boot="boot-0")) as ob:
        (old,) = await ob.append([tel(c0.wall_ms)])
    c = FakeClock(50_000, mono_ms=50_000)  # power cut; boot 1, again at 1970
    async with Outbox.open(db, clock=guard(c, boot="boot-1")) as ob:
        (r1,) = await ob.append([tel(c.wall_ms)])
        c.advance(10_000)
        (r2,) = await ob.append([tel(c.wall_ms)])
        c.advance(10_000)
        (gone,) = await ob.append([tel(c.wall_ms, "d/q")])
        await ob.mark_delivered([(gone, gone)])
        c.advance(10_000)
        c.wall_ms = REAL  # NTP steps the clock at boot time 80 s
        (r3,) = await ob.append([tel(c.wall_ms)])
        before = await _by_seq(ob)
        assert all(before[s].flags & Flag.CLOCK_SUSPECT for s in (old, r1, r2, r3))

        assert await ob.clock_ok("ntp") == 3
        after = await _by_seq(ob)
        assert after[r1].ts_ms == REAL - 30_000 and after[r2].ts_ms == REAL - 20_000
        assert after[r3].ts_ms == REAL
        assert not any(after[s].flags & Flag.CLOCK_SUSPECT for s in (r1, r2, r3))
        assert after[old].flags & Flag.CLOCK_SUSPECT and after[old].ts_ms == 100_000
        assert (await ob.latest())["d/p"].ts_ms == REAL
        c.advance(1000)
        (r4,) = await ob.append([tel(c.wall_ms)])
        assert not (await _by_seq(ob))[r4].flags & Flag.CLOCK_SUSPECT
        stats = await ob.stats()
    assert stats.counters["clock_corrected_total"] == 3 and stats.clock["suspect"] is False


async def test_ntp_sync_seen_by_the_maintenance_task_confirms_the_clock(tmp_path: Path) -> None:
    """While suspect the outbox polls the sync probe; once synchronized it corrects by itself."""
    c = FakeClock(40_000, mono_ms=40_000)
    synced = [False]
    g = guard(c, synced=synced)
    async with Outbox.open(tmp_path / "o.db", clock=g, prune_interval_s=3600) as ob:
        (seq,) = await ob.append([tel(c.wall_ms)])
        c.wall_ms = REAL
        await ob.maintain()
        assert g.suspect
        synced[0] = True
        await ob.maintain()
        assert not g.suspect
        rec = (await _by_seq(ob))[seq]
    assert rec.ts_ms == REAL and rec.flags == Flag.NONE


async def test_edge_agent_clock_ok_is_applied_by_the_running_agent(tmp_path: Path) -> None:
    """`edge-agent clock ok` (this boot) makes the agent trust the clock and re-time the
    records it stamped from an RTC-less 1970 clock; `status --json` shows the verdict."""
    site = tmp_path / "site.toml"
    site.write_text('[gateway]\nid = "gw-clock"\ndata_dir = "data"\n')
    # No RTC: the wall clock counts from 1970 at boot, i.e. it equals the boot-time clock.
    g = ClockGuard(floor_ms=FLOOR, wall_ns=boottime_ns, boot_id=current_boot_id(),
                   sync_probe=lambda: False)
    async with Outbox.open(tmp_path / "data" / "outbox.db", clock=g, prune_interval_s=3600) as ob:
        (seq,) = await ob.append([tel(boottime_ns() // 1_000_000)])
        real_at_append = time.time_ns() // 1_000_000
        status = json.loads(runner.invoke(app, ["status", "-c", str(site), "--json"]).stdout)
        assert status["clock"]["suspect"] is True and status["clock"]["reason"] == "before_floor"
        result = runner.invoke(app, ["clock", "ok", "-c", str(site), "--json"])
        assert result.exit_code == 0, result.output
        await ob.maintain()
        rec = (await _by_seq(ob))[seq]
        status = json.loads(runner.invoke(app, ["status", "-c", str(site), "--json"]).stdout)
    assert abs(rec.ts_ms - real_at_append) < 2_000 and not rec.flags & Flag.CLOCK_SUSPECT
    assert status["clock"]["suspect"] is False and status["clock"]["corrected_total"] == 1
    assert status["clock"]["trusted_source"] == "manual"
