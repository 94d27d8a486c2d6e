"""The console's live feed (central/console/live.py): one producer per view however many
clients show it, a late joiner starts from the newest state, a slow client gets the newest
body (never a growing queue), a failing build does not end the feed, and the feed stops with
its last client. A gateway's events (its command list) go to its watchers only, built once
per gateway; over HTTP they are the user's `GET /api/commands` list, change by change, or a
typed error while the list cannot be read."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
import uvicorn
from pydantic import BaseModel
from structlog.testing import capture_logs

from central.areas.tree import assign_gateway
from central.commands.api import visible_commands
from central.commands.store import CommandStoreError, Report
from central.console.live import Broadcaster, Subscriber
from central.console.views import View
from central.identity.authz import gateway_path_program
from central.storage.program import Sql
from protocols.command_results import CommandResult, CommandState, result_attrs
from protocols.envelope import DataBatch, Record, RecordKind
from runtime.clock import now_ms
from tests.helpers import free_port, until
from tests.pg import BACKENDS
from tests.test_identity_api import _birth, running

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


class GwBody(BaseModel):
    gw: str
    version: int


async def _bodies(sub: Subscriber) -> dict[str, Any]:
    """The next events' bodies by name, pings left out."""
    out = {}
    for chunk in await asyncio.wait_for(sub.next(), 2):
        head, data = chunk.decode().split("\n")[:2]
        out[head.removeprefix("event: ")] = json.loads(data.removeprefix("data: "))
    out.pop("ping", None)
    return out


async def _next(sub: Subscriber, name: str) -> Any:
    """The body of the next `name` event."""
    while True:
        bodies = await _bodies(sub)
        if name in bodies:
            return bodies[name]


async def _nothing_pending(sub: Subscriber) -> bool:
    """Pending events are handed over at once; only an idle subscriber makes this wait."""
    try:
        await asyncio.wait_for(sub.next(), 0.05)
    except TimeoutError:
        return True
    return False


async def test_a_gateways_events_go_to_its_watchers_only() -> None:
    """Three clients of gw-a, one of gw-b, one of no gateway, all on one view: `commands` is
    built once per watched gateway each check (not per client), each client gets its own
    gateway's body and no other, an unchanged body is not sent again, a gateway nobody
    watches any more is no longer built, and a client that comes back to it gets it again."""
    builds: dict[str, int] = {}
    version = {"gw-a": 1, "gw-b": 1}

    async def overview(view: View) -> BaseModel:
        return Body(view=view.area, n=0)  # never changes

    async def commands(view: View, gw: str) -> BaseModel:
        builds[gw] = builds.get(gw, 0) + 1
        return GwBody(gw=gw, version=version[gw])

    live = Broadcaster((("overview", overview),), gateway_builders=(("commands", commands),),
                       check_s=0.02, ping_s=60.0, refresh_s=60.0)
    async with contextlib.AsyncExitStack() as stack:
        a = [await stack.enter_async_context(live.subscribe(CITY, "gw-a")) for _ in range(3)]
        b = await stack.enter_async_context(live.subscribe(CITY, "gw-b"))
        plain = await stack.enter_async_context(live.subscribe(CITY))
        for sub in a:
            assert await _bodies(sub) == {"overview": {"view": None, "n": 0},
                                          "commands": {"gw": "gw-a", "version": 1}}
        assert (await _bodies(b))["commands"] == {"gw": "gw-b", "version": 1}
        assert await _bodies(plain) == {"overview": {"view": None, "n": 0}}
        assert len(live.feeds) == 1

        start = dict(builds)
        await until(lambda: builds["gw-b"] >= start["gw-b"] + 10, "ten checks")
        assert builds["gw-a"] - start["gw-a"] <= builds["gw-b"] - start["gw-b"] + 2, builds
        for sub in (*a, b, plain):  # ten checks of the same bodies: nothing sent again
            assert await _nothing_pending(sub)

        version["gw-a"] = 2
        for sub in a:
            assert await _bodies(sub) == {"commands": {"gw": "gw-a", "version": 2}}
        assert await _nothing_pending(b) and await _nothing_pending(plain)

    async with live.subscribe(CITY, "gw-a"):
        async with live.subscribe(CITY, "gw-b") as b:
            assert await _next(b, "commands") == {"gw": "gw-b", "version": 1}
        left, a_builds = builds["gw-b"], builds["gw-a"]
        await until(lambda: builds["gw-a"] >= a_builds + 10, "ten checks without gw-b")
        assert builds["gw-b"] <= left + 1  # at most the build under way when it left
        async with live.subscribe(CITY, "gw-b") as back:  # watched again: sent again
            assert await _next(back, "commands") == {"gw": "gw-b", "version": 1}


