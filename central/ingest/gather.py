"""The next group write, gathered while the current one is written (`Ingest._consume`).

One task (`Gathering.receive`) is the only reader of the session's message iterator: it takes
each message as it comes, decodes it at once (in the current write's waits on the database)
and adds it to the group being gathered, up to `limit` messages; then it stops reading until
the group is taken. The writer takes the whole group when its previous write is done. So a
message waits for one write, not two, and groups grow with the rate (one commit, one fsync,
for as many batches as came meanwhile).

Why one reader: cancelling a pending `anext` on aiomqtt's iterator after its queue read has
completed loses that message, and two readers could hand two messages over out of order
(groups are written in arrival order: alarm ordering relies on it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import aiomqtt

T = TypeVar("T")
InfoT = TypeVar("InfoT")  # a state or birth message
BatchT = TypeVar("BatchT")  # a data batch

Decode = Callable[[list[aiomqtt.Message]], tuple[list[InfoT], list[BatchT]]]


class Group(Generic[InfoT, BatchT]):
    """The decoded messages of one group write, in arrival order."""

    __slots__ = ("messages", "infos", "batches")

    def __init__(self) -> None:
        self.messages = 0
        self.infos: list[InfoT] = []
        self.batches: list[BatchT] = []


class Gathering(Generic[InfoT, BatchT]):
    """The group being gathered (module doc); `decode` checks one message as
    `Ingest.decode_group` does. While the group is full the receiver reads nothing, so a
    disconnect then shows when the group is taken (after the current write), as before."""

    def __init__(self, decode: Decode[InfoT, BatchT], limit: int) -> None:
        self._decode = decode
        self.limit = limit
        self._group: Group[InfoT, BatchT] = Group()
        self._ready = asyncio.Event()  # the group holds a message
        self._full = asyncio.Event()  # the group holds `limit` messages
        self._room = asyncio.Event()  # the group holds fewer than `limit`
        self._room.set()

    async def receive(self, messages: aiomqtt.MessagesIterator) -> None:
        """Read, decode and gather every message; raises what the iterator raises (the
        session's end)."""
        while True:
            await self._room.wait()
            message = await anext(messages)
            infos, batches = self._decode([message])
            group = self._group
            group.infos += infos
            group.batches += batches
            group.messages += 1
            self._ready.set()
            if group.messages >= self.limit:
                self._room.clear()
                self._full.set()

    async def ready(self) -> None:
        """Until the group holds a message."""
        await self._ready.wait()

    async def full_or_after(self, seconds: float) -> None:
        """Until the group is full, or `seconds` have passed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._full.wait()

    def take(self) -> Group[InfoT, BatchT]:
        """The group gathered so far; gathering starts a new one."""
        group, self._group = self._group, Group()
        self._ready.clear()
        self._full.clear()
        self._room.set()
        return group


async def until(aw: Awaitable[T], receiver: asyncio.Task[None]) -> T:
    """`aw`'s result, or what `receiver` raised if it has ended or ends first (the session
    ended: nothing more is started on it)."""
    waiting = asyncio.ensure_future(aw)
    try:
        if not receiver.done():
            await asyncio.wait((waiting, receiver), return_when=asyncio.FIRST_COMPLETED)
        if receiver.done():
            receiver.result()  # raises: the receiver only ends by raising
        return await waiting
    finally:
        if waiting is not aw and not waiting.done():  # only what was made here
            waiting.cancel()
