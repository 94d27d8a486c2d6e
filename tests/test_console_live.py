"""The console's live feed (central/console/live.py): one producer per view however many
clients show it, a late joiner starts from the newest state, a slow client gets the newest
body (never a growing queue), a failing build does not end the feed, and the feed stops with
its last client."""

from __future__ import annotations

import asyncio
import json

from pydantic import BaseModel

from central.console.live import Broadcaster, Subscriber
from central.console.views import View

CITY = View(None, None, None)
DISTRICT = View(None, None, 7)


class Body(BaseModel):
    view: int | None
    n: int


def _broadcaster(calls: dict[View, int], fail: set[str]) -> Broadcaster:
    def builder(name: str):  # type: ignore[no-untyped-def]
        async def build(view: View) -> BaseModel:
            if name in fail:
                raise RuntimeError("storage down")  # a fault injected into one build
            calls[view] = calls.get(view, 0) + 1
            return Body(view=view.area, n=calls[view])
        return build

    return Broadcaster((("overview", builder("overview")), ("board", builder("board"))),
                       check_s=0.02, ping_s=60.0, refresh_s=60.0)


async def _events(sub: Subscriber) -> list[str]:
    """The names of the next events, pings left out."""
    names = [chunk.decode().split("\n")[0] for chunk in await asyncio.wait_for(sub.next(), 2)]
    return [n for n in names if n != "event: ping"]


async def test_clients_of_one_view_share_one_producer() -> None:
    """Twenty clients of the city and one of a district: two feeds, and the city's builds
    are those of one producer (not twenty); each client got both events."""
    calls: dict[View, int] = {}
    live = _broadcaster(calls, set())
    async with asyncio.TaskGroup() as tg:
        done = asyncio.Event()
        firsts: list[list[str]] = []

        async def client(view: View) -> None:
            async with live.subscribe(view) as sub:
                firsts.append(await _events(sub))
                await done.wait()

        for _ in range(20):
            tg.create_task(client(CITY))
        tg.create_task(client(DISTRICT))
        await asyncio.sleep(0.5)
        assert len(live.feeds) == 2 and live.counters.subscribers == 21
        city_builds = calls[CITY]
        assert abs(city_builds - calls[DISTRICT]) <= 4, calls  # the same one producer's pace
        assert city_builds <= 2 * 0.5 / 0.02 + 4, calls  # at most one build each check
        done.set()
    assert all(set(f) >= {"event: overview", "event: board"} for f in firsts), firsts
    await asyncio.sleep(0.05)
    assert live.feeds == {} and live.counters.subscribers == 0


async def test_a_late_joiner_and_a_slow_client_get_the_newest_state() -> None:
    """A client that joins an existing feed gets the newest bodies at once; a client that
    reads late gets only the newest body of each event, not every one it missed."""
    calls: dict[View, int] = {}
    live = _broadcaster(calls, set())
    async with live.subscribe(CITY) as slow:
        await asyncio.sleep(0.3)  # about 15 changes, unread
        chunks = [c.decode() for c in await asyncio.wait_for(slow.next(), 2)]
        names = [c.split("\n")[0] for c in chunks]
        assert sorted(names) == ["event: board", "event: overview", "event: ping"]  # once each
        newest = calls[CITY]  # overview and board count together: the two last builds
        assert all(json.loads(c.split("data: ")[1])["n"] >= newest - 3
                   for c in chunks if "ping" not in c), (chunks, newest)
        async with live.subscribe(CITY) as late:
            assert len(live.feeds) == 1
            assert sorted(await _events(late)) == ["event: board", "event: overview"]
    assert live.feeds == {}


async def test_a_failing_build_does_not_end_the_feed() -> None:
    """The board's build fails (storage error): the overview still goes out, the failure is
    counted."""
    calls: dict[View, int] = {}
    live = _broadcaster(calls, {"board"})
    async with live.subscribe(CITY) as sub:
        assert await _events(sub) == ["event: overview"]
        await asyncio.sleep(0.1)
        assert await _events(sub) == ["event: overview"]
    assert live.counters.build_errors >= 2 and live.feeds == {}
