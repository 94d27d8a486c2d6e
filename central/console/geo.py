"""Positions and the 一张图 overview (issue 12): where each gateway stands and what state it
is in, per district the worst active alarm, and the counts the duty room reads first.

A gateway's position is its own (`PUT /api/gateways/{gw}/position`), else its site's, else
the nearest area above the site that has one. Its map state, in the order it wins:

- `alarm`: it has an active alarm;
- `offline`: not online, or not heard within `offline_after_s`;
- `narrowband`: heard, but on BeiDou / 370 MHz (its IP link is down, DESIGN.md §5);
- `ip`: online over IP.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from central.areas.tree import AreaLevel, area_program
from central.narrowband.downlink import RADIO_BEARERS
from central.storage import Storage
from central.storage.program import Program, Sql

MapState = Literal["alarm", "offline", "narrowband", "ip"]
STATES: tuple[MapState, ...] = ("alarm", "narrowband", "offline", "ip")


@dataclass(frozen=True, slots=True)
class Position:
    lat: float
    lon: float


@dataclass(frozen=True, slots=True)
class GatewayMark:
    gw: str
    state: MapState
    online: bool
    bearer: str | None
    last_seen_ms: int | None
    position: Position | None
    site_id: int | None
    site_name: str | None
    district_id: int | None
    district_name: str | None
    severity: int  # worst active alarm, 0 for none
    active: int  # active alarms
    unacknowledged: int  # active or cleared, not yet acknowledged


@dataclass(frozen=True, slots=True)
class DistrictMark:
    id: int
    code: str
    name_zh: str
    position: Position | None
    severity: int  # worst active alarm of any gateway under it
    active: int
    gateways: int


@dataclass(frozen=True, slots=True)
class Overview:
    gateways: tuple[GatewayMark, ...]
    districts: tuple[DistrictMark, ...]
    counts: dict[str, int]  # per map state, and "total"


def _pos(lat: float | None, lon: float | None) -> Position | None:
    return None if lat is None or lon is None else Position(lat, lon)


# --- programs ---------------------------------------------------------------------------------


def set_gateway_position_program(gw: str, pos: Position | None) -> Program[None]:
    lat, lon = (pos.lat, pos.lon) if pos else (None, None)
    yield Sql("INSERT INTO gateways (gw, lat, lon) VALUES (?, ?, ?)"
              " ON CONFLICT (gw) DO UPDATE SET lat = excluded.lat, lon = excluded.lon",
              (gw, lat, lon))


def set_area_position_program(area_id: int, pos: Position | None) -> Program[None]:
    yield from area_program(area_id)  # UnknownAreaError
    lat, lon = (pos.lat, pos.lon) if pos else (None, None)
    yield Sql("UPDATE areas SET lat = ?, lon = ? WHERE id = ?", (lat, lon, area_id))


def overview_program(now_ms: int, offline_after_s: float,
                     visible: Callable[[str], bool]) -> Program[Overview]:
    area_rows = yield Sql("SELECT id, level, code, name_zh, path, lat, lon FROM areas")
    areas = {r[0]: r for r in area_rows}
    gw_rows = yield Sql("SELECT gw, online, bearer, last_seen_ms, state_ts_ms, lat, lon"
                        " FROM gateways")
    site_rows = yield Sql("SELECT gw, area_id FROM gateway_sites")
    retired = {r[0] for r in (yield Sql("SELECT gw FROM retired_gateways"))}  # off the map
    alarm_rows = yield Sql(
        "SELECT gw, max(CASE WHEN state = 'active' THEN severity ELSE 0 END),"
        " sum(CASE WHEN state = 'active' THEN 1 ELSE 0 END),"
        " sum(CASE WHEN ack_state = 'unacknowledged' THEN 1 ELSE 0 END) FROM alarms"
        " WHERE state = 'active' OR ack_state = 'unacknowledged' GROUP BY gw")
    sites = {gw: area_id for gw, area_id in site_rows}
    alarm_of = {r[0]: (int(r[1] or 0), int(r[2] or 0), int(r[3] or 0)) for r in alarm_rows}
    known = {r[0]: r for r in gw_rows}
    for gw in sites:  # placed at a site, never heard yet
        known.setdefault(gw, (gw, False, None, None, None, None, None))

    def chain(area_id: int | None) -> list[tuple[object, ...]]:
        """The site and the areas above it, nearest first."""
        if area_id is None or area_id not in areas:
            return []
        ids = [int(x) for x in str(areas[area_id][4]).strip("/").split("/") if x]
        return [areas[i] for i in reversed(ids) if i in areas]

    marks = []
    for gw in sorted(known):
        if gw in retired or not visible(gw):
            continue
        _, online, bearer, last_seen, state_ts, lat, lon = known[gw]
        heard = last_seen if last_seen is not None else state_ts
        effective = bool(online) and heard is not None and now_ms - heard <= offline_after_s * 1000
        up = chain(sites.get(gw))
        position = _pos(lat, lon)
        for a in up:
            position = position or _pos(a[5], a[6])  # type: ignore[arg-type]
        district = next((a for a in up if a[1] == str(AreaLevel.DISTRICT)), None)
        severity, active, unacked = alarm_of.get(gw, (0, 0, 0))
        state: MapState = ("alarm" if active else "offline" if not effective
                           else "narrowband" if bearer in RADIO_BEARERS else "ip")
        marks.append(GatewayMark(
            gw=gw, state=state, online=effective, bearer=bearer, last_seen_ms=last_seen,
            position=position, site_id=int(up[0][0]) if up else None,  # type: ignore[call-overload]
            site_name=str(up[0][3]) if up else None,
            district_id=int(district[0]) if district else None,  # type: ignore[call-overload]
            district_name=str(district[3]) if district else None,
            severity=severity, active=active, unacknowledged=unacked))
    districts = []
    for r in sorted(areas.values(), key=lambda r: str(r[2])):
        if r[1] != str(AreaLevel.DISTRICT):
            continue
        under = [m for m in marks if m.district_id == r[0]]
        districts.append(DistrictMark(
            id=int(r[0]), code=str(r[2]), name_zh=str(r[3]), position=_pos(r[5], r[6]),
            severity=max((m.severity for m in under), default=0),
            active=sum(m.active for m in under), gateways=len(under)))
    counts: dict[str, int] = {s: sum(1 for m in marks if m.state == s) for s in STATES}
    counts["total"] = len(marks)
    return Overview(tuple(marks), tuple(districts), counts)


# --- the API other modules call ---------------------------------------------------------------


async def set_gateway_position(storage: Storage, gw: str, pos: Position | None) -> None:
    await storage.run(lambda: set_gateway_position_program(gw, pos))


async def set_area_position(storage: Storage, area_id: int, pos: Position | None) -> None:
    """Raises `UnknownAreaError`."""
    await storage.run(lambda: set_area_position_program(area_id, pos))


async def overview(storage: Storage, *, offline_after_s: float,
                   visible: Callable[[str], bool] = lambda gw: True,
                   now_ms: int | None = None) -> Overview:
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    return await storage.run(lambda: overview_program(now, offline_after_s, visible),
                             write=False)
