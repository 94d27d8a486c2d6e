"""The shared list of retired gateways (`central.identity.retire.RetiredGate`), on SQLite and
on PostgreSQL: a retired gateway that keeps resending costs a bounded number of commits, its
refusals still add up in its row (also from several workers, also across a failed write); a
list that cannot be read is logged once per outage and once on recovery, and counted; what
waits in memory is written before the API reads it and when central stops; a radio frame of
a gateway in service counts nothing but lets a due flush out; 叫应's directory and scheduler
read the shared list, not the table every time."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from structlog.testing import capture_logs

from central.app import create_app
from central.config.settings import Settings
from central.health.metrics import Metrics
from central.identity.audit import AuditLog
from central.identity.retire import RetiredGate, retire, retirements_program, unretire
from central.storage import Storage, open_storage
from central.storage.program import Program, Sql
from protocols.envelope import DataBatch, State
from tests import test_console_api as console
from tests.helpers import FakeClock
from tests.identity import auth, token_for
from tests.pg import BACKENDS, backend
from tests.test_console_api import areas, report

OLD, NEW = "gw-old", "gw-new"
LONG_S = 3600.0  # a refresh or flush interval no test run reaches on the real clock

# The console API's fixtures: the app in process on SQLite and on PostgreSQL, an admin client.
db_url, app, client = console.db_url, console.app, console.client


def group(*gws: str) -> list[DataBatch]:
    return [DataBatch(gw=gw, stream=gw, records=()) for gw in gws]


@contextlib.contextmanager
def counting_commits(storage: Storage) -> Iterator[list[int]]:
    """Count the write transactions the real store commits: every write goes through its
    one `_transaction` (BEGIN IMMEDIATE ... COMMIT on SQLite, `conn.transaction()` on
    PostgreSQL), wrapped here only to count the ones that returned (committed)."""
    real = storage._transaction  # type: ignore[attr-defined]
    commits = [0]

    def counted_sync(*args: Any) -> Any:
        out = real(*args)
        commits[0] += 1
        return out

    async def counted_async(*args: Any) -> Any:
        out = await real(*args)
        commits[0] += 1
        return out

    storage._transaction = (  # type: ignore[attr-defined]
        counted_async if inspect.iscoroutinefunction(real) else counted_sync)
    try:
        yield commits
    finally:
        del storage._transaction  # type: ignore[attr-defined]


def ddl(sql: str) -> Callable[[], Program[None]]:
    def program() -> Program[None]:
        yield Sql(sql)
    return program


async def break_table(storage: Storage) -> None:
    """A real fault: the table is gone, so every read and write of it fails."""
    await storage.run(ddl("ALTER TABLE retired_gateways RENAME TO retired_gateways_away"))


async def mend_table(storage: Storage) -> None:
    await storage.run(ddl("ALTER TABLE retired_gateways_away RENAME TO retired_gateways"))


@contextlib.asynccontextmanager
async def workers(kind: str, tmp_path: Path, n: int = 1) -> AsyncIterator[list[Storage]]:
    """`n` central workers' storages on one database, OLD and NEW known, OLD retired."""
    async with backend(kind, tmp_path, n) as stores:
        st = stores[0]
        for gw in (OLD, NEW):
            await st.record_state(gw, State(True, "b", "v", "eth", 0, 1, gw))
        await retire(st, AuditLog(st), OLD, user="admin-1", reason="replaced")
        yield stores


async def refused(storage: Storage) -> tuple[int, int | None]:
    (r,) = await storage.run(retirements_program, write=False)
    return r.refused, r.last_refused_ms


@pytest.mark.parametrize("kind", BACKENDS)
async def test_a_retired_gateways_resends_cost_a_bounded_number_of_commits(
        kind: str, tmp_path: Path) -> None:
    """50 groups with two messages each from a retired gateway: the first is written at once,
    the rest wait in memory and go in one commit when `flush_s` has passed; the row counts
    every one, and a gateway in service is admitted throughout."""
    async with workers(kind, tmp_path) as (st,):
        clock = FakeClock()
        gate = RetiredGate(st, refresh_s=LONG_S, flush_s=60, monotonic=clock)
        with counting_commits(st) as commits:
            for _ in range(50):
                _, admitted = await gate.admit([], group(OLD, NEW, OLD))
                assert [b.gw for b in admitted] == [NEW]
            assert commits == [1]  # the first refusal, at once
            assert (await refused(st))[0] == 2
            clock.now += 60
            await gate.admit([], group(NEW))  # any group after `flush_s` writes what waits
            assert commits == [2]
            await gate.flush()  # nothing left: no commit
            assert commits == [2]
        count, last_ms = await refused(st)
        assert count == 100 and gate.refused == 100 and last_ms is not None


