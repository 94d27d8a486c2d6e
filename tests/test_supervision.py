"""Supervised tasks (runtime.tasks): restart back-off that grows, is capped, jittered and reset
after a healthy run; and the edge outbox's maintenance loop under a supervisor."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from edge_agent import agent
from edge_agent.outbox.maintenance import MAINTENANCE_TASK
from edge_agent.outbox.store import Outbox, OutboxError
from runtime.tasks import Backoff, TaskUnavailableError, stop, supervise


@pytest.fixture(autouse=True)
def _reset_structlog() -> None:
    """capture_logs needs loggers that are not cached by an earlier configure()."""
    structlog.reset_defaults()


async def test_restart_delay_grows_is_capped_and_resets_after_a_healthy_run() -> None:
    """A task that raises or returns is restarted after 1, 2, 4, ... × first_s (capped at
    max_s); once a run lasted healthy_after_s, the next restart waits first_s again."""
    backoff = Backoff(first_s=0.02, max_s=0.08, healthy_after_s=0.3, jitter=0.0)
    starts: list[float] = []
    ends: list[float] = []
    restarted: list[str] = []
    done = asyncio.Event()

    async def flaky() -> None:
        starts.append(time.monotonic())
        try:
            run = len(starts)
            if run == 5:
                await asyncio.sleep(0.35)  # a healthy run, then a crash
            if run == 7:
                done.set()
                await asyncio.sleep(3600)
            if run % 2:
                raise RuntimeError(f"crash {run}")
            # an even run returns, which a loop meant to run for ever must not do
        finally:
            ends.append(time.monotonic())

    with capture_logs() as logs:
        task = asyncio.create_task(supervise("flaky", flaky, backoff=backoff,
                                             on_restart=restarted.append))
        await asyncio.wait_for(done.wait(), 10)
        await stop(task)
    restarts = [e for e in logs if e["event"] in ("task_crashed", "task_exited")]
    assert [e["event"] for e in restarts] == ["task_crashed", "task_exited"] * 3
    assert all(e["task"] == "flaky" for e in restarts)
    assert "exc_info" in restarts[0]  # the traceback goes to the log
    assert [e["restart_in_s"] for e in restarts] == [0.02, 0.04, 0.08, 0.08, 0.02, 0.04]
    assert restarted == ["flaky"] * 6
    gaps = [start - end for end, start in zip(ends, starts[1:], strict=False)]
    assert all(gap >= e["restart_in_s"] * 0.9 for gap, e in zip(gaps, restarts, strict=False))
    assert task.cancelled()


async def test_restart_delay_is_jittered_below_the_nominal_delay() -> None:
    """With jitter j, each wait lies in [(1 - j) × delay, delay]."""
    backoff = Backoff(first_s=0.01, max_s=0.04, healthy_after_s=60, jitter=0.5)
    assert all(0.005 <= backoff.wait_s(0.01) <= 0.01 for _ in range(200))
    assert [backoff.next_delay(d) for d in (0.01, 0.02, 0.04)] == [0.02, 0.04, 0.04]
    with pytest.raises(ValueError):
        Backoff(first_s=0.0)
    with pytest.raises(ValueError):
        Backoff(jitter=1.0)


async def test_outbox_maintenance_restarts_after_an_unexpected_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the agent's supervisor, an unexpected error ends the outbox's maintenance loop,
    which is logged (task_crashed), counted and started again after the back-off; an
    OutboxError is an outage the loop rides out, logged once and counted."""
    monkeypatch.setattr(agent, "RESTART_MIN_S", 0.01)
    rounds: list[int] = []
    done = asyncio.Event()
    async with Outbox.open(tmp_path / "o.db", prune_interval_s=0.01, maintain=False) as ob:
        real = ob.maintain

        async def faulty() -> None:
            rounds.append(1)
            if len(rounds) == 1:
                raise RuntimeError("a bug")
            if len(rounds) == 2:
                raise OutboxError("disk I/O error")
            await real()
            if len(rounds) >= 4:
                done.set()

        monkeypatch.setattr(ob, "maintain", faulty)
        runtime = agent.AgentRuntime(config=None, boot_id="b", started_ms=0)  # type: ignore[arg-type]
        with capture_logs() as logs:
            task = asyncio.create_task(
                agent._supervised(MAINTENANCE_TASK, ob.maintenance_loop, runtime))
            await asyncio.wait_for(done.wait(), 5)
            await stop(task)
    crashes = [e for e in logs if e["event"] == "task_crashed"]
    assert [e["task"] for e in crashes] == ["outbox.maintain"]
    assert runtime.restarts == {"outbox.maintain": 1}
    events = [e["event"] for e in logs]
    assert events.count("outbox_maintenance_failed") == 1
    assert events.count("outbox_maintenance_recovered") == 1
    assert ob.maintenance_errors == 1


