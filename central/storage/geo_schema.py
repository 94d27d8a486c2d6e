"""Coordinates for the 一张图 map (issue 12): `lat`/`lon` on areas and on gateways.

Each backend registers one migration that runs `geo_columns(dialect)`. Degrees in the frame of
the vendored district boundaries (central/static/vendor/README.md). A gateway without its own
position is drawn at its site's, or the nearest area above it that has one (`central.console.geo`).
A gateway may get a position before it first reports: `central.console.geo` then inserts its row.
"""

from __future__ import annotations

from central.storage.alarm_schema import Dialect


def geo_columns(dialect: Dialect) -> list[str]:
    real = "REAL" if dialect == "sqlite" else "DOUBLE PRECISION"
    return [f"ALTER TABLE {table} ADD COLUMN {col} {real}"
            for table in ("areas", "gateways") for col in ("lat", "lon")]
