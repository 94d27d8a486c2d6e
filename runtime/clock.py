"""The wall clock in the unit of the records, tables and APIs of both daemons: milliseconds
since the epoch. One definition, so a module cannot drift to seconds or to another rounding."""

from __future__ import annotations

import time


def now_ms() -> int:
    return time.time_ns() // 1_000_000


__all__ = ["now_ms"]
