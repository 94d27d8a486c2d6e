"""One producer per view, fanned out to every client that shows it (issue 12: "one
server-sent-events broadcaster shared by all clients").

A `Feed` builds the overview, the desk and the 叫应 board of one `View` (the user's area and
the area chosen on the page) every `check_s`, and offers an event to each subscriber when a
body changed (or every `refresh_s`, so ages stay fresh), and a `ping` every `ping_s`. Twenty
duty-room screens on the whole city cost one set of queries per check, not twenty. The feed
starts with its first subscriber and stops with its last.

Some events belong to one gateway of the view: the command list of the gateway a page shows.
A subscriber names that gateway (`Subscriber.gw`); the feed offers those events only to that
gateway's subscribers. It does not build them every check: it first asks `gateway_marks` for a
cheap change marker of every watched gateway at once (one query), and builds a gateway's events
only when its marker moved since the last build (or its refresh is due). A gateway watched for
the first time wakes the feed, so its events come at once, not at the next check. A page that
moves to another gateway stays on its view's feed.

A gateway event that cannot be built (its store down) goes out all the same, under its own name,
as `GatewayEventFailedOut` (`{now_ms, gw, error: {type, title}}`): its page would otherwise
wait on what it showed last, or on 「读取中…」, for ever. The feed keeps building it every check;
the first body that builds replaces the failure at once (its change key differs). The error's
text stays in the log: it may name tables, hosts or files. A failing build (or change-marker
read) is logged when it starts failing and when it recovers, not every check.

A subscriber keeps only the newest body of each event (`Subscriber.offer` replaces what is
pending): a slow client skips states it had no time to show and gets the newest, and never
holds the producer up or grows a queue. Each body is a whole state, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import structlog
from pydantic import BaseModel

from central import CentralError
from central.console.views import OverviewOut, View
from central.web.problems import problem_type
from central.web.routing import StrictModel
from runtime.clock import now_ms
from runtime.counters import Counters

log = structlog.get_logger(__name__)

Builder = Callable[[View], Awaitable[BaseModel]]
GatewayBuilder = Callable[[View, str], Awaitable[BaseModel]]
# What must change for any gateway event to change, for each gateway asked (a marker that
# compares equal promises unchanged bodies; one call for all the watched gateways).
GatewayMarks = Callable[[View, Sequence[str]], Awaitable[Mapping[str, Hashable]]]
Key = tuple[str, str | None]  # an event's name and its gateway (None: the whole view's)


class EventErrorOut(StrictModel):
    """Why an event could not be built, without the error's text."""

    type: str  # the error's problem type (`urn:fieldlink:problem:…`); about:blank if unforeseen
    title: str


class GatewayEventFailedOut(StrictModel):
    """A gateway event whose build failed, sent under the event's name in place of its body."""

    now_ms: int
    gw: str
    error: EventErrorOut


def failed_body(gw: str, exc: Exception) -> GatewayEventFailedOut:
    # Only an error central raises on purpose has a problem type of ours; a bug's class name
    # means nothing to a client.
    kind = problem_type(type(exc)) if isinstance(exc, CentralError) else "about:blank"
    return GatewayEventFailedOut(now_ms=now_ms(), gw=gw, error=EventErrorOut(
        type=kind, title="could not be read; the feed retries"))


def sse(event: str, data: str) -> bytes:
    return f"event: {event}\ndata: {data}\n\n".encode()


def change_key(body: BaseModel) -> str:
    """What must change for an event to go out at once: a gateway's `last_seen_ms` moves
    with every batch it sends (400 gateways would resend the overview every check), so it
    only rides along with a real change or the periodic refresh."""
    if isinstance(body, OverviewOut):
        return body.model_dump_json(exclude={"now_ms": True,
                                             "gateways": {"__all__": {"last_seen_ms"}}})
    return body.model_dump_json(exclude={"now_ms"})