async def test_a_gateways_events_are_built_only_when_its_marker_moved() -> None:
    """With a change marker, the feed asks for the markers of all watched gateways once per
    check and builds a gateway's events only when its marker moved: ten checks of unchanged
    markers build nothing; a moved marker builds that gateway once (sent only if the body
    changed); a body that changed behind an unmoved marker is not seen (the marker is
    trusted); markers that cannot be read make the feed build every gateway as before."""
    builds: dict[str, int] = {}
    version = {"gw-a": 1, "gw-b": 1}
    marker = {"gw-a": 1, "gw-b": 1}
    asked: list[list[str]] = []
    broken = False

    async def commands(view: View, gw: str) -> BaseModel:
        builds[gw] = builds.get(gw, 0) + 1
        return GwBody(gw=gw, version=version[gw])

    async def marks(view: View, gws: Sequence[str]) -> Mapping[str, Hashable]:
        if broken:
            raise RuntimeError("storage down")  # a fault injected into the markers' read
        asked.append(list(gws))
        return {gw: marker[gw] for gw in gws}

    live = Broadcaster((), gateway_builders=(("commands", commands),), gateway_marks=marks,
                       check_s=0.02, ping_s=60.0, refresh_s=60.0)

    async def checks(n: int) -> None:
        start = live.counters.checks
        await until(lambda: live.counters.checks >= start + n, f"{n} checks")

    async with live.subscribe(CITY, "gw-a") as a, live.subscribe(CITY, "gw-b") as b:
        assert await _next(a, "commands") == {"gw": "gw-a", "version": 1}
        assert await _next(b, "commands") == {"gw": "gw-b", "version": 1}
        await checks(1)
        start, calls = dict(builds), len(asked)
        await checks(10)
        assert builds == start, builds  # nothing moved: nothing built
        assert len(asked) - calls >= 10 and all(g == ["gw-a", "gw-b"] for g in asked[calls:])
        assert await _nothing_pending(a) and await _nothing_pending(b)

        marker["gw-a"] = 2  # moved, same body: built once, not sent
        await until(lambda: builds["gw-a"] == start["gw-a"] + 1, "gw-a built again")
        await checks(5)
        assert builds == {"gw-a": start["gw-a"] + 1, "gw-b": start["gw-b"]}, builds
        assert await _nothing_pending(a)

        version["gw-a"] = 2  # changed behind an unmoved marker: not built
        await checks(5)
        assert await _nothing_pending(a)
        marker["gw-a"] = 3
        assert await _next(a, "commands") == {"gw": "gw-a", "version": 2}
        assert await _nothing_pending(b)

        broken = True  # markers unreadable: every gateway built every check again
        errors, start = live.counters.build_errors, dict(builds)
        await checks(5)
        assert builds["gw-a"] >= start["gw-a"] + 4 and builds["gw-b"] >= start["gw-b"] + 4
        assert live.counters.build_errors >= errors + 4


async def test_a_gateway_watched_first_is_built_at_once_not_at_the_next_check() -> None:
    """A client that starts watching a gateway on a running feed gets its events at once:
    the feed does not wait out its check interval (an hour here) first."""
    async def commands(view: View, gw: str) -> BaseModel:
        return GwBody(gw=gw, version=1)

    live = Broadcaster((), gateway_builders=(("commands", commands),),
                       check_s=3600.0, ping_s=3600.0, refresh_s=3600.0)
    async with live.subscribe(CITY, "gw-a") as a:
        assert await _next(a, "commands") == {"gw": "gw-a", "version": 1}  # the first round
        async with live.subscribe(CITY, "gw-b") as b:
            assert len(live.feeds) == 1
            assert await _next(b, "commands") == {"gw": "gw-b", "version": 1}
            async with live.subscribe(CITY, "gw-b") as again:  # the newest, from the feed
                assert await _next(again, "commands") == {"gw": "gw-b", "version": 1}


