"""Implausible record times at central (DESIGN.md §4.7).

The edge flags `CLOCK_SUSPECT` when it does not trust its own clock; central adds its own
judgement: a time more than `future_tolerance_ms` ahead of central's receive time, or before
`floor_ms` (2020-01-01, older than any Fieldlink gateway), is stored with `CLOCK_SUSPECT` and
the central-only bit `CENTRAL_TS_SUSPECT` (so an operator can tell whose judgement it was).

A stored record is never updated, with two exceptions. A later copy of the same (gw, stream,
seq) WITHOUT `CLOCK_SUSPECT` (the edge corrected the time once a good time source came back)
replaces the suspect copy's ts and flags; and the full record that comes over IP replaces a copy
that came by narrowband (`central.storage.writes`, `NARROWBAND_COPY`). Suspect readings are kept
raw but stay out of the aggregates (their bucket is unknown) until such a corrected copy
arrives; readings that central itself judged implausible do not move the latest value either (a
far-future time would pin it for ever).
"""

from __future__ import annotations

from dataclasses import dataclass

from protocols.envelope import Flag

FLOOR_MS = 1_577_836_800_000  # 2020-01-01T00:00:00Z
CLOCK_SUSPECT = int(Flag.CLOCK_SUSPECT)
CENTRAL_TS_SUSPECT = 0x100  # central judged the time implausible; never on the wire
# The stored copy came by narrowband (central.narrowband.receiver); the IP copy replaces it
# (central.storage.writes). Never on the wire either: the envelope rejects unknown flags.
NARROWBAND_COPY = 0x200
CENTRAL_BITS = CLOCK_SUSPECT | CENTRAL_TS_SUSPECT


@dataclass(frozen=True, slots=True)
class TimePolicy:
    future_tolerance_ms: int = 300_000
    floor_ms: int = FLOOR_MS

    def bounds(self, now_ms: int) -> tuple[int, int]:
        """`(lowest, highest)` plausible record time for a batch received at `now_ms`."""
        return self.floor_ms, now_ms + self.future_tolerance_ms


def stored_flags(flags: int, ts_ms: int, lo: int, hi: int) -> int:
    """The flags a record is stored with, given the plausible bounds `lo..hi`."""
    return flags | CENTRAL_BITS if ts_ms < lo or ts_ms > hi else flags


def replaces(stored: int | None, incoming: int) -> bool:
    """True when an incoming copy of a held record may replace it (the one allowed update);
    `stored=None` means "held, flags not seen" (a concurrent worker's commit)."""
    return not incoming & CLOCK_SUSPECT and (stored is None or bool(stored & CLOCK_SUSPECT))
