"""Central's durable command tables (DESIGN.md §6), beside the main storage in the same database.

Two tables: `commands` (one row per command: what, for whom, its lifetime, its current state
and who set it, delivery counters) and `command_events` (its history). The module keeps its own
migration list and version table (`commands_schema_version`), so it shares the database file
or PostgreSQL schema with `central.storage` without touching that backend's migrations.

State moves only forward (`CommandState.rank`): a late `received` after `succeeded` changes
nothing. Reports from a gateway are applied idempotently: each is keyed by the record that
carried it, `(gw, stream, seq)`, so a batch the gateway sends again changes nothing twice.
Three kinds of report only add history, never move the state: a replay notice, a report the
gateway could not verify (bad signature: the cmd_id is only what the bytes claimed), and a
report from a gateway other than the command's. One exception to "forward only": `expired`
set by central itself ("not delivered before expiry") gives way to what the gateway reports,
since the gateway may have taken the command just before it expired.

A command to a safety-critical point (DESIGN.md §8) is stored with `approval = "required"`
and is not due (so never signed nor sent) until a second operator, not the one who issued it,
approves it (`approve`); `issued_by` and `approved_by` name them.

A retired gateway gets no new command, and none slips past a retire: `insert` refuses one
(`GatewayRetiredError`, 409) in its own transaction, and the retire's `cancel_open` ends every
open one. On SQLite the two transactions are serialized by the write lock; on PostgreSQL
(READ COMMITTED: a row not yet committed is invisible to `cancel_open`) both take a per-gateway
advisory lock, `insert` shared and `cancel_open` exclusive, so an insert that checked before
the retire committed is committed (and cancelled) before `cancel_open` looks. The check reads
`central.storage`'s `retired_gateways`: central opens its main storage first. It and
`still_due` (the dispatcher's last look) read the table, never the process's cached list
(`central.identity.retire.RetiredGate`, seconds old on another worker): they are what closes
the race with a retire, so they must see it the moment it commits.

A report naming a cmd_id central never issued (a forged or foreign command the gateway
refused) gets a row with `origin = "gateway"`, so the duty officer sees it.

Both backends run the same SQL through a DB-API connection owned by one thread: `sqlite3` on
the database file, or psycopg (sync) on PostgreSQL; `?` placeholders become `%s` there (the
plumbing is `central.storage.side_store.SideStore`, shared with the identity tables).
"""

from __future__ import annotations

import builtins
import json
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from central import CentralError, DuplicateError
from central.commands.schema import MIGRATIONS
from central.identity.retire import GatewayRetiredError
from central.storage.retire_schema import in_service
from central.storage.side_store import SideStore
from protocols.command_results import CommandResult, CommandState, Reason
from protocols.errors import DetailedError
from runtime import clock

log = structlog.get_logger(__name__)

ORIGIN_CENTRAL = "central"
ORIGIN_GATEWAY = "gateway"  # only known from a gateway's report
SOURCE_CENTRAL = "central"
SOURCE_GATEWAY = "gateway"
APPROVAL_REQUIRED = "required"
APPROVED = "approved"
_OPEN = (str(CommandState.PENDING), str(CommandState.SENT))


class CommandStoreError(CentralError):
    """Base of the command store's errors; wraps the driver error it came from."""


class UnknownCommandError(CommandStoreError):
    kind = "command"

    def __init__(self, cmd_id: str) -> None:
        super().__init__(f"unknown command {cmd_id!r}")
        self.ref = cmd_id


class ApprovalError(CommandStoreError, DetailedError):
    """An approval central refuses: nothing to approve, or the issuer approving their own."""

    template = "command {cmd_id}: {reason}"
    cmd_id: str
    reason: str


class DuplicateCommandError(CommandStoreError, DuplicateError):
    kind = "command"


# --- values -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredCommand:
    cmd_id: str
    gw: str
    kind: str
    target: str
    args: Mapping[str, Any]
    issued_at_ms: int | None
    expires_at_ms: int | None
    state: CommandState
    state_source: str
    reason: str | None = None
    detail: str | None = None
    result: Mapping[str, Any] | None = None  # attrs of the report that set the state
    origin: str = ORIGIN_CENTRAL
    created_ms: int = 0
    updated_ms: int = 0
    sent_count: int = 0
    last_sent_ms: int | None = None
    issued_by: str | None = None  # the user who issued it (None: before logins existed)
    approval: str | None = None  # None: not needed; APPROVAL_REQUIRED; APPROVED
    approved_by: str | None = None
    approved_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Moved:
    """A report that moved a command's state."""

    cmd_id: str
    state: str
    reason: str | None