async def test_a_gateway_event_that_cannot_be_built_says_so_once_and_recovers() -> None:
    """While gw-a's list and the markers cannot be read, gw-a's watchers get `commands` as
    `{gw, error: {type, title}}` (a late joiner too, at once), once, not every check, without
    the error's text; an unforeseen error has no problem type of ours. Each failure is logged
    when it starts and when it ends, not every check; the first good read sends the list."""
    down = False

    async def commands(view: View, gw: str) -> BaseModel:
        if down and gw == "gw-a":  # faults injected into the builds and the markers' read
            raise CommandStoreError("commands store: no such table: command_secrets")
        if down:
            raise RuntimeError("a bug")
        return GwBody(gw=gw, version=1)

    async def marks(view: View, gws: Sequence[str]) -> Mapping[str, Hashable]:
        if down:
            raise CommandStoreError("commands store: database is locked")
        return dict.fromkeys(gws, 1)

    live = Broadcaster((), gateway_builders=(("commands", commands),), gateway_marks=marks,
                       check_s=0.02, ping_s=60.0, refresh_s=60.0)
    title = "could not be read; the feed retries"
    with capture_logs() as logs:
        async with live.subscribe(CITY, "gw-a") as a, live.subscribe(CITY, "gw-b") as b:
            assert await _next(a, "commands") == {"gw": "gw-a", "version": 1}
            assert await _next(b, "commands") == {"gw": "gw-b", "version": 1}
            down = True
            failed = await _next(a, "commands")
            assert abs(failed.pop("now_ms") - now_ms()) < 60_000  # central's clock, as a list
            assert failed == {"gw": "gw-a", "error": {
                "type": "urn:fieldlink:problem:command-store", "title": title}}
            assert (await _next(b, "commands"))["error"] == {"type": "about:blank",
                                                             "title": title}
            errors = live.counters.build_errors
            await until(lambda: live.counters.build_errors >= errors + 30, "ten failed checks")
            assert await _nothing_pending(a) and await _nothing_pending(b)
            async with live.subscribe(CITY, "gw-a") as late:
                assert (await _next(late, "commands"))["error"]["type"].endswith("command-store")
            down = False
            assert await _next(a, "commands") == {"gw": "gw-a", "version": 1}
            assert await _next(b, "commands") == {"gw": "gw-b", "version": 1}
    logged = [(e["event"], e.get("gw")) for e in logs if e["event"].startswith("console_")]
    assert sorted(logged, key=str) == sorted([
        ("console_marks_failed", None), ("console_marks_recovered", None),
        ("console_build_failed", "gw-a"), ("console_build_failed", "gw-b"),
        ("console_build_recovered", "gw-a"), ("console_build_recovered", "gw-b")], key=str)
    assert [e["failed_builds"] for e in logs if e["event"] == "console_build_recovered"] >= [
        10, 10]


