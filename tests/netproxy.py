"""A loopback TCP proxy that a test controls, to cut, black-hole, slow or reset a link.

It is a real network element on 127.0.0.1 between the edge agent and the broker, not a mock:
the agent's own MQTT client sees exactly what a failing cellular link would show it.
Modes:
- `pass`: bytes flow both ways.
- `drop`: every connection is closed and new ones are closed at once (link down, RST-free).
- `blackhole`: connections stay open but nothing is forwarded (a dead link the TCP stack has
  not noticed; only keepalives find it).
- `slow`: each chunk is delayed by `delay_s` (a congested link: latency).
- `narrow`: bytes flow at most `rate_bps` bytes per second each way (a weak cell, satellite
  IP: bandwidth).
- `reset()`: close every connection with RST now, then keep the current mode.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, Literal

from central.demo.link import relay
from tests.helpers import free_port

Mode = Literal["pass", "drop", "blackhole", "slow", "narrow"]


class LinkProxy:
    def __init__(self, upstream_host: str, upstream_port: int, *, port: int | None = None) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.mode: Mode = "pass"
        self.delay_s = 0.2
        self.rate_bps = 50_000.0
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="link-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None

    # --- control from the test's thread ------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._run(self._start())

    def stop(self) -> None:
        self._run(self._close_all(rst=False))
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def set_mode(self, mode: Mode, delay_s: float | None = None,
                 rate_bps: float | None = None) -> None:
        if delay_s is not None:
            self.delay_s = delay_s
        if rate_bps is not None:
            self.rate_bps = rate_bps
        self.mode = mode
        if mode == "drop":
            self._run(self._close_all(rst=False))

    def reset(self) -> None:
        self._run(self._close_all(rst=True))

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    # --- the proxy itself ---------------------------------------------------------------------

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)

    async def _close_all(self, *, rst: bool) -> None:
        for w in list(self._writers):
            sock = w.get_extra_info("socket")
            if rst and sock is not None:
                # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.close()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "drop":
            writer.close()
            return
        await relay(reader, writer, self.upstream, self._writers, self._pump)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                if self.mode == "blackhole":
                    continue  # swallowed: the peer's TCP stack acks, the other side never sees it
                if self.mode == "slow":
                    await asyncio.sleep(self.delay_s)
                if self.mode == "narrow":
                    for i in range(0, len(chunk), 1024):  # paced in 1 KiB pieces
                        piece = chunk[i:i + 1024]
                        writer.write(piece)
                        await writer.drain()
                        await asyncio.sleep(len(piece) / self.rate_bps)
                    continue
                writer.write(chunk)
                await writer.drain()
        finally:
            writer.close()
