"""Central's command tables and signing key, on real SQLite and PostgreSQL (§6)."""

from __future__ import annotations

import dataclasses
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from central.commands.keys import SigningKeyError, key_path_for, load_or_create_key
from central.commands.store import (
    APPROVAL_REQUIRED,
    ORIGIN_GATEWAY,
    CommandStore,
    DuplicateCommandError,
    Report,
    StoredCommand,
    UnknownCommandError,
)
from central.config.settings import Settings
from protocols.command_keys import public_key_raw
from protocols.command_results import CommandResult, CommandState, Reason, result_attrs
from protocols.envelope import State
from tests.pg import BACKENDS, database_url, pg_schema

S = CommandState
T0 = 1_718_000_000_000


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database_url(request.param, tmp_path, "fl_cmd") as url:
        yield url


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[CommandStore]:
    from central.storage import open_storage

    # Opened after central's storage, as central does: an insert reads its retired gateways.
    async with open_storage(db_url), CommandStore(db_url) as st:
        yield st


def _cmd(cmd_id: str, gw: str = "gw-1", expires: int = T0 + 60_000) -> StoredCommand:
    return StoredCommand(cmd_id=cmd_id, gw=gw, kind="write_point", target="gas-1/x",
                         args={"device": "gas-1", "point": "x", "value": 1}, issued_at_ms=T0,
                         expires_at_ms=expires, state=S.PENDING, state_source="central")


def _rep(seq: int, cmd_id: str, state: CommandState, reason: Reason | None = None,
         verified: bool = True, **data: object) -> Report:
    res = CommandResult(cmd_id, state, reason, kind="write_point", verified=verified, data=data)
    return Report(seq=seq, ts_ms=T0 + seq, result=res, attrs=result_attrs(res))


async def test_states_move_forward_only_and_reports_apply_once(store: CommandStore) -> None:
    """Reports move a command forward; a late `received` or a resent record changes nothing."""
    await store.insert(_cmd("c1"), now_ms=T0)
    with pytest.raises(DuplicateCommandError):
        await store.insert(_cmd("c1"), now_ms=T0)
    await store.mark_sent("c1", now_ms=T0 + 1)
    await store.mark_sent("c1", now_ms=T0 + 2)
    sent = await store.get("c1")
    assert (sent.state, sent.sent_count, sent.last_sent_ms) == (S.SENT, 2, T0 + 2)
    moved = await store.apply_reports("gw-1", "s1", [_rep(3, "c1", S.SUCCEEDED, readback=1),
                                                     _rep(1, "c1", S.RECEIVED),
                                                     _rep(2, "c1", S.EXECUTING)], now_ms=T0 + 5)
    assert moved == 3  # applied in seq order: received, executing, succeeded
    assert await store.apply_reports("gw-1", "s1", [_rep(1, "c1", S.RECEIVED)]) == 0
    late = await store.apply_reports("gw-1", "s2", [_rep(1, "c1", S.RECEIVED)])
    assert late == 0
    done = await store.get("c1")
    assert (done.state, done.state_source, done.result) == (
        S.SUCCEEDED, "gateway", {"cmd_id": "c1", "state": "succeeded", "kind": "write_point",
                                 "readback": 1})
    history = await store.history("c1")
    assert [(e.state, e.source, e.applied) for e in history] == [
        ("pending", "central", True), ("sent", "central", True), ("received", "gateway", True),
        ("executing", "gateway", True), ("succeeded", "gateway", True),
        ("received", "gateway", False)]


async def test_history_only_reports(store: CommandStore) -> None:
    """Replay notices, unverified reports and another gateway's reports never move the state."""
    await store.insert(_cmd("c1"), now_ms=T0)
    reports = [_rep(1, "c1", S.REJECTED, Reason.REPLAY),
               _rep(2, "c1", S.REJECTED, Reason.BAD_SIGNATURE, verified=False)]
    assert await store.apply_reports("gw-1", "s", reports) == 0
    assert await store.apply_reports("gw-2", "t", [_rep(1, "c1", S.SUCCEEDED)]) == 0
    cmd = await store.get("c1")
    assert cmd.state is S.PENDING
    assert [(e.reason, e.applied) for e in await store.history("c1")][1:] == [
        ("replay", False), ("bad_signature", False), (None, False)]


