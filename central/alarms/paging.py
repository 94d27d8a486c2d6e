"""Paging and time range of the alarm list (`GET /api/alarms`): the cursor of the next page
travels in the `X-Next-Cursor` header and an RFC 8288 `Link: <…>; rel="next"`, because the
body stays the plain list it always was.

    GET /api/alarms?state=all&limit=50          -> 50 alarms, X-Next-Cursor: WyJhbGFybXMiLDAsMiwx…
    GET /api/alarms?state=all&limit=50&cursor=WyJhbGFybXMiLDAsMiwx…  -> the next 50
"""

from __future__ import annotations

from typing import Any, Final

from fastapi import Request, Response

from central.alarms.desk import Alarm, AlarmKey, alarm_key
from central.web.cursor import decode_cursor, encode_cursor
from central.web.times import TimeParamError, parse_time

CURSOR_KIND: Final = "alarms"
NEXT_HEADER: Final = "X-Next-Cursor"
NEXT_HEADERS: Final[dict[str, Any]] = {
    NEXT_HEADER: {"description": "present when more alarms follow: pass it as `cursor`",
                  "schema": {"type": "string"}},
    "Link": {"description": 'the next page\'s URL, `<…>; rel="next"` (RFC 8288)',
             "schema": {"type": "string"}}}


def alarm_cursor(token: str) -> AlarmKey:
    """The key an alarm-list cursor continues after; raises `CursorError` (422)."""
    rank, severity, raised_ms, alarm_id = decode_cursor(CURSOR_KIND, token, (int,) * 4)
    return int(rank), int(severity), int(raised_ms), int(alarm_id)


def next_alarm_cursor(last: Alarm) -> str:
    return encode_cursor(CURSOR_KIND, alarm_key(last))


def set_next(request: Request, response: Response, cursor: str) -> None:
    """Tell the client where the next page starts."""
    response.headers[NEXT_HEADER] = cursor
    url = request.url.include_query_params(cursor=cursor)
    response.headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'


def time_range(from_: str | None, to: str | None) -> tuple[int | None, int | None]:
    """`from`/`to` as epoch ms (None when absent); 422 if `from` lies after `to`."""
    from_ms = parse_time("from", from_, 0) if from_ else None
    to_ms = parse_time("to", to, 0) if to else None
    if from_ms is not None and to_ms is not None and from_ms > to_ms:
        raise TimeParamError("from", f"{from_} (after to)")
    return from_ms, to_ms