async def test_a_frame_of_a_gateway_in_service_only_lets_a_due_flush_out(
        tmp_path: Path) -> None:
    """The radio receiver asks for every frame: one of a gateway in service counts nothing
    and commits nothing, unless refusals wait and `flush_s` has passed, then they go out with
    it; a retired gateway's frames count as `radio` in the metric."""
    async with workers("sqlite", tmp_path) as (st,):
        clock = FakeClock()
        metrics = Metrics()
        gate = RetiredGate(st, refresh_s=LONG_S, flush_s=60, metrics=metrics, monotonic=clock)
        with counting_commits(st) as commits:
            assert not await gate.refuses(NEW)
            assert await gate.refuses(OLD) and await gate.refuses(OLD)
            assert commits == [1]  # the first refusal at once, the second waits
            assert not await gate.refuses(NEW)
            assert commits == [1]
            clock.now += 60
            assert not await gate.refuses(NEW)
            assert commits == [2]
        assert (await refused(st))[0] == 2 and gate.refused == 2
        assert metrics.retired_messages == {"radio": 2}


@pytest.mark.parametrize("kind", BACKENDS)
async def test_refusals_of_two_workers_add_up_and_survive_a_failed_write(
        kind: str, tmp_path: Path) -> None:
    """Two workers (own connections) count into one row; a write that fails keeps the counts
    for the next (logged once until it recovers); counts of a retirement undone meanwhile do
    not land in the gateway's next retirement; a retire made by another worker is seen at the
    next refresh."""
    async with workers(kind, tmp_path, 2) as (a, b):
        clock = FakeClock()
        ga = RetiredGate(a, refresh_s=LONG_S, flush_s=LONG_S, monotonic=clock)
        gb = RetiredGate(b, refresh_s=60, flush_s=60, monotonic=clock)
        await ga.admit([], group(OLD))
        await gb.admit([], group(OLD, OLD))
        assert (await refused(b))[0] == 3
        await gb.admit([], group(OLD))  # waits in memory (flushed less than flush_s ago)
        await break_table(a)
        clock.now += 60
        with capture_logs() as logs:
            await gb.flush()
            await gb.flush()
            await mend_table(a)
            await gb.flush()
        assert [(e["event"], e["log_level"]) for e in logs] == [
            ("retired_gateway_count_failed", "error"),
            ("retired_gateway_count_recovered", "info")]
        assert (await refused(a))[0] == 4

        # OLD unretired and retired again: what worker a counted for the first retirement
        # goes nowhere.
        await ga.admit([], group(OLD))  # waits in a's memory
        await unretire(a, AuditLog(a), OLD, user="admin-1", reason="back")
        await retire(a, AuditLog(a), OLD, user="admin-1", reason="again")
        await ga.flush()
        assert await refused(a) == (0, None)

        # NEW retired by worker a: b sees it at its next refresh, not before.
        assert [x.gw for x in (await gb.admit([], group(NEW)))[1]] == [NEW]  # b reads here
        await retire(a, AuditLog(a), NEW, user="admin-1", reason="gone")
        assert [x.gw for x in (await gb.admit([], group(NEW)))[1]] == [NEW]
        clock.now += 60
        assert (await gb.admit([], group(NEW)))[1] == []


@pytest.mark.parametrize("kind", BACKENDS)
async def test_an_unreadable_retired_list_is_logged_once_per_outage(
        kind: str, tmp_path: Path) -> None:
    """While the retired list cannot be read, every group tries again, is checked against the
    list last read (the retired gateway stays refused) and is counted in a metric; the outage
    is logged once, at ERROR, and its end once."""
    async with workers(kind, tmp_path) as (st,):
        metrics = Metrics()
        gate = RetiredGate(st, refresh_s=0, flush_s=LONG_S, metrics=metrics)
        await gate.admit([], group(OLD))
        await break_table(st)
        with capture_logs() as logs:
            for _ in range(5):
                _, admitted = await gate.admit([], group(OLD, NEW))
                assert [x.gw for x in admitted] == [NEW]
            await mend_table(st)
            for _ in range(3):
                await gate.admit([], group(NEW))
        assert [(e["event"], e["log_level"]) for e in logs] == [
            ("retired_gateways_unreadable", "error"), ("retired_gateways_recovered", "info")]
        assert logs[1]["unreadable_checks"] == 5
        assert metrics.retired_list_unreadable == 5
        assert "fieldlink_central_retired_list_unreadable_total 5.0" in metrics.render()
        await gate.flush()
        assert (await refused(st))[0] == 6