async def test_unknown_cmd_ids_become_gateway_origin_rows(store: CommandStore) -> None:
    """A report about a command central never issued (forged) is kept as a gateway-origin row."""
    await store.apply_reports("gw-1", "s", [_rep(7, "forged1", S.REJECTED, Reason.BAD_SIGNATURE,
                                                 verified=False)])
    row = await store.get("forged1")
    assert (row.origin, row.state, row.reason, row.gw) == (ORIGIN_GATEWAY, S.REJECTED,
                                                           "bad_signature", "gw-1")
    with pytest.raises(UnknownCommandError):
        await store.get("nope")


async def test_expiry_by_central_and_gateway_truth(store: CommandStore) -> None:
    """Central expires undelivered commands; the gateway's own outcome still overrides that."""
    await store.insert(_cmd("old", expires=T0 + 10), now_ms=T0)
    await store.insert(_cmd("new", expires=T0 + 10_000), now_ms=T0)
    expired = await store.expire_due(now_ms=T0 + 10)
    assert [c.cmd_id for c in expired] == ["old"]
    assert (await store.get("old")).reason == "not_delivered"
    assert [c.cmd_id for c in await store.due(now_ms=T0 + 10)] == ["new"]
    await store.apply_reports("gw-1", "s", [_rep(1, "old", S.SUCCEEDED)])
    assert (await store.get("old")).state is S.SUCCEEDED
    assert [c.cmd_id for c in await store.list(gw="gw-1", state="pending")] == ["new"]


async def test_a_gateways_change_counter_moves_exactly_when_its_list_changes(
        store: CommandStore) -> None:
    """`changes` (the console's change marker): after each write, a gateway's counter moved
    if and only if its `list` changed — issue, approval, first send, resend (only the count
    moves), a report, a report about an unknown command, expiry, a retire's cancel; a
    history-only report moves nothing, and another gateway's counter stays put."""
    gws = ["gw-1", "gw-2", "gw-3"]

    async def snapshot() -> dict[str, tuple[int, list[StoredCommand]]]:
        changes = await store.changes(gws)
        return {gw: (changes[gw].count, await store.list(gw=gw)) for gw in gws}

    critical = dataclasses.replace(_cmd("c2", gw="gw-2"), issued_by="duty-1",
                                   approval=APPROVAL_REQUIRED)
    steps = [
        ("issue", lambda: store.insert(_cmd("c1"), now_ms=T0)),
        ("issue critical", lambda: store.insert(critical, now_ms=T0)),
        ("approve", lambda: store.approve("c2", "duty-2", now_ms=T0 + 1)),
        ("send", lambda: store.mark_sent("c1", now_ms=T0 + 2)),
        ("resend", lambda: store.mark_sent("c1", now_ms=T0 + 3)),
        ("report", lambda: store.apply_reports("gw-1", "s", [_rep(1, "c1", S.RECEIVED)])),
        ("history only", lambda: store.apply_reports("gw-1", "s", [
            _rep(2, "c1", S.REJECTED, Reason.REPLAY)])),
        ("another's report", lambda: store.apply_reports("gw-3", "t", [
            _rep(1, "c1", S.SUCCEEDED)])),
        ("unknown command", lambda: store.apply_reports("gw-3", "t", [
            _rep(2, "forged", S.REJECTED, Reason.BAD_SIGNATURE, verified=False)])),
        ("issue to expire", lambda: store.insert(_cmd("c4"), now_ms=T0 + 4)),
        ("expire", lambda: store.expire_due(now_ms=T0 + 60_000)),
        ("issue again", lambda: store.insert(_cmd("c3", gw="gw-2"), now_ms=T0 + 60_001)),
        ("cancel", lambda: store.cancel_open("gw-2", "retired", now_ms=T0 + 60_002)),
    ]
    before = await snapshot()
    assert {gw: c for gw, (c, _) in before.items()} == {"gw-1": 0, "gw-2": 0, "gw-3": 0}
    moved = {}
    for name, step in steps:
        await step()
        after = await snapshot()
        for gw in gws:
            counted, listed = after[gw][0] != before[gw][0], after[gw][1] != before[gw][1]
            assert counted == listed, (name, gw, before[gw], after[gw])
        moved[name] = [gw for gw in gws if after[gw][0] != before[gw][0]]
        before = after
    assert moved == {"issue": ["gw-1"], "issue critical": ["gw-2"], "approve": ["gw-2"],
                     "send": ["gw-1"], "resend": ["gw-1"], "report": ["gw-1"],
                     "history only": [], "another's report": [], "unknown command": ["gw-3"],
                     "issue to expire": ["gw-1"], "expire": ["gw-1", "gw-2"], "issue again": ["gw-2"], "cancel": ["gw-2"]}