class Subscriber:
    """One client's pending events, newest body per event name; `gw` is the gateway whose
    events it wants as well (None: only the view's)."""

    def __init__(self, gw: str | None = None) -> None:
        self.gw = gw
        self._pending: dict[str, bytes] = {}
        self._wake = asyncio.Event()

    def offer(self, name: str, data: bytes) -> None:
        self._pending.pop(name, None)  # re-inserted last: events go out in the order offered
        self._pending[name] = data
        self._wake.set()

    async def next(self) -> list[bytes]:
        """Wait for events; all pending ones, oldest first."""
        await self._wake.wait()
        self._wake.clear()
        out = list(self._pending.values())
        self._pending.clear()
        return out


@dataclass(slots=True)
class LiveCounters(Counters):
    """Feeds running, clients attached, rounds of checks, builds done and failed, gateway
    events left unbuilt since their marker did not move (read by the tests; not yet on
    `/metrics`)."""

    feeds: int = 0
    subscribers: int = 0
    builds: int = 0
    build_errors: int = 0
    unchanged: int = 0
    checks: int = 0


@dataclass
class Feed:
    view: View
    builders: Sequence[tuple[str, Builder]]
    gateway_builders: Sequence[tuple[str, GatewayBuilder]]
    counters: LiveCounters
    check_s: float
    ping_s: float
    refresh_s: float
    gateway_marks: GatewayMarks | None = None  # None: build the gateways' events every check
    subscribers: set[Subscriber] = field(default_factory=set)
    last: dict[Key, bytes] = field(default_factory=dict)  # newest event of each name
    keys: dict[Key, str] = field(default_factory=dict)  # change_key of the event last sent
    sent: dict[Key, float] = field(default_factory=dict)  # monotonic time it was sent
    marks: dict[Key, Hashable] = field(default_factory=dict)  # a gateway's marker at its build
    failing: dict[Key, int] = field(default_factory=dict)  # builds failed in a row, if any
    marks_failing: int = 0  # change-marker reads failed in a row
    task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # check now, not after check_s

    def join(self, sub: Subscriber) -> None:
        self.subscribers.add(sub)
        for (name, gw), data in self.last.items():  # a late joiner starts from the newest state
            if gw is None or gw == sub.gw:
                sub.offer(name, data)
        if sub.gw is not None and not any(k[1] == sub.gw for k in self.last):
            self.wake.set()  # a gateway nobody watched: build its events now

    def _send(self, key: Key, data: bytes) -> None:
        self.last[key] = data
        gw = key[1]
        for sub in self.subscribers:
            if gw is None or gw == sub.gw:
                sub.offer(key[0], data)

    def _watched(self) -> set[str]:
        """The gateways some subscriber watches; what is kept of the others is dropped, so a
        gateway watched again starts with a fresh event."""
        watched = {sub.gw for sub in self.subscribers if sub.gw is not None}
        for key in [k for k in self.keys if k[1] is not None and k[1] not in watched]:
            self.keys.pop(key)
            self.sent.pop(key, None)
            self.last.pop(key, None)
            self.marks.pop(key, None)
            self.failing.pop(key, None)
        return watched

    async def _marks(self, gws: Sequence[str]) -> Mapping[str, Hashable]:
        """The watched gateways' markers; none (so every event is built) if they cannot be
        read."""
        if self.gateway_marks is None or not gws:
            return {}
        try:
            marks = await self.gateway_marks(self.view, gws)
        except Exception:  # noqa: BLE001 - then build as if every marker moved
            self.counters.build_errors += 1
            if not self.marks_failing:
                log.warning("console_marks_failed", exc_info=True)
            self.marks_failing += 1
            return {}
        if self.marks_failing:
            log.info("console_marks_recovered", failed_reads=self.marks_failing)
            self.marks_failing = 0
        return marks

    def _due(self, key: Key) -> bool:
        return time.monotonic() - self.sent.get(key, 0.0) >= self.refresh_s

    async def _check_gateways(self) -> None:
        """Build each watched gateway's events whose marker moved (or is unknown) since its
        last build, or whose refresh is due."""
        gws = sorted(self._watched())
        marks = await self._marks(gws)
        for gw in gws:
            mark = marks.get(gw)
            for name, build_for in self.gateway_builders:
                key = (name, gw)
                if mark is not None and self.marks.get(key) == mark and not self._due(key):
                    self.counters.unchanged += 1
                    continue
                # A write after `marks` was read moves the marker again: built again next check.
                if await self._check(key, functools.partial(build_for, self.view, gw)):
                    self.marks[key] = mark
                else:  # its failure is what its watchers see: built again next check
                    self.marks.pop(key, None)

    async def _check(self, key: Key, build: Callable[[], Awaitable[BaseModel]]) -> bool:
        """Build one event; offer it if its body changed or it is due for a refresh. False
        if the build failed: a gateway event is then offered as `GatewayEventFailedOut`."""
        name, gw = key
        try:
            body = await build()
        except Exception as exc:  # noqa: BLE001 - one failed build must not end every screen
            self.counters.build_errors += 1
            if key not in self.failing:
                log.warning("console_build_failed", event_name=name, gw=gw, exc_info=True)
            self.failing[key] = self.failing.get(key, 0) + 1
            if gw is None:
                return False
            self._offer(key, failed_body(gw, exc))
            return False
        self.counters.builds += 1
        failed = self.failing.pop(key, 0)
        if failed:
            log.info("console_build_recovered", event_name=name, gw=gw, failed_builds=failed)
        self._offer(key, body)
        return True

    def _offer(self, key: Key, body: BaseModel) -> None:
        """Send `body` if it changed since the last one sent or its refresh is due."""
        change = change_key(body)
        if self.keys.get(key) != change or self._due(key):
            self.keys[key], self.sent[key] = change, time.monotonic()
            self._send(key, sse(key[0], body.model_dump_json()))

    async def run(self) -> None:
        last_ping = 0.0
        while True:
            self.wake.clear()  # a gateway joining from here on is built in the next round
            for name, build in self.builders:
                await self._check((name, None), functools.partial(build, self.view))
            await self._check_gateways()
            self.counters.checks += 1
            if time.monotonic() - last_ping >= self.ping_s:
                last_ping = time.monotonic()
                for sub in self.subscribers:
                    sub.offer("ping", sse("ping", json.dumps({"now_ms": now_ms()})))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.check_s)