async def test_outbox_open_supervises_its_own_maintenance(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opened on its own (a CLI, a test), the outbox restarts its maintenance loop too, after
    the runtime's default back-off (at most a second)."""
    rounds: list[int] = []
    done = asyncio.Event()

    async def faulty(self: Outbox) -> None:
        rounds.append(1)
        if len(rounds) == 1:
            raise RuntimeError("a bug")
        done.set()

    monkeypatch.setattr(Outbox, "maintain", faulty)
    with capture_logs() as logs:
        async with Outbox.open(tmp_path / "o.db", prune_interval_s=0.01):
            await asyncio.wait_for(done.wait(), 10)
    assert [e["task"] for e in logs if e["event"] == "task_crashed"] == ["outbox.maintain"]


def test_edge_metrics_count_task_restarts_and_maintenance_errors() -> None:
    """The edge's Prometheus collector exports restarts by task and the outbox's failed
    maintenance rounds, so a task crashing in a loop shows on a dashboard."""
    from edge_agent.health.metrics import AgentCollector, Snapshot

    collector = AgentCollector()
    collector.snapshot = Snapshot(gateway="gw", wall_s=0.0, uplink_connected=False, uplink={},
                                  devices=(), stats=None,
                                  restarts={"uplink.mqtt": 0, "outbox.maintain": 2},
                                  maintenance_errors=3)
    samples = {(s.name, tuple(s.labels.items())): s.value
               for family in collector.collect() for s in family.samples}
    assert samples[("fieldlink_edge_task_restarts_total", (("task", "outbox.maintain"),))] == 2
    assert samples[("fieldlink_edge_task_restarts_total", (("task", "uplink.mqtt"),))] == 0
    assert samples[("fieldlink_edge_outbox_maintenance_errors_total", ())] == 3


async def test_unavailable_task_warns_once_per_reason_without_a_traceback() -> None:
    """`TaskUnavailableError`: one WARNING per new reason (DEBUG while it repeats), no
    traceback, the same back-off and restart count; any other error is still a crash."""
    backoff = Backoff(first_s=0.01, max_s=0.02, healthy_after_s=60, jitter=0.0)
    reasons = ["port in use", "port in use", "port in use", "no such address", "port in use"]
    restarted: list[str] = []
    done = asyncio.Event()

    async def blocked() -> None:
        if reasons:
            raise TaskUnavailableError(reasons.pop(0))
        if not done.is_set():
            done.set()
            raise RuntimeError("a bug")
        await asyncio.sleep(3600)

    with capture_logs() as logs:
        task = asyncio.create_task(supervise("metrics.http", blocked, backoff=backoff,
                                             on_restart=restarted.append))
        await asyncio.wait_for(done.wait(), 10)
        await asyncio.sleep(0.1)
        await stop(task)
    said = [(e["log_level"], e.get("reason")) for e in logs if e["event"] == "task_unavailable"]
    assert said == [("warning", "port in use"), ("debug", "port in use"),
                    ("debug", "port in use"), ("warning", "no such address"),
                    ("warning", "port in use")]
    assert not [e for e in logs if e["event"] == "task_unavailable" and "exc_info" in e]
    assert [e["event"] for e in logs if e["event"] == "task_crashed"] == ["task_crashed"]
    assert restarted == ["metrics.http"] * 6