@dataclass(frozen=True, slots=True)
class Change:
    """A gateway's change marker (`CommandStore.changes`)."""

    count: int  # bumped by every write to one of its commands
    path: str | None  # its listed area path (`LISTED_PATHS`)


@dataclass(frozen=True, slots=True)
class CommandEvent:
    ts_ms: int  # gateway's record time for a report, central's clock for its own events
    state: str
    source: str
    reason: str | None
    detail: str | None
    attrs: Mapping[str, Any] | None
    applied: bool  # whether it moved the command's state
    received_ms: int


@dataclass(frozen=True, slots=True)
class Report:
    """One CMD_RESULT record as central received it."""

    seq: int
    ts_ms: int
    result: CommandResult
    attrs: Mapping[str, Any] = field(default_factory=dict)


# --- schema: central.commands.schema

_COLS = ("cmd_id, gw, kind, target, args, issued_at_ms, expires_at_ms, state, state_source,"
         " reason, detail, result, origin, created_ms, updated_ms, sent_count, last_sent_ms,"
         " issued_by, approval, approved_by, approved_ms")
_VALUES = "(" + ", ".join("?" * 21) + ")"
# The area path of each gateway `list_gateways` lists (heard of, in service, at a site); a
# user scoped to an area sees no command of any other. End it with `IN (…)`.
LISTED_PATHS = ("SELECT g.gw, NULL, ar.path FROM gateways g JOIN gateway_sites gs ON gs.gw = g.gw"
                f" JOIN areas ar ON ar.id = gs.area_id WHERE {in_service('g.gw')} AND g.gw")