async def test_store_shares_the_database_with_storage(tmp_path: Path) -> None:
    """The command tables live in the same SQLite file as central's storage, with their own version."""
    from central.storage import open_storage

    url = f"sqlite:///{tmp_path}/central.db"
    async with open_storage(url), CommandStore(url) as store:
        await store.insert(_cmd("c1"), now_ms=T0)
    async with CommandStore(url) as store:  # reopened: migrations are not run twice
        assert (await store.get("c1")).state is S.PENDING


def test_signing_key_is_created_private_and_reused(tmp_path: Path) -> None:
    """The key file is made once with mode 0600 next to the database and loads the same key."""
    settings = Settings(db_url=f"sqlite:///{tmp_path}/db/central.db")
    path = key_path_for(settings)
    assert path == tmp_path / "db" / "central-command-key.pem"
    first = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_key(path)
    assert public_key_raw(first.public_key()) == public_key_raw(again.public_key())
    assert key_path_for(Settings(db_url="sqlite:///:memory:")) is None
    assert key_path_for(Settings(command_key_path=tmp_path / "k.pem")) == tmp_path / "k.pem"
    (tmp_path / "bad.pem").write_text("nope")
    with pytest.raises(SigningKeyError):
        load_or_create_key(tmp_path / "bad.pem")


async def test_a_retired_gateway_gets_no_command_and_its_open_ones_end(db_url: str) -> None:
    """Once a gateway is retired the store refuses a new command for it (in the insert's own
    transaction) and `still_due` says no for its open ones, before `cancel_open` ends them."""
    from central.identity.audit import AuditLog
    from central.identity.retire import GatewayRetiredError, retire
    from central.storage import open_storage

    async with open_storage(db_url) as st, CommandStore(db_url) as store:
        await st.record_state("gw-1", State(True, "b", "1", "ip", 0, T0, "gw-1"))
        await store.insert(_cmd("before"), now_ms=T0)
        assert await store.still_due("before")
        await retire(st, AuditLog(st), "gw-1", user="admin-1", reason="flooded")
        with pytest.raises(GatewayRetiredError):
            await store.insert(_cmd("after"), now_ms=T0)
        with pytest.raises(UnknownCommandError):
            await store.get("after")
        assert not await store.still_due("before")
        assert [c.cmd_id for c in await store.cancel_open("gw-1", "retired")] == ["before"]


@pytest.mark.postgres
async def test_cancel_open_waits_for_an_insert_that_checked_before_the_retire() -> None:
    """PostgreSQL: an insert whose transaction checked the gateway in service before the
    retire committed, and commits only after `cancel_open` started, is still cancelled:
    `cancel_open` waits for the insert's gateway lock instead of missing its uncommitted row."""
    import asyncio
    import zlib

    import psycopg

    from central.identity.audit import AuditLog
    from central.identity.retire import retire
    from central.storage import open_storage

    with pg_schema("fl_cmd") as url:
        async with open_storage(url) as st, CommandStore(url) as store:
            await st.record_state("gw-1", State(True, "b", "1", "ip", 0, T0, "gw-1"))
            key = zlib.crc32(b"fieldlink.central.gw:gw-1")
            with psycopg.connect(url, autocommit=True) as conn:
                pid = conn.info.backend_pid
                with conn.transaction():  # the insert's transaction, as `insert` runs it
                    conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (key,))
                    conn.execute("SELECT 1 FROM retired_gateways WHERE gw = 'gw-1'")
                    await retire(st, AuditLog(st), "gw-1", user="admin-1", reason="flooded")
                    cancel = asyncio.create_task(store.cancel_open("gw-1", "retired"))
                    while not cancel.done() and not _waits_for(conn, pid):
                        await asyncio.sleep(0.01)  # until it waits on the lock (or is done)
                    conn.execute("INSERT INTO commands (cmd_id, gw, kind, target, args,"
                                 " issued_at_ms, expires_at_ms, state, state_source, origin,"
                                 " created_ms, updated_ms) VALUES ('racer', 'gw-1', 'sync_time',"
                                 " '', '{}', %s, %s, 'pending', 'central', 'central', %s, %s)",
                                 (T0, T0 + 60_000, T0, T0))
            assert [c.cmd_id for c in await cancel] == ["racer"]


def _waits_for(conn: Any, holder: int) -> bool:
    """Whether some session waits for an advisory lock `holder` holds."""
    return conn.execute("SELECT count(*) FROM pg_locks w JOIN pg_locks h ON"
                        " h.locktype = 'advisory' AND h.objid = w.objid AND h.pid = %s"
                        " WHERE w.locktype = 'advisory' AND NOT w.granted",
                        (holder,)).fetchone()[0] > 0