class Broadcaster:
    """The feeds of every view that some client shows, by view."""

    def __init__(self, builders: Sequence[tuple[str, Builder]], *, check_s: float,
                 ping_s: float, refresh_s: float,
                 gateway_builders: Sequence[tuple[str, GatewayBuilder]] = (),
                 gateway_marks: GatewayMarks | None = None) -> None:
        self.builders = tuple(builders)
        self.gateway_builders = tuple(gateway_builders)
        self.gateway_marks = gateway_marks
        self.check_s, self.ping_s, self.refresh_s = check_s, ping_s, refresh_s
        self.feeds: dict[View, Feed] = {}
        self.counters = LiveCounters()

    @contextlib.asynccontextmanager
    async def subscribe(self, view: View, gw: str | None = None) -> AsyncIterator[Subscriber]:
        """A subscriber on `view`'s feed (started if it is the first), with the events of
        gateway `gw` as well if given; left on exit."""
        feed = self.feeds.get(view)
        if feed is None:
            feed = Feed(view, self.builders, self.gateway_builders, self.counters, self.check_s,
                        self.ping_s, self.refresh_s, self.gateway_marks)
            feed.task = asyncio.create_task(feed.run(), name=f"console.feed[{view.area}]")
            self.feeds[view] = feed
            self.counters.feeds = len(self.feeds)
        sub = Subscriber(gw)
        feed.join(sub)
        self.counters.subscribers += 1
        try:
            yield sub
        finally:
            self.counters.subscribers -= 1
            feed.subscribers.discard(sub)
            if not feed.subscribers and self.feeds.get(view) is feed:
                del self.feeds[view]
                self.counters.feeds = len(self.feeds)
                if feed.task is not None:
                    feed.task.cancel()
