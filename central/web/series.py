"""The body of `GET /api/points/{ref}/series`: a page of a point's readings or aggregates, and
the `next` cursor that continues it (`central.web.cursor`).

`auto` picks the resolution by the window's length and goes coarser where retention has purged
the finer one; a cursor pins the resolution of the page it continues, so a client that passes
`cursor=<next>` with the same `from`/`to` gets the rest of the same series, page by page.
"""

from __future__ import annotations

from typing import Literal

from central.storage import Storage
from central.storage.aggregates import RESOLUTION_TABLE, Resolution, choose_resolution, coarser
from central.storage.series import RawKey, raw_page_program
from central.web.cursor import CursorError, decode_cursor, encode_cursor
from central.web.models import BucketOut, SampleOut, SeriesOut

RAW_LIMIT = 1000
BUCKET_LIMIT = 10_080  # a week of minutes
_RAW_KEY = (int, str, int)  # (ts_ms, stream, seq) of the last reading
_BUCKET_KEY = (int,)  # bucket_ms of the last bucket


def _cursor_kind(res: Resolution) -> str:
    return f"series:{res}"


def _resume(cursor: str, resolution: str) -> tuple[Resolution, tuple[int | str, ...]]:
    """The resolution and last key a cursor continues from; the cursor must be a series
    cursor, of the resolution asked for unless that is `auto`."""
    resolutions: tuple[Resolution, ...] = ("raw", "1m", "1h")
    for res in resolutions:
        if resolution in ("auto", res):
            try:
                return res, decode_cursor(_cursor_kind(res), cursor,
                                          _RAW_KEY if res == "raw" else _BUCKET_KEY)
            except CursorError:
                continue
    raise CursorError(f"series:{'raw' if resolution == 'auto' else resolution}", cursor)


async def _page(storage: Storage, point: str, res: Resolution, from_ms: int, to_ms: int,
                n: int, after: tuple[int | str, ...] | None
                ) -> tuple[list[SampleOut] | list[BucketOut], bool, str | None]:
    """One page at `res`: the samples, whether any row was found, and the next cursor."""
    if res == "raw":
        key: RawKey | None = None if after is None else (int(after[0]), str(after[1]),
                                                        int(after[2]))
        page = await storage.run(lambda: raw_page_program(point, from_ms, to_ms, n, key),
                                 write=False)
        samples = [SampleOut(ts_ms=s.ts_ms, value=s.value, text=s.text, flags=s.flags)
                   for s in page.samples]
        nxt = None if page.last is None else encode_cursor(_cursor_kind(res), page.last)
        return samples, bool(samples), nxt
    width = RESOLUTION_TABLE[res][1]
    start = from_ms if after is None else max(from_ms, int(after[0]) + width)
    buckets = await storage.buckets(point, res, start, to_ms, n + 1)
    out = [BucketOut(ts_ms=b.ts_ms, value=b.avg, min=b.min, max=b.max, count=b.count)
           for b in buckets[:n]]
    nxt = encode_cursor(_cursor_kind(res), (buckets[n - 1].ts_ms,)) if len(buckets) > n else None
    return out, bool(buckets), nxt


async def series_page(storage: Storage, point: str, from_ms: int, to_ms: int,
                      resolution: Literal["auto", "raw", "1m", "1h"], limit: int | None,
                      cursor: str | None, *, now: int, keep: dict[str, float]) -> SeriesOut:
    """A point's samples or buckets in a window, one page (see the module's docstring)."""
    after: tuple[int | str, ...] | None = None
    if cursor:
        res, after = _resume(cursor, resolution)
    else:
        res = choose_resolution(from_ms, to_ms) if resolution == "auto" else resolution
    while True:
        n = limit or (RAW_LIMIT if res == "raw" else BUCKET_LIMIT)
        samples, found, nxt = await _page(storage, point, res, from_ms, to_ms, n, after)
        # auto, and retention has purged this window at this resolution: go coarser.
        fallback = (coarser(res, from_ms, now, keep)
                    if resolution == "auto" and not cursor and not found else None)
        if fallback is None:
            break
        res = fallback
    return SeriesOut(point=point, from_ms=from_ms, to_ms=to_ms, resolution=res, limit=n,
                     truncated=nxt is not None, next=nxt, samples=samples)