@contextlib.asynccontextmanager
async def _served(app: Any) -> AsyncIterator[str]:
    """`app` (its lifespan already entered) on a real HTTP server: server-sent events need a
    real stream, which the in-process transport does not give."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                           lifespan="off"))
    task = asyncio.create_task(server.serve())
    try:
        await until(lambda: server.started, "the server to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def _commands_events(base: str, headers: dict[str, str],
                           gw: str) -> AsyncIterator[asyncio.Queue[Any]]:
    """The `commands` events of `/api/console/events?gw=…`, as they come."""
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def read() -> None:
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as c, \
                c.stream("GET", "/api/console/events", params={"gw": gw}) as r:
            assert r.status_code == 200
            event = None
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "commands":
                    body = json.loads(line[6:])
                    assert abs(body.pop("now_ms") - now_ms()) < 60_000  # central's clock
                    await queue.put(body)

    task = asyncio.create_task(read())
    try:
        yield queue
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_commands_event_is_the_users_list_and_follows_every_change(
        tmp_path: Path) -> None:
    """A viewer of district d1 watching gw-a gets gw-a's commands as `GET /api/commands`
    lists them for that viewer, again after each change: a safety-critical write issued
    (待审批), approved by a second operator, received and carried out by the gateway; only
    when the list changed. Watching gw-c, outside d1, gets an empty list as the GET does,
    while an admin watching gw-c gets its command."""
    async with running("sqlite", tmp_path) as env, _served(env.app) as base:
        env.app.state.console_live.refresh_s = 3600.0  # no periodic resend: each event a change
        boss = await env.token("boss", "admin")
        first, second = await env.token("duty-1", area="d1"), await env.token("duty-2", area="d1")
        viewer = await env.token("watch-1", "viewer", area="d1")
        r = await env.c.post("/api/commands", headers=boss,
                             json={"gw": "gw-c", "kind": "request_diagnostics"})
        assert r.status_code == 201, r.text

        async def listed(gw: str) -> Any:
            r = await env.c.get("/api/commands", params={"gw": gw, "limit": 10}, headers=viewer)
            assert r.status_code == 200, r.text
            return r.json()

        async with _commands_events(base, viewer, "gw-a") as events, \
                _commands_events(base, viewer, "gw-c") as outside:
            assert await asyncio.wait_for(outside.get(), 10) == {"gw": "gw-c", "commands": []}
            assert await listed("gw-c") == []
            async with _commands_events(base, boss, "gw-c") as city:  # the admin's view: there
                assert [c["kind"] for c in (await asyncio.wait_for(city.get(), 10))[
                    "commands"]] == ["request_diagnostics"]
            seen = [await asyncio.wait_for(events.get(), 10)]
            assert seen[0] == {"gw": "gw-a", "commands": []}

            async def changed() -> dict[str, Any]:
                """The next event, which must be this viewer's list as it is now."""
                seen.append(await asyncio.wait_for(events.get(), 10))
                assert seen[-1] == {"gw": "gw-a", "commands": await listed("gw-a")}
                (cmd,) = seen[-1]["commands"]
                return cmd  # type: ignore[no-any-return]

            r = await env.c.post("/api/commands", headers=first, json={
                "gw": "gw-a", "kind": "write_point",
                "args": {"device": "gas-1", "point": "relay_test", "value": True}})
            assert r.status_code == 201, r.text
            cmd_id = r.json()["cmd_id"]
            cmd = await changed()
            assert (cmd["cmd_id"], cmd["state"], cmd["approval"]) == (cmd_id, "pending",
                                                                      "required")
            r = await env.c.post(f"/api/commands/{cmd_id}/approve", headers=second)
            assert r.status_code == 200, r.text
            cmd = await changed()
            assert (cmd["approval"], cmd["approved_by"]) == ("approved", "duty-2")
            service = env.app.state.commands.service
            for seq, state in enumerate((CommandState.RECEIVED, CommandState.SUCCEEDED), 1):
                await service.apply_batch(DataBatch(gw="gw-a", stream="s-gw-a", records=(Record(
                    seq=seq, kind=RecordKind.CMD_RESULT, ts_ms=now_ms(), point=None, value=None,
                    attrs=result_attrs(CommandResult(cmd_id, state, kind="write_point"))),)))
                assert (await changed())["state"] == str(state)
            assert all(x != y for x, y in zip(seen, seen[1:], strict=False)), seen
            assert outside.empty()  # gw-c's list did not change for this viewer


@dataclass
class ListOutage:
    """A fault injected into a real `CommandStore`: while `down`, its `list` raises the
    store's own error, whose text names a file no client may see."""

    down: bool = False
    TEXT: ClassVar[str] = "commands store: disk I/O error on /var/lib/central.db"

    async def list(self, real: Any, **kw: Any) -> Any:
        if self.down:
            raise CommandStoreError(self.TEXT)
        return await real(**kw)


@contextlib.contextmanager
def list_outage(store: Any) -> Iterator[ListOutage]:
    outage = ListOutage()
    store.list = functools.partial(outage.list, store.list)
    try:
        yield outage
    finally:
        del store.list


async def issue(env: Any, headers: dict[str, str], kind: str = "request_diagnostics") -> str:
    """A command to gw-a; its cmd_id."""
    r = await env.c.post("/api/commands", headers=headers, json={"gw": "gw-a", "kind": kind})
    assert r.status_code == 201, r.text
    return str(r.json()["cmd_id"])


