"""The command tables' schema (DESIGN.md §6, §8), for either backend (the dialect is
`central.storage.side_store.Dialect`): the migrations `central.commands.store` applies under its
own version table (`commands_schema_version`). Never reorder the migrations.
"""

from __future__ import annotations

from central.storage.side_store import Dialect, Migration

MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    """Register a schema step (its version is its 1-based position); never reorder."""
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_commands(d: Dialect) -> list[str]:
    b = d.bigint
    return [
        f"""CREATE TABLE commands (
            cmd_id TEXT PRIMARY KEY, gw TEXT NOT NULL, kind TEXT NOT NULL, target TEXT NOT NULL,
            args TEXT NOT NULL, issued_at_ms {b}, expires_at_ms {b}, state TEXT NOT NULL,
            state_source TEXT NOT NULL, reason TEXT, detail TEXT, result TEXT,
            origin TEXT NOT NULL, created_ms {b} NOT NULL, updated_ms {b} NOT NULL,
            sent_count INTEGER NOT NULL DEFAULT 0, last_sent_ms {b})""",
        "CREATE INDEX commands_gw_state ON commands (gw, state)",
        "CREATE INDEX commands_state_expiry ON commands (state, expires_at_ms)",
        f"""CREATE TABLE command_events (
            id {d.id_column}, cmd_id TEXT NOT NULL, ts_ms {b} NOT NULL, state TEXT NOT NULL,
            source TEXT NOT NULL, reason TEXT, detail TEXT, attrs TEXT,
            applied INTEGER NOT NULL, received_ms {b} NOT NULL,
            gw TEXT, stream TEXT, seq {b},
            UNIQUE (gw, stream, seq))""",
        "CREATE INDEX command_events_cmd ON command_events (cmd_id, id)",
    ]


@migration
def m002_approval(d: Dialect) -> list[str]:
    return [
        "ALTER TABLE commands ADD COLUMN issued_by TEXT",
        "ALTER TABLE commands ADD COLUMN approval TEXT",
        "ALTER TABLE commands ADD COLUMN approved_by TEXT",
        f"ALTER TABLE commands ADD COLUMN approved_ms {d.bigint}",
    ]


@migration
def m003_changes(d: Dialect) -> list[str]:
    # One counter per gateway, bumped by every write that changes one of its commands: the
    # console's live feed asks for the counters of the gateways on screen (one key lookup
    # each) and lists a gateway's commands again only when its counter moved. A row, not a
    # max(updated_ms): on PostgreSQL two writers commit out of the order of their clocks.
    return [f"CREATE TABLE command_changes (gw TEXT PRIMARY KEY, n {d.bigint} NOT NULL)"]
