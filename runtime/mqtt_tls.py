"""The TLS context `runtime.mqtt.Client` hands paho: paho 2.2 does not close the socket of a
handshake that failed (its `_ssl_wrap_socket` raises from `do_handshake` with the socket still
open), so a refused TLS 1.2 certificate, or a broker certificate we refuse, left one socket per
attempt for the collector to close, whenever it ran. `SocketsKept` keeps the sockets it wraps,
and the client closes those whose handshake never finished as soon as the attempt ends."""

from __future__ import annotations

import ssl
from typing import Any


class SocketsKept:
    """The caller's TLS context for one client, keeping the sockets it wraps. paho calls
    only `wrap_socket` and reads `check_hostname`; the rest is the context's. The context
    itself is not changed: sessions and attempts share it."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        self._sockets: list[ssl.SSLSocket] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock = self._context.wrap_socket(*args, **kwargs)
        self._sockets.append(sock)  # in aiomqtt's executor thread: append is atomic
        return sock

    def close_unfinished(self, _attempt: object = None) -> None:
        """Close the sockets whose handshake did not finish: paho never took them. The one a
        connection runs on (handshake done) is paho's to close."""
        unfinished = [s for s in self._sockets if s.version() is None]
        self._sockets = [s for s in self._sockets if s.version() is not None]
        for sock in unfinished:
            sock.close()
