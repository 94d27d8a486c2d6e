"""The terminal driver's own file, `terminals.db` beside the outbox: which warnings went to the
terminals under which wire id, which 叫应 events were already recorded, and each terminal's
open faults. All of it must survive a kill -9 and a power cut (`synchronous=FULL`).

- `warnings`: a callresp warning id (a string) gets a u32 wire id for FLT/1 PLAY frames
  (AUTOINCREMENT: never reused), so that an ACK arriving after a restart is still named.
- `events`: one row per (warning_id, terminal, type): the dedup key of `delivered` and `ack`
  records (and of the local rule's `callresp_local` report, terminal ""). The row is committed
  BEFORE the outbox append and before the terminal gets its RECEIPT; `reported` is set after
  the append. A repeated ACK (the terminal did not hear the RECEIPT, or the agent restarted)
  finds the row and is answered without a second record. A row not yet reported after a crash
  is appended at the next start (`unreported`). The ledger and the outbox are two files (the
  order of `edge_agent.commands.ledger`): after a crash between the append and its mark, the
  service finds the event among the outbox's unsent records at start and only marks it. Only
  if central had acknowledged it within that one commit would it go once more; central applies
  叫应 events idempotently, so the answer would still count once.
- `plays`: one row per signed command (cmd_id) whose warning was played, claimed BEFORE the
  PLAY goes out: the same command arriving by another bearer (radio after IP, IP after radio,
  or after a restart) finds the row and does not play again (at most once per cmd_id, as any
  command). `outcomes` keeps what the terminals answered the first play. A re-send from
  central is a new cmd_id for the same warning: it plays again.
- Reported rows older than 30 days are pruned (`TerminalService.report_loop`).
- `faults`: the faults each terminal has raised and not cleared, so that a restart does not
  raise them again.

One thread owns the connection; callers await it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent import SchemaTooNewError
from edge_agent.terminals.errors import TerminalStoreError
from runtime.sqlite import Migrations, SqliteStore, open_reader

_SCHEMA = """
CREATE TABLE warnings (
    wire_id INTEGER PRIMARY KEY AUTOINCREMENT,
    warning_id TEXT NOT NULL UNIQUE,
    origin TEXT NOT NULL,
    cmd_id TEXT,
    created_ms INTEGER NOT NULL
);
CREATE TABLE events (
    warning_id TEXT NOT NULL,
    terminal TEXT NOT NULL,
    type TEXT NOT NULL,
    attrs TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    reported INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (warning_id, terminal, type)
);
CREATE INDEX events_unreported ON events (reported) WHERE reported = 0;
CREATE TABLE faults (
    terminal TEXT NOT NULL,
    fault TEXT NOT NULL,
    since_ms INTEGER NOT NULL,
    PRIMARY KEY (terminal, fault)
)
"""
EventKey = tuple[str, str, str]  # warning_id, terminal, type


class TerminalLedgerError(TerminalStoreError):
    """`terminals.db` cannot be opened, read or written (wraps the sqlite3 error)."""


class TerminalLedgerVersionError(TerminalLedgerError, SchemaTooNewError):
    store = "terminal ledger"


_MIGRATIONS = Migrations(TerminalLedgerVersionError)
_MIGRATIONS.sql(1, _SCHEMA)
_MIGRATIONS.sql(2, "CREATE TABLE plays (cmd_id TEXT PRIMARY KEY, warning_id TEXT NOT NULL,"
                   " origin TEXT NOT NULL, outcomes TEXT, at_ms INTEGER NOT NULL)")


@dataclass(frozen=True, slots=True)
class WireWarning:
    wire_id: int
    warning_id: str
    origin: str
    cmd_id: str | None
    new: bool = False  # made by this call


class TerminalLedger(SqliteStore):
    """Open with `async with TerminalLedger.open(path)`; see the module doc."""

    name = "terminal ledger"
    error = TerminalLedgerError
    migrations = _MIGRATIONS

    # --- warnings ------------------------------------------------------------------------

    async def warning(self, warning_id: str, *, origin: str, cmd_id: str | None,
                      now_ms: int) -> WireWarning:
        """The wire id of `warning_id`, made on first use (`new`); a later command for the
        same warning updates the cmd_id its events carry."""
        return await self._run(self._warning_sync, warning_id, origin, cmd_id, now_ms)

    async def by_wire_id(self, wire_id: int) -> WireWarning | None:
        rows = await self._run(self._query, "SELECT wire_id, warning_id, origin, cmd_id FROM"
                               " warnings WHERE wire_id = ?", (wire_id,))
        return WireWarning(*rows[0]) if rows else None

    # --- plays (once per signed command) ------------------------------------------------

    async def claim_play(self, cmd_id: str, warning_id: str, *, origin: str,
                         now_ms: int) -> bool:
        """Claim the play of command `cmd_id` before it goes out; False if it was claimed
        before (by this or another bearer)."""
        return await self._run(self._write, "INSERT INTO plays (cmd_id, warning_id, origin,"
                               " at_ms) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                               (cmd_id, warning_id, origin, now_ms)) == 1

    async def save_play(self, cmd_id: str, outcomes: Mapping[str, Any]) -> None:
        """What the terminals answered the play of `cmd_id` (by terminal id)."""
        await self._run(self._write, "UPDATE plays SET outcomes = ? WHERE cmd_id = ?",
                        (json.dumps(dict(outcomes), ensure_ascii=False), cmd_id))

    async def played(self, cmd_id: str) -> tuple[str, str, dict[str, Any]] | None:
        """(origin, warning_id, outcomes) of the earlier play of `cmd_id`, or None; outcomes
        are empty while that play is still waiting for its answers."""
        rows = await self._run(self._query, "SELECT origin, warning_id, outcomes FROM plays"
                               " WHERE cmd_id = ?", (cmd_id,))
        if not rows:
            return None
        origin, warning_id, outcomes = rows[0]
        return str(origin), str(warning_id), json.loads(outcomes) if outcomes else {}

    async def has_event(self, key: EventKey) -> bool:
        rows = await self._run(self._query, "SELECT 1 FROM events WHERE warning_id = ? AND"
                               " terminal = ? AND type = ?", key)
        return bool(rows)

    # --- events --------------------------------------------------------------------------

    async def claim_event(self, key: EventKey, attrs: Mapping[str, Any], at_ms: int) -> bool:
        """Record an event before it goes to the outbox; False if it was recorded before."""
        return await self._run(self._write, "INSERT INTO events (warning_id, terminal, type,"
                               " attrs, at_ms) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                               (*key, json.dumps(dict(attrs), ensure_ascii=False), at_ms)) == 1

    async def mark_reported(self, key: EventKey) -> None:
        await self._run(self._write, "UPDATE events SET reported = 1 WHERE warning_id = ? AND"
                        " terminal = ? AND type = ?", key)

    async def unreported(self) -> list[tuple[EventKey, dict[str, Any]]]:
        rows = await self._run(self._query, "SELECT warning_id, terminal, type, attrs FROM events"
                               " WHERE reported = 0 ORDER BY at_ms", ())
        return [((r[0], r[1], r[2]), json.loads(r[3])) for r in rows]

    async def count_events(self, type_: str | None = None) -> int:
        where = "" if type_ is None else " WHERE type = ?"
        rows = await self._run(self._query, f"SELECT count(*) FROM events{where}",
                               () if type_ is None else (type_,))
        return int(rows[0][0])

    async def prune(self, before_ms: int) -> int:
        """Forget reported events and the warnings made before `before_ms` (a repeat of
        something that old is not expected); returns the rows deleted."""
        events = await self._run(self._write, "DELETE FROM events WHERE reported = 1 AND"
                                 " at_ms < ?", (before_ms,))
        warnings = await self._run(self._write, "DELETE FROM warnings WHERE created_ms < ? AND"
                                   " warning_id NOT IN (SELECT warning_id FROM events)",
                                   (before_ms,))
        plays = await self._run(self._write, "DELETE FROM plays WHERE at_ms < ?", (before_ms,))
        return int(events) + int(warnings) + int(plays)

    # --- faults --------------------------------------------------------------------------

    async def faults(self) -> dict[str, set[str]]:
        return {t: set(f) for t, f in (await self.fault_since()).items()}

    async def fault_since(self) -> dict[str, dict[str, int]]:
        """Each terminal's open faults, with when each was raised (ms)."""
        rows = await self._run(self._query, "SELECT terminal, fault, since_ms FROM faults", ())
        return _by_terminal(rows)

    async def set_fault(self, terminal: str, fault: str, raised: bool, now_ms: int) -> None:
        if raised:
            await self._run(self._write, "INSERT INTO faults VALUES (?, ?, ?) ON CONFLICT"
                            " DO NOTHING", (terminal, fault, now_ms))
        else:
            await self._run(self._write, "DELETE FROM faults WHERE terminal = ? AND fault = ?",
                            (terminal, fault))

    # --- plumbing ------------------------------------------------------------------------

    def _warning_sync(self, warning_id: str, origin: str, cmd_id: str | None,
                      now_ms: int) -> WireWarning:
        def body(conn: sqlite3.Connection) -> WireWarning:
            row = conn.execute("SELECT wire_id, origin, cmd_id FROM warnings WHERE"
                               " warning_id = ?", (warning_id,)).fetchone()
            if row is not None:
                if cmd_id is not None and cmd_id != row[2]:
                    conn.execute("UPDATE warnings SET cmd_id = ? WHERE wire_id = ?",
                                 (cmd_id, row[0]))
                return WireWarning(row[0], warning_id, row[1], cmd_id or row[2])
            cur = conn.execute("INSERT INTO warnings (warning_id, origin, cmd_id, created_ms)"
                               " VALUES (?, ?, ?, ?)", (warning_id, origin, cmd_id, now_ms))
            assert cur.lastrowid is not None
            return WireWarning(cur.lastrowid, warning_id, origin, cmd_id, new=True)
        return self._sqlite.transaction(body)


