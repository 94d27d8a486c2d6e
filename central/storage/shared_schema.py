"""The schema steps both backends apply after their own `m001_initial`, in this order.

A step is the DDL of one `*_schema` module for the backend's dialect, then optionally a
portable data program (`central.storage.program`). `sqlite_schema` and `postgres_schema`
register each as a migration of their own kind; its version is its position there, so new
steps are appended here, never inserted or reordered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from central.storage.alarm_schema import Dialect, alarm_tables
from central.storage.delivery_schema import backfill_program, history_tables, pending_parts
from central.storage.geo_schema import geo_columns
from central.storage.identity_schema import identity_tables
from central.storage.program import Program


@dataclass(frozen=True, slots=True)
class SharedStep:
    name: str  # the migration's name in the `db_migrated` log
    ddl: Callable[[Dialect], list[str]]
    then: Callable[[], Program[None]] | None = None


SHARED_STEPS = (
    SharedStep("m002_areas_alarms", alarm_tables),
    SharedStep("m003_delivery_history", history_tables, backfill_program),
    SharedStep("m004_identity_audit", identity_tables),
    SharedStep("m005_positions", geo_columns),
    SharedStep("m006_pending_parts", pending_parts),
)
