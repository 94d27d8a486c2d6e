"""The demo's link switch: one gateway reaches the broker through a TCP relay that the 三断
scenario cuts and restores, as a storm cuts a county's fibre and cell towers.

Not for production: a relay on loopback that closes every connection and refuses new ones
while it is cut. The agent sees what a dead link shows it (connections refused), notices, and
falls back to BeiDou.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger(__name__)

_CHUNK = 65536


class LinkSwitch:
    """`async with LinkSwitch(host, port) as link:` relays 127.0.0.1:`link.port` → host:port."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.cut = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> LinkSwitch:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        self._close_all()

    def set_cut(self, cut: bool) -> None:
        """Cut the link (every connection closed, new ones refused) or restore it."""
        self.cut = cut
        if cut:
            self._close_all()
        log.info("demo_link_cut" if cut else "demo_link_restored", port=self.port)

    def _close_all(self) -> None:
        for w in list(self._writers):
            w.close()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.close()
            return
        await relay(reader, writer, self.upstream, self._writers, _pump)




Pump = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                upstream: tuple[str, int], open_writers: set[asyncio.StreamWriter],
                pump: Pump) -> None:
    """Connect an accepted client to `upstream` and `pump` bytes both ways until both
    directions end (the client is closed at once if upstream refuses). Both writers sit in
    `open_writers` meanwhile, so that cutting the link can close them. Also the test suite's
    link proxy (`tests/netproxy.py`), with a pump that can stall or slow the bytes."""
    try:
        up_reader, up_writer = await asyncio.open_connection(*upstream)
    except OSError:
        writer.close()
        return
    open_writers.update((writer, up_writer))
    try:
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer),
                             return_exceptions=True)
    finally:
        for w in (writer, up_writer):
            open_writers.discard(w)
            w.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    writer.close()