def _json(value: Mapping[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(dict(value), ensure_ascii=False, default=str)


def _command_row(r: Sequence[Any]) -> StoredCommand:
    return StoredCommand(cmd_id=r[0], gw=r[1], kind=r[2], target=r[3], args=json.loads(r[4]),
                         issued_at_ms=r[5], expires_at_ms=r[6], state=CommandState(r[7]),
                         state_source=r[8], reason=r[9], detail=r[10],
                         result=json.loads(r[11]) if r[11] else None, origin=r[12],
                         created_ms=r[13], updated_ms=r[14], sent_count=r[15], last_sent_ms=r[16],
                         issued_by=r[17], approval=r[18], approved_by=r[19], approved_ms=r[20])


# --- the store ------------------------------------------------------------------------------------


class CommandStore(SideStore):
    """The command tables on `db_url` (`sqlite:///PATH` or `postgresql://...`).

    Example::

        async with CommandStore("sqlite:///./central.db") as store:
            await store.insert(cmd)
    """

    def __init__(self, db_url: str) -> None:
        super().__init__(db_url, name="commands", error=CommandStoreError, migrations=MIGRATIONS)

    # --- writes -------------------------------------------------------------------------------

    async def insert(self, cmd: StoredCommand, *, now_ms: int | None = None) -> None:
        """Store a newly issued command and its first history event. Raises
        `GatewayRetiredError` if its gateway is retired (checked in the same transaction, so a
        retire between the caller's check and here cannot leave it open), or
        `DuplicateCommandError`."""
        now = clock.now_ms() if now_ms is None else now_ms

        def body() -> bool:
            with self._tx() as cur:
                self._hold_gateway(cur, cmd.gw, exclusive=False)
                if self._q(cur, "SELECT 1 FROM retired_gateways WHERE gw = ?",
                           (cmd.gw,)).fetchone() is not None:
                    return False
                n = self._q(cur, f"INSERT INTO commands ({_COLS}) VALUES {_VALUES}"
                                 " ON CONFLICT (cmd_id) DO NOTHING",
                            (cmd.cmd_id, cmd.gw, cmd.kind, cmd.target, _json(cmd.args),
                             cmd.issued_at_ms, cmd.expires_at_ms, str(cmd.state),
                             cmd.state_source, cmd.reason, cmd.detail, _json(cmd.result),
                             cmd.origin, now, now, 0, None, cmd.issued_by, cmd.approval,
                             None, None)).rowcount
                if n != 1:
                    raise DuplicateCommandError(cmd.cmd_id)
                detail = "issued" if cmd.issued_by is None else f"issued by {cmd.issued_by}"
                if cmd.approval == APPROVAL_REQUIRED:
                    detail += "; safety-critical: waits for a second operator's approval"
                self._event(cur, cmd.cmd_id, now, str(cmd.state), SOURCE_CENTRAL, None,
                            detail, None, True, now)
                self._changed(cur, [cmd.gw])
                return True

        if not await self._call(body):
            log.warning("command_refused_retired", cmd_id=cmd.cmd_id, gw=cmd.gw)
            raise GatewayRetiredError(cmd.gw)

    def _hold_gateway(self, cur: Any, gw: str, *, exclusive: bool) -> None:
        """PostgreSQL: lock `gw` against a concurrent retire until the transaction ends (see
        the module doc); SQLite's `BEGIN IMMEDIATE` serializes the writers already."""
        if self.postgres:
            fn = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
            self._q(cur, f"SELECT {fn}(?)", (zlib.crc32(f"fieldlink.central.gw:{gw}".encode()),))

    def _changed(self, cur: Any, gws: Iterable[str]) -> None:
        """Bump the change counter of each of `gws` (in order, so two writers lock the rows
        alike): one of its commands changed in this transaction (see `changes`)."""
        for gw in sorted(set(gws)):
            self._q(cur, "INSERT INTO command_changes (gw, n) VALUES (?, 1)"
                         " ON CONFLICT (gw) DO UPDATE SET n = command_changes.n + 1", (gw,))

    def _event(self, cur: Any, cmd_id: str, ts_ms: int, state: str, source: str,
               reason: str | None, detail: str | None, attrs: Mapping[str, Any] | None,
               applied: bool, now: int, key: tuple[str, str, int] | None = None) -> bool:
        gw, stream, seq = key if key is not None else (None, None, None)
        return bool(self._q(cur, "INSERT INTO command_events (cmd_id, ts_ms, state, source,"
                                 " reason, detail, attrs, applied, received_ms, gw, stream, seq)"
                                 " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                                 " ON CONFLICT (gw, stream, seq) DO NOTHING",
                            (cmd_id, ts_ms, state, source, reason, detail, _json(attrs),
                             int(applied), now, gw, stream, seq)).rowcount)

    async def mark_sent(self, cmd_id: str, *, now_ms: int | None = None) -> None:
        """Count a publish; the first one moves `pending` to `sent`."""
        now = clock.now_ms() if now_ms is None else now_ms

        def body() -> None:
            with self._tx() as cur:
                n = self._q(cur, "UPDATE commands SET state = ?, state_source = ?, updated_ms = ?"
                                 " WHERE cmd_id = ? AND state = ?",
                            (str(CommandState.SENT), SOURCE_CENTRAL, now, cmd_id,
                             str(CommandState.PENDING))).rowcount
                sent = self._q(cur, "UPDATE commands SET sent_count = sent_count + 1,"
                                    " last_sent_ms = ? WHERE cmd_id = ? RETURNING gw",
                               (now, cmd_id)).fetchall()
                self._changed(cur, [r[0] for r in sent])
                if n:
                    self._event(cur, cmd_id, now, str(CommandState.SENT), SOURCE_CENTRAL, None,
                                None, None, True, now)

        await self._call(body)

    async def expire_due(self, *, now_ms: int | None = None) -> list[StoredCommand]:
        """Mark `expired` every pending/sent command past its expiry; returns them. The
        dispatcher asks every tick: a read finds (through the state/expiry index) that none is
        due without taking the write lock the ingest commits wait for."""
        now = clock.now_ms() if now_ms is None else now_ms
        if not await self._call(self._read, "SELECT 1 FROM commands WHERE state IN (?, ?)"
                                " AND expires_at_ms <= ? LIMIT 1", (*_OPEN, now)):
            return []

        return await self._expire_open("expires_at_ms <= ?", (now,),
                                       "the gateway did not take it before it expired", now)

    async def cancel_open(self, gw: str, detail: str, *,
                          now_ms: int | None = None) -> list[StoredCommand]:
        """Mark `expired` (not delivered, with `detail`) every pending/sent command of `gw`:
        the gateway was retired, nothing will take them. Returns them."""
        now = clock.now_ms() if now_ms is None else now_ms
        return await self._expire_open("gw = ?", (gw,), detail, now, gw)

    async def _expire_open(self, where: str, params: tuple[Any, ...], detail: str,
                           now: int, hold: str | None = None) -> list[StoredCommand]:
        def body() -> list[StoredCommand]:
            with self._tx() as cur:
                if hold is not None:  # inserts that checked before the retire are in
                    self._hold_gateway(cur, hold, exclusive=True)
                rows = self._q(cur, f"SELECT {_COLS} FROM commands WHERE state IN (?, ?)"
                                    f" AND {where} ORDER BY cmd_id", (*_OPEN, *params)).fetchall()
                out = []
                for r in rows:
                    n = self._q(cur, "UPDATE commands SET state = ?, state_source = ?,"
                                     " reason = ?, detail = ?, updated_ms = ? WHERE cmd_id = ?"
                                     " AND state IN (?, ?)",
                                (str(CommandState.EXPIRED), SOURCE_CENTRAL,
                                 str(Reason.NOT_DELIVERED), detail, now, r[0],
                                 *_OPEN)).rowcount
                    if n:
                        self._event(cur, r[0], now, str(CommandState.EXPIRED), SOURCE_CENTRAL,
                                    str(Reason.NOT_DELIVERED), None, None, True, now)
                        out.append(_command_row(r))
                self._changed(cur, [c.gw for c in out])
                return out

        return await self._call(body)

    async def apply_reports(self, gw: str, stream: str, reports: Sequence[Report], *,
                            now_ms: int | None = None) -> int:
        """Apply a gateway's CMD_RESULT reports (in seq order) in one transaction; returns how
        many moved a command's state. Reports already held change nothing."""
        return len(await self.apply_reports_detailed(gw, stream, reports, now_ms=now_ms))

    async def apply_reports_detailed(self, gw: str, stream: str, reports: Sequence[Report], *,
                                     now_ms: int | None = None) -> list[Moved]:
        """`apply_reports`, returning what moved (for the audit log)."""
        now = clock.now_ms() if now_ms is None else now_ms
        ordered = sorted(reports, key=lambda r: r.seq)
        return await self._call(self._apply_sync, gw, stream, ordered, now)

    def _apply_sync(self, gw: str, stream: str, reports: Sequence[Report],
                    now: int) -> list[Moved]:
        moved: list[Moved] = []
        with self._tx() as cur:
            for rep in reports:
                res = rep.result
                row = self._q(cur, "SELECT gw, state, state_source FROM commands WHERE cmd_id = ?",
                              (res.cmd_id,)).fetchone()
                applies = False
                if row is None:
                    applies = True
                elif row[0] == gw and res.affects_state:
                    cur_state = CommandState(row[1])
                    applies = res.state.rank > cur_state.rank or (
                        cur_state is CommandState.EXPIRED and row[2] == SOURCE_CENTRAL
                        and res.state is not CommandState.EXPIRED)
                reason = None if res.reason is None else str(res.reason)
                inserted = self._event(cur, res.cmd_id, rep.ts_ms, str(res.state), SOURCE_GATEWAY,
                                       reason, res.detail, rep.attrs, applies, now,
                                       (gw, stream, rep.seq))
                if not inserted:
                    continue  # this very record was applied before
                if row is None:
                    log.warning("command_report_unknown", gw=gw, cmd_id=res.cmd_id,
                                state=str(res.state), reason=reason, verified=res.verified)
                    self._q(cur, f"INSERT INTO commands ({_COLS}) VALUES {_VALUES}",
                            (res.cmd_id, gw, res.kind or "", "", "{}", None, None,
                             str(res.state), SOURCE_GATEWAY, reason, res.detail,
                             _json(rep.attrs), ORIGIN_GATEWAY, now, now, 0, None,
                             None, None, None, None))
                    moved.append(Moved(res.cmd_id, str(res.state), reason))
                elif applies:
                    self._q(cur, "UPDATE commands SET state = ?, state_source = ?, reason = ?,"
                                 " detail = ?, result = ?, updated_ms = ? WHERE cmd_id = ?",
                            (str(res.state), SOURCE_GATEWAY, reason, res.detail,
                             _json(rep.attrs), now, res.cmd_id))
                    moved.append(Moved(res.cmd_id, str(res.state), reason))
            if moved:  # every command that moved is `gw`'s (or new, with `gw`)
                self._changed(cur, [gw])
        return moved

    async def approve(self, cmd_id: str, approver: str, *,
                      now_ms: int | None = None) -> StoredCommand:
        """A second operator's approval: the command becomes due. Raises `UnknownCommandError`
        or `ApprovalError` (nothing awaits approval, or the approver issued it)."""
        now = clock.now_ms() if now_ms is None else now_ms

        def body() -> None:
            with self._tx() as cur:
                row = self._q(cur, "SELECT issued_by, approval, state, gw FROM commands"
                                   " WHERE cmd_id = ?", (cmd_id,)).fetchone()
                if row is None:
                    raise UnknownCommandError(cmd_id)
                issued_by, approval, state, row_gw = row
                if approval != APPROVAL_REQUIRED:
                    raise ApprovalError(cmd_id, "does not await approval"
                                        if approval is None else "already approved")
                if state not in _OPEN:
                    raise ApprovalError(cmd_id, f"is {state}")
                if issued_by == approver:
                    raise ApprovalError(cmd_id, f"issued by {approver}: a second operator "
                                                "must approve it")
                self._q(cur, "UPDATE commands SET approval = ?, approved_by = ?, approved_ms = ?,"
                             " updated_ms = ? WHERE cmd_id = ?",
                        (APPROVED, approver, now, now, cmd_id))
                self._changed(cur, [row_gw])
                self._event(cur, cmd_id, now, str(state), SOURCE_CENTRAL, None,
                            f"approved by {approver}", None, False, now)

        await self._call(body)
        return await self.get(cmd_id)

    # --- reads --------------------------------------------------------------------------------

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        # Autocommit: a read takes no write lock (SQLite) and holds no transaction open.
        return list(self._q(self._db().cursor(), sql, params).fetchall())

    async def get(self, cmd_id: str) -> StoredCommand:
        rows = await self._call(self._read, f"SELECT {_COLS} FROM commands WHERE cmd_id = ?",
                                (cmd_id,))
        if not rows:
            raise UnknownCommandError(cmd_id)
        return _command_row(rows[0])

    async def still_due(self, cmd_id: str) -> bool:
        """Whether the command is still open and its gateway in service: the dispatcher asks
        just before it publishes, so a command listed before a retire does not go out after."""
        return bool(await self._call(self._read, "SELECT 1 FROM commands WHERE cmd_id = ? AND"
                                     f" state IN (?, ?) AND {in_service()}", (cmd_id, *_OPEN)))

    async def changes(self, gws: Sequence[str]) -> dict[str, Change]:
        """What `list(gw=…)` and its area scope depend on, for each of `gws`, in one query:
        its change counter (bumped by every write to one of its commands) and its listed area
        path (`LISTED_PATHS`: moved, retired, unretired, placed or first heard of, whichever
        process did it). An unchanged `Change` means an unchanged list."""
        if not gws:
            return {}
        marks = ", ".join("?" * len(gws))
        rows = await self._call(self._read, f"SELECT gw, n, NULL FROM command_changes"
                                f" WHERE gw IN ({marks}) UNION ALL"
                                f" {LISTED_PATHS} IN ({marks})", (*gws, *gws))
        counts = {r[0]: int(r[1]) for r in rows if r[1] is not None}
        paths = {r[0]: str(r[2]) for r in rows if r[1] is None}
        return {gw: Change(counts.get(gw, 0), paths.get(gw)) for gw in gws}

    async def history(self, cmd_id: str) -> list[CommandEvent]:
        rows = await self._call(self._read, "SELECT ts_ms, state, source, reason, detail, attrs,"
                                " applied, received_ms FROM command_events WHERE cmd_id = ?"
                                " ORDER BY id", (cmd_id,))
        return [CommandEvent(ts_ms=r[0], state=r[1], source=r[2], reason=r[3], detail=r[4],
                             attrs=json.loads(r[5]) if r[5] else None, applied=bool(r[6]),
                             received_ms=r[7]) for r in rows]

    async def list(self, *, gw: str | None = None, state: str | None = None,
                   limit: int = 100, gw_in: Sequence[str] | None = None) -> list[StoredCommand]:
        """Newest first; `gw_in` keeps only those gateways' commands (an area scope)."""
        where: list[str] = []
        params: list[Any] = []
        if gw_in is not None:
            if not gw_in:
                return []
            where.append(f"gw IN ({', '.join('?' * len(gw_in))})")
            params.extend(gw_in)
        if gw is not None:
            where.append("gw = ?")
            params.append(gw)
        if state is not None:
            where.append("state = ?")
            params.append(state)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self._call(self._read, f"SELECT {_COLS} FROM commands {clause}"
                                " ORDER BY created_ms DESC, cmd_id LIMIT ?", (*params, limit))
        return [_command_row(r) for r in rows]

    async def due(self, *, now_ms: int | None = None,
                  gw: str | None = None) -> builtins.list[StoredCommand]:  # `list` is a method
        """Pending or sent (not yet `received`) commands that have not expired, oldest first."""
        now = clock.now_ms() if now_ms is None else now_ms
        sql = (f"SELECT {_COLS} FROM commands WHERE state IN (?, ?) AND expires_at_ms > ?"
               f" AND (approval IS NULL OR approval = '{APPROVED}')")
        params: list[Any] = [*_OPEN, now]
        if gw is not None:
            sql += " AND gw = ?"
            params.append(gw)
        rows = await self._call(self._read, sql + " ORDER BY created_ms, cmd_id", params)
        return [_command_row(r) for r in rows]
