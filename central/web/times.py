"""Time query parameters (`from`, `to`) of the API: epoch milliseconds or ISO 8601.

An ISO time without a zone is the duty room's wall clock, Asia/Shanghai (UTC+8, no daylight
saving since 1991): a duty officer who types `2026-12-07T08:00:00` means eight in the morning
in Wuhan, not in Greenwich. With a zone or offset (`Z`, `+08:00`) the time is what it says.

    parse_time("from", "2026-12-07T08:00:00", 0)        # -> 1796601600000 (00:00 UTC)
    parse_time("from", "2026-12-07T08:00:00Z", 0)       # -> 1796630400000
"""

from __future__ import annotations

from datetime import datetime
from typing import Final
from zoneinfo import ZoneInfo

from central import CentralError
from central.web.bounds import TIME_MAX_MS, TIME_MIN_MS

DUTY_ZONE: Final = ZoneInfo("Asia/Shanghai")
TIME_DOC: Final = ("epoch ms or ISO 8601; an ISO time without a zone or offset is "
                   "Asia/Shanghai (UTC+8)")


class TimeParamError(CentralError):
    """A time parameter that is neither epoch milliseconds nor ISO 8601 in range (422)."""

    def __init__(self, name: str, value: str) -> None:
        super().__init__(f"{name}={value[:64]!r}: expected epoch milliseconds or ISO-8601"
                         f" within {TIME_MIN_MS}..{TIME_MAX_MS}")
        self.name = name
        self.value = value


def parse_time(name: str, value: str | None, default: int) -> int:
    """Epoch milliseconds or ISO-8601 (without a zone: Asia/Shanghai) → epoch milliseconds;
    `default` when absent or empty."""
    if value is None or value == "":
        return default
    v = value.strip()
    if v.lstrip("-").isdigit():
        # Bounded before int(): a database BIGINT, and int() of 4,300+ digits raises.
        ms = int(v) if len(v) <= 20 else None
        if ms is None or not TIME_MIN_MS <= ms <= TIME_MAX_MS:
            raise TimeParamError(name, value)
        return ms
    try:
        dt = datetime.fromisoformat(v)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=DUTY_ZONE)
        ms = int(dt.timestamp() * 1000)
    except (ValueError, OverflowError):  # year 1 in +08:00 is before datetime's range
        raise TimeParamError(name, value) from None
    if not TIME_MIN_MS <= ms <= TIME_MAX_MS:
        raise TimeParamError(name, value)
    return ms
