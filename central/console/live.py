"""One producer per view, fanned out to every client that shows it (issue 12: "one
server-sent-events broadcaster shared by all clients").

A `Feed` builds the overview, the desk and the 叫应 board of one `View` (the user's area and
the area chosen on the page) every `check_s`, and offers an event to each subscriber when a
body changed (or every `refresh_s`, so ages stay fresh), and a `ping` every `ping_s`. Twenty
duty-room screens on the whole city cost one set of queries per check, not twenty. The feed
starts with its first subscriber and stops with its last.

A subscriber keeps only the newest body of each event (`Subscriber.offer` replaces what is
pending): a slow client skips states it had no time to show and gets the newest, and never
holds the producer up or grows a queue. Each body is a whole state, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import structlog
from pydantic import BaseModel

from central.console.views import OverviewOut, View
from runtime.clock import now_ms
from runtime.counters import Counters

log = structlog.get_logger(__name__)

Builder = Callable[[View], Awaitable[BaseModel]]


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
    """One client's pending events, newest body per event name."""

    def __init__(self) -> None:
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
    """Feeds running, clients attached, builds done and failed (read by the tests; not yet
    on `/metrics`)."""

    feeds: int = 0
    subscribers: int = 0
    builds: int = 0
    build_errors: int = 0


@dataclass
class Feed:
    view: View
    builders: Sequence[tuple[str, Builder]]
    counters: LiveCounters
    check_s: float
    ping_s: float
    refresh_s: float
    subscribers: set[Subscriber] = field(default_factory=set)
    last: dict[str, bytes] = field(default_factory=dict)  # newest event of each name
    task: asyncio.Task[None] | None = None

    def join(self, sub: Subscriber) -> None:
        self.subscribers.add(sub)
        for name, data in self.last.items():  # a late joiner starts from the newest state
            sub.offer(name, data)

    def _send(self, name: str, data: bytes) -> None:
        self.last[name] = data
        for sub in self.subscribers:
            sub.offer(name, data)

    async def run(self) -> None:
        keys: dict[str, str] = {}
        sent: dict[str, float] = {}
        last_ping = 0.0
        while True:
            for name, build in self.builders:
                try:
                    body = await build(self.view)
                except Exception:  # noqa: BLE001 - one failed build must not end every screen
                    self.counters.build_errors += 1
                    log.warning("console_build_failed", event_name=name, exc_info=True)
                    continue
                self.counters.builds += 1
                key = change_key(body)
                due = time.monotonic() - sent.get(name, 0.0) >= self.refresh_s
                if keys.get(name) != key or due:
                    keys[name], sent[name] = key, time.monotonic()
                    self._send(name, sse(name, body.model_dump_json()))
            if time.monotonic() - last_ping >= self.ping_s:
                last_ping = time.monotonic()
                for sub in self.subscribers:
                    sub.offer("ping", sse("ping", json.dumps({"now_ms": now_ms()})))
            await asyncio.sleep(self.check_s)


class Broadcaster:
    """The feeds of every view that some client shows, by view."""

    def __init__(self, builders: Sequence[tuple[str, Builder]], *, check_s: float,
                 ping_s: float, refresh_s: float) -> None:
        self.builders = tuple(builders)
        self.check_s, self.ping_s, self.refresh_s = check_s, ping_s, refresh_s
        self.feeds: dict[View, Feed] = {}
        self.counters = LiveCounters()

    @contextlib.asynccontextmanager
    async def subscribe(self, view: View) -> AsyncIterator[Subscriber]:
        """A subscriber on `view`'s feed (started if it is the first), left on exit."""
        feed = self.feeds.get(view)
        if feed is None:
            feed = Feed(view, self.builders, self.counters, self.check_s, self.ping_s,
                        self.refresh_s)
            feed.task = asyncio.create_task(feed.run(), name=f"console.feed[{view.area}]")
            self.feeds[view] = feed
            self.counters.feeds = len(self.feeds)
        sub = Subscriber()
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
