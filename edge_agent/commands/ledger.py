"""The gateway's command ledger: every accepted `cmd_id` and its state, in `commands.db` next to
the outbox (DESIGN.md §6: replays are rejected, a command executes at most once).

One row per command the gateway accepted (signature, gateway and expiry checked). The row is
inserted before anything is reported (`claim`: a second claim of the same id fails, which is
how a replay is recognised), moved to `executing` and committed BEFORE the command acts, and
to its final state after. So after a crash a row still `received` or `executing` means "may
have acted, outcome unknown": the executor reports it `failed` with reason `interrupted` and
never runs it again.

`reported` is the last state appended to the outbox. The ledger and the outbox are separate
files (no shared transaction), so the order is: save the state here, append the report, mark
it reported. A crash in between leaves `reported != state`, and the report is appended again
on the next start (central ignores a report it already holds).

Rows are kept until `keep_until_ms`, which the executor sets well past the command's
`expires_at`, so a replay after pruning is refused as expired instead. Commits use
`synchronous=FULL`; one thread owns the connection and callers await it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edge_agent import EdgeError, SchemaTooNewError
from protocols.command_results import CommandState
from runtime.sqlite import Migrations, SqliteStore

_SCHEMA = """
CREATE TABLE commands (
    cmd_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    state TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    keep_until_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    result TEXT,            -- JSON attrs of the last report for `state`
    reported TEXT           -- the state last appended to the outbox (NULL: none yet)
);
CREATE INDEX commands_keep ON commands (keep_until_ms);
"""
_UNFINISHED = (str(CommandState.RECEIVED), str(CommandState.EXECUTING))
_COLS = ("cmd_id, kind, target, state, expires_at_ms, keep_until_ms, received_ms, updated_ms, "
         "result, reported")


class CommandLedgerError(EdgeError):
    """The ledger file cannot be opened, read or written (wraps the sqlite3 error)."""


class CommandLedgerVersionError(CommandLedgerError, SchemaTooNewError):
    store = "command ledger"


_MIGRATIONS = Migrations(CommandLedgerVersionError)
_MIGRATIONS.sql(1, _SCHEMA)


SCHEMA_VERSION = _MIGRATIONS.latest


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    cmd_id: str
    kind: str
    target: str
    state: CommandState
    expires_at_ms: int
    keep_until_ms: int
    received_ms: int
    updated_ms: int
    result: Mapping[str, Any] | None
    reported: CommandState | None

    @property
    def unfinished(self) -> bool:
        return self.state in (CommandState.RECEIVED, CommandState.EXECUTING)


def _entry(row: tuple[Any, ...]) -> LedgerEntry:
    return LedgerEntry(cmd_id=row[0], kind=row[1], target=row[2], state=CommandState(row[3]),
                       expires_at_ms=row[4], keep_until_ms=row[5], received_ms=row[6],
                       updated_ms=row[7], result=json.loads(row[8]) if row[8] else None,
                       reported=CommandState(row[9]) if row[9] else None)


class CommandLedger(SqliteStore):
    """Executed cmd_ids and their states. Open with `async with CommandLedger.open(path)`."""

    name = "command ledger"
    error = CommandLedgerError
    migrations = _MIGRATIONS

    # --- public API --------------------------------------------------------------------

    async def claim(self, *, cmd_id: str, kind: str, target: str, expires_at_ms: int,
                    keep_until_ms: int, now_ms: int) -> bool:
        """Record a newly accepted command as `received`; False when the id is already known."""
        return await self._run(self._claim_sync, cmd_id, kind, target, expires_at_ms,
                                keep_until_ms, now_ms)

    async def set_state(self, cmd_id: str, state: CommandState, result: Mapping[str, Any],
                        now_ms: int) -> None:
        """Save the command's new state (and the attrs reported for it) durably."""
        await self._run(self._set_state_sync, cmd_id, str(state),
                         json.dumps(dict(result), ensure_ascii=False, default=str), now_ms)

    async def mark_reported(self, cmd_id: str, state: CommandState) -> None:
        await self._run(self._write, "UPDATE commands SET reported = ? WHERE cmd_id = ?",
                         (str(state), cmd_id))

    async def get(self, cmd_id: str) -> LedgerEntry | None:
        rows = await self._run(self._query, f"SELECT {_COLS} FROM commands WHERE cmd_id = ?",
                                (cmd_id,))
        return _entry(rows[0]) if rows else None

    async def unfinished(self) -> list[LedgerEntry]:
        """Commands that were received or executing when the agent stopped."""
        rows = await self._run(self._query, f"SELECT {_COLS} FROM commands WHERE state IN (?, ?)"
                                " ORDER BY received_ms", _UNFINISHED)
        return [_entry(r) for r in rows]

    async def unreported(self) -> list[LedgerEntry]:
        """Commands whose current state has not been appended to the outbox yet."""
        rows = await self._run(self._query, f"SELECT {_COLS} FROM commands WHERE reported IS NULL"
                                " OR reported <> state ORDER BY updated_ms", ())
        return [_entry(r) for r in rows]

    async def prune(self, now_ms: int) -> int:
        """Forget finished commands whose retention has passed; returns rows deleted."""
        return await self._run(self._write, "DELETE FROM commands WHERE keep_until_ms < ?"
                                " AND state NOT IN (?, ?)", (now_ms, *_UNFINISHED))

    async def count(self) -> int:
        rows = await self._run(self._query, "SELECT count(*) FROM commands", ())
        return int(rows[0][0])

    # --- plumbing ----------------------------------------------------------------------

    def _claim_sync(self, cmd_id: str, kind: str, target: str, expires_at_ms: int,
                    keep_until_ms: int, now_ms: int) -> bool:
        return self._write(
            f"INSERT INTO commands ({_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)"
            " ON CONFLICT (cmd_id) DO NOTHING",
            (cmd_id, kind, target, str(CommandState.RECEIVED), expires_at_ms, keep_until_ms,
             now_ms, now_ms)) == 1

    def _set_state_sync(self, cmd_id: str, state: str, result: str, now_ms: int) -> None:
        self._write("UPDATE commands SET state = ?, result = ?, updated_ms = ? WHERE cmd_id = ?",
                    (state, result, now_ms, cmd_id))