async def test_callresp_reads_the_shared_retired_list(
        app: FastAPI, client: httpx.AsyncClient) -> None:
    """叫应's directory lists and scheduler rounds read the process's shared retired list:
    the table once after a retire or unretire through this process's API (which show at
    once), not once per request or round."""
    gate: RetiredGate = app.state.retired
    gate.refresh_s = LONG_S  # only the retire and unretire make it read again
    ids = await areas(client)
    for i, gw in enumerate((OLD, NEW), start=1):
        await report(app, gw)
        assert (await client.put(f"/api/callresp/terminals/t-{i}", json={
            "gw": gw, "area_id": ids["420107-s"]})).status_code == 200
    assert (await client.put("/api/callresp/groups/g", json={
        "name": "g", "terminals": ["t-1", "t-2"]})).status_code == 200
    storage, svc = app.state.storage, app.state.callresp
    real_run = storage.run
    reads: list[str] = []

    async def counted(program: Any, **kwargs: Any) -> Any:
        if getattr(program, "__name__", "").startswith("retired_"):  # the whole-list reads
            reads.append(program.__name__)
        return await real_run(program, **kwargs)

    storage.run = counted  # the real storage, wrapped only to count
    assert (await client.post(f"/api/gateways/{OLD}/retire",
                              json={"reason": "replaced"})).status_code == 200
    for _ in range(3):
        assert [t["id"] for t in (await client.get("/api/callresp/terminals")).json()] == ["t-2"]
        (g,) = (await client.get("/api/callresp/groups")).json()
        assert (g["terminals"], g["retired_terminals"]) == (["t-2"], ["t-1"])
        await svc.step()
    assert len(reads) == 1
    assert (await client.post(f"/api/gateways/{OLD}/unretire",
                              json={"reason": "back"})).status_code == 200
    for _ in range(3):
        assert len((await client.get("/api/callresp/terminals")).json()) == 2
        await svc.step()
    assert len(reads) == 2


async def test_the_api_and_the_audit_see_the_refusals_still_in_memory(
        app: FastAPI, client: httpx.AsyncClient) -> None:
    """Refusals waiting in memory are written before the admin's list and an unretire read
    them: the list, the unretire's answer and its audit entry count every one."""
    gate: RetiredGate = app.state.retired
    gate.flush_s = LONG_S  # past the first, refusals wait for a reader
    await report(app, OLD)
    assert (await client.post(f"/api/gateways/{OLD}/retire",
                              json={"reason": "replaced"})).status_code == 200
    for _ in range(3):
        assert await app.state.ingest.store_group([], group(OLD, OLD)) == []
    assert [(g["gw"], g["refused"]) for g in (
        await client.get("/api/retired-gateways")).json()] == [(OLD, 6)]
    await app.state.ingest.store_group([], group(OLD))
    back = await client.post(f"/api/gateways/{OLD}/unretire", json={"reason": "back"})
    assert back.status_code == 200 and back.json()["refused"] == 7
    auditor = await token_for(app, client, "auditor-1", "auditor")
    (entry,) = (await client.get("/api/audit", params={"action": "gateway.unretired"},
                                 headers=auth(auditor))).json()
    assert entry["detail"]["refused_while_retired"] == 7


async def test_refusals_in_memory_are_written_when_central_stops(tmp_path: Path) -> None:
    """Central's shutdown writes the refusals its shared list still holds in memory."""
    url = f"sqlite:///{tmp_path}/c.db"
    app = create_app(Settings(db_url=url, command_key_path=tmp_path / "key.pem",
                              pki_dir=tmp_path / "pki"), run_ingest=False)
    async with app.router.lifespan_context(app):
        st = app.state.storage
        await st.record_state(OLD, State(True, "b", "v", "eth", 0, 1, OLD))
        await retire(st, AuditLog(st), OLD, user="admin-1", reason="replaced")
        app.state.retired.flush_s = LONG_S
        for _ in range(4):
            await app.state.ingest.store_group([], group(OLD))
        assert (await refused(st))[0] == 1  # the first, at once; three wait
    async with open_storage(url) as st:
        assert (await refused(st))[0] == 4