async def test_the_commands_event_says_when_the_store_cannot_list_and_comes_back(
        tmp_path: Path) -> None:
    """The real command store's list fails for a while (a fault injected into it) and a
    command is issued meanwhile: the stream's `commands` event for gw-a becomes `{gw, error}`
    with the store's problem type and none of its text, is not sent again while it lasts, and
    is gw-a's list, the new command in it, as soon as the list reads again (its change marker
    did not move again: the failure alone makes the feed read again), without reconnecting."""
    async with running("sqlite", tmp_path) as env, _served(env.app) as base:
        live = env.app.state.console_live
        live.refresh_s = 3600.0  # no periodic resend: each event a change
        boss = await env.token("boss", "admin")
        first = await issue(env, boss)
        with list_outage(env.app.state.commands.service.store) as outage:
            async with _commands_events(base, boss, "gw-a") as events:
                listed = await asyncio.wait_for(events.get(), 10)
                assert [c["cmd_id"] for c in listed["commands"]] == [first]
                outage.down = True
                second = await issue(env, boss, "sync_time")  # the marker moved: list, fail
                assert await asyncio.wait_for(events.get(), 10) == {"gw": "gw-a", "error": {
                    "type": "urn:fieldlink:problem:command-store",
                    "title": "could not be read; the feed retries"}}
                start = live.counters.build_errors
                await until(lambda: live.counters.build_errors >= start + 5,
                            "five failed builds")
                assert events.empty()
                outage.down = False
                back = await asyncio.wait_for(events.get(), 10)
                assert [c["cmd_id"] for c in back["commands"]] == [second, first]


@pytest.mark.parametrize("kind", BACKENDS)
async def test_an_unchanged_list_is_not_listed_again_and_the_scope_follows_the_gateway(
        kind: str, tmp_path: Path) -> None:
    """A viewer of d1 watching gw-a: while nothing changes, checks go by without listing its
    commands again (the store's `list` is not called); without reconnecting, the list empties
    when gw-a moves out of d1, is retired, or its site is re-parented out of d1, and comes back
    when it moves back, is unretired, or its site comes back; a new command shows at once.
    Each event is the list `GET /api/commands` gives that viewer at that moment."""
    async with running(kind, tmp_path) as env, _served(env.app) as base:
        live = env.app.state.console_live
        live.check_s, live.refresh_s = 0.02, 3600.0  # fast checks, no periodic resend
        storage, store = env.app.state.storage, env.app.state.commands.service.store
        boss = await env.token("boss", "admin")
        viewer = await env.token("watch-1", "viewer", area="d1")
        site1, site2 = (await storage.run(lambda: _sites("site1", "site2"), write=False))
        lists = 0
        real_list = store.list

        async def counted_list(**kw: Any) -> Any:  # the real store, its calls counted
            nonlocal lists
            lists += 1
            return await real_list(**kw)

        store.list = counted_list

        async def listed() -> Any:
            r = await env.c.get("/api/commands", params={"gw": "gw-a", "limit": 10},
                                headers=viewer)
            assert r.status_code == 200, r.text
            return r.json()

        async def checks(n: int) -> None:
            start = live.counters.checks
            await until(lambda: live.counters.checks >= start + n, f"{n} checks")

        async def admin(method: str, path: str, body: dict[str, Any]) -> None:
            r = await env.c.request(method, path, headers=boss, json=body)
            assert r.status_code == 200, r.text

        first = await issue(env, boss)
        async with _commands_events(base, viewer, "gw-a") as events:
            async def shows(ids: list[str]) -> None:
                """The next event lists `ids`, as `GET /api/commands` does now."""
                body = await asyncio.wait_for(events.get(), 10)
                assert [c["cmd_id"] for c in body["commands"]] == ids, body
                assert body == {"gw": "gw-a", "commands": await listed()}

            await shows([first])
            await checks(2)
            before = lists
            await checks(20)
            assert lists == before, f"listed {lists - before} times while nothing changed"
            assert events.empty()

            await admin("PUT", "/api/gateways/gw-a/area", {"area_id": site2})
            await shows([])
            await admin("PUT", "/api/gateways/gw-a/area", {"area_id": site1})
            await shows([first])
            second = await issue(env, boss)
            await shows([second, first])

            await storage.run(lambda: _reparent("site1", "d2"))  # no API does this yet
            await shows([])
            await storage.run(lambda: _reparent("site1", "d1"))
            await shows([second, first])

            await admin("POST", "/api/gateways/gw-a/retire", {"reason": "flooded", "force": True})
            await shows([])
            await admin("POST", "/api/gateways/gw-a/unretire", {"reason": "repaired"})
            body = await asyncio.wait_for(events.get(), 10)  # back, its commands ended
            assert [(c["cmd_id"], c["state"]) for c in body["commands"]] == [
                (second, "expired"), (first, "expired")], body
            before = lists
            await checks(20)
            assert lists == before and events.empty()
        del store.list


