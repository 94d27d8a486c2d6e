"""The retired gateways (decommissioning), as DDL for either backend.

- `retired_gateways`: one row per gateway taken out of service: when, by whom and why, how
  many alarms the retirement cleared, and how many messages it sent since that central
  refused (`refused`, `last_refused_ms`). Its readings, events, alarms and audit rows stay
  where they are, for the record; the lists, the map and the offline rules skip it. Bringing
  it back (`unretire`) deletes the row; the audit log keeps both acts.

Not a shared step: SQLite's own `m007` already follows the shared ones, so each backend
registers it after its last migration (SQLite `m008`, PostgreSQL `m007`).
"""

from __future__ import annotations

from central.storage.alarm_schema import Dialect


def in_service(gw: str = "gw") -> str:
    """The SQL condition that the gateway in column `gw` is in service (not retired): what
    the lists, the area tree and the offline rule ask of every gateway they show."""
    return f"{gw} NOT IN (SELECT gw FROM retired_gateways)"


def retired_tables(dialect: Dialect) -> list[str]:
    big, key = ("INTEGER", "TEXT") if dialect == "sqlite" else ("BIGINT", 'TEXT COLLATE "C"')
    return [f"""CREATE TABLE retired_gateways (
        gw {key} PRIMARY KEY, retired_ms {big} NOT NULL, retired_by TEXT NOT NULL,
        reason TEXT NOT NULL, alarms_cleared INTEGER NOT NULL DEFAULT 0,
        refused {big} NOT NULL DEFAULT 0, last_refused_ms {big})"""]