# --- read-only, for `edge-agent status` without the agent -----------------------------


def read_summary(path: Path) -> LedgerSummary | None:
    """What `terminals.db` says without the agent: open faults (with since) and the 叫应
    events recorded per terminal and type (reported ones are kept 30 days). Read-only; None
    while there is nothing to read yet (`open_reader`); raises `TerminalLedgerError` if the
    file cannot be read."""
    try:
        conn = open_reader(path)
        if conn is None:
            return None
        try:
            faults = conn.execute("SELECT terminal, fault, since_ms FROM faults").fetchall()
            events = conn.execute("SELECT terminal, type, count(*) FROM events WHERE"
                                  " terminal != '' GROUP BY terminal, type").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise TerminalLedgerError(f"{path}: {exc}") from exc
    counts: dict[str, dict[str, int]] = {}
    for terminal, type_, n in events:
        counts.setdefault(str(terminal), {})[str(type_)] = int(n)
    return LedgerSummary(_by_terminal(faults), counts)


@dataclass(frozen=True, slots=True)
class LedgerSummary:
    faults: dict[str, dict[str, int]]  # terminal → fault → since_ms
    events: dict[str, dict[str, int]]  # terminal → type (delivered, ack) → count


def _by_terminal(rows: list[Any]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for terminal, fault, since_ms in rows:
        out.setdefault(str(terminal), {})[str(fault)] = int(since_ms)
    return out


__all__ = ["EventKey", "LedgerSummary", "TerminalLedger", "TerminalLedgerError", "WireWarning",
           "read_summary"]