def _sites(*codes: str) -> Any:
    rows = yield Sql(f"SELECT id FROM areas WHERE code IN ({', '.join('?' * len(codes))})"
                     " ORDER BY code", codes)
    return [r[0] for r in rows]


def _reparent(code: str, parent: str) -> Any:
    """Move area `code` (a leaf) under area `parent`: its parent and its path."""
    (pid, ppath), = (yield Sql("SELECT id, path FROM areas WHERE code = ?", (parent,)))
    (aid,), = (yield Sql("SELECT id FROM areas WHERE code = ?", (code,)))
    yield Sql("UPDATE areas SET parent_id = ?, path = ? WHERE id = ?",
              (pid, f"{ppath}{aid}/", aid))


@pytest.mark.parametrize("kind", BACKENDS)
async def test_one_gateways_commands_are_those_of_the_whole_scoped_list(
        kind: str, tmp_path: Path) -> None:
    """For an area-scoped user, the list of one gateway (the console's feed, every 0.5 s) is
    exactly that gateway's part of the whole list, looked up without listing every gateway:
    in scope shown; outside, at no site, retired, placed but never heard, or never known:
    none."""
    async with running(kind, tmp_path) as env:
        storage, store = env.app.state.storage, env.app.state.commands.service.store
        boss = await env.token("boss", "admin")
        site1 = await storage.run(lambda: gateway_path_program("gw-a"), write=False)
        (area_id,) = await storage.run(_site_of_gw_a, write=False)
        for gw in ("gw-r", "gw-loose"):
            await _birth(storage, gw)
        await assign_gateway(storage, "gw-r", area_id)
        await assign_gateway(storage, "gw-placed", area_id)
        for gw in ("gw-a", "gw-c", "gw-r", "gw-loose"):
            r = await env.c.post("/api/commands", headers=boss,
                                 json={"gw": gw, "kind": "request_diagnostics"})
            assert r.status_code == 201, r.text
        r = await env.c.post("/api/gateways/gw-r/retire", headers=boss,
                             json={"reason": "flooded", "force": True})
        assert r.status_code == 200, r.text
        for gw in ("gw-placed", "gw-never"):  # known only from a gateway's report
            res = CommandResult(f"foreign-{gw}", CommandState.REJECTED, kind="write_point")
            await store.apply_reports(gw, "s", [Report(1, now_ms(), res, result_attrs(res))])

        scopes = {"site1": lambda p: p is not None and p.startswith(site1),
                  "every site": lambda p: p is not None}
        shown = {}
        for name, sees in scopes.items():
            every = await visible_commands(env.app, sees, limit=1000)
            shown[name] = sorted({c.gw for c in every})

            async def unlisted() -> None:
                raise AssertionError("listed every gateway for one")

            # The real storage, its whole list made to fail.
            storage.list_gateways = unlisted  # type: ignore[method-assign]
            for gw in ("gw-a", "gw-c", "gw-r", "gw-loose", "gw-placed", "gw-never"):
                assert await visible_commands(env.app, sees, gw=gw, limit=1000) == [
                    c for c in every if c.gw == gw], (name, gw)
            del storage.list_gateways
        assert shown == {"site1": ["gw-a"], "every site": ["gw-a", "gw-c"]}


def _site_of_gw_a() -> Any:
    return (yield Sql("SELECT area_id FROM gateway_sites WHERE gw = 'gw-a'"))[0]
