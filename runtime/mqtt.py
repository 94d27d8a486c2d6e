"""One MQTT session for both daemons, on aiomqtt 2.x's public API only (STYLE.md §14).

`MqttSession(endpoint, name=...)` keeps one connection up for as long as `run(serve)` runs: it
connects (TLS, username and password, a Will), hands the connected client to `serve`, and when
the connection goes, reconnects after a jittered, capped, exponential back-off
(`runtime.tasks.Backoff`).
`serve` learns of a disconnection the public way: iterating `client.messages` raises
`aiomqtt.MqttError` when the link drops (so does a publish). A session that only publishes runs
`until_disconnected(client)` beside its work to hear of it at once.

A broker restart is an expected event: the session logs it once per outage at WARNING
(`mqtt_disconnected`), every failed attempt after that at DEBUG, and the end of the outage at
INFO (`mqtt_connected`, with its length) — never an ERROR or a traceback.

What aiomqtt 2.5 lacks is wrapped here, once, in `Client` (hence the `aiomqtt~=2.5` pin):

- A connection closed before CONNACK (a cut link behind a NAT or proxy, a broker shedding
  load) is not noticed: the attempt waits out the client's whole `timeout`. `Client` bounds
  the wait for CONNACK by `connect_timeout` instead; an attempt still pending then is left to
  finish in the background and is closed cleanly if it connects late.
- After an unexpected disconnection aiomqtt keeps the reason where only the message iterator
  reads it; a session that stops before reading it would make asyncio log "Future exception
  was never retrieved". `Client.__aexit__` reads it through the public iterator.

Example::

    session = MqttSession(Endpoint("broker", 8883, client_id="gw-1", tls=lambda: ctx),
                          name="uplink", will=lambda: aiomqtt.Will("t/state", b"off", 1, True))

    async def serve(client: aiomqtt.Client) -> None:
        await client.subscribe("t/down/#", qos=1)
        async for message in client.messages:
            ...

    await session.run(serve)  # until cancelled
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, NoReturn, Self

import aiomqtt
import structlog

from runtime.files import FileError
from runtime.tasks import Backoff

log = structlog.get_logger(__name__)

Serve = Callable[[aiomqtt.Client], Awaitable[None]]
_PLAIN_CONNECT_TIMEOUT_S = 5.0
# Reconnect back-off unless told otherwise: from 0.5 s up to 10 s, reset by every connect.
_RECONNECT = Backoff(first_s=0.5, max_s=10.0, healthy_after_s=0.0)
OnDown = Callable[[aiomqtt.MqttError, bool], Awaitable[None]]


class TlsFileError(FileError):
    """A CA, certificate or key file that cannot be loaded into a TLS context."""


def client_tls_context(ca: Path, cert: Path | None = None, key: Path | None = None, *,
                       check_hostname: bool = True) -> ssl.SSLContext:
    """A client context: the broker must chain to `ca` (and name the host, unless
    `check_hostname` is off); the client shows `cert`/`key` when given. TLS 1.2 at least.
    Raises `TlsFileError`."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise TlsFileError(ca, f"cannot load the CA certificate: {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    if cert is not None and key is not None:
        try:
            ctx.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as exc:
            raise TlsFileError(cert, f"cannot load the certificate and key: {exc}") from exc
    return ctx


class Client(aiomqtt.Client):
    """aiomqtt's client with a bounded wait for CONNACK and the disconnection reason read on
    exit (see the module's docstring). Takes aiomqtt's keyword arguments, plus
    `connect_timeout` (seconds)."""

    # Attempts that outlived `connect_timeout`, kept referenced until they finish.
    _late: ClassVar[set[asyncio.Future[Any]]] = set()

    def __init__(self, hostname: str, port: int = 1883, *, connect_timeout: float = 5.0,
                 **kwargs: Any) -> None:
        super().__init__(hostname, port, **kwargs)
        self.connect_timeout = connect_timeout

    async def __aenter__(self) -> Self:
        attempt = asyncio.ensure_future(super().__aenter__())
        try:
            async with asyncio.timeout(self.connect_timeout):
                await asyncio.shield(attempt)
        except TimeoutError:
            self._finish_late(attempt)
            raise aiomqtt.MqttError(
                f"no CONNACK within {self.connect_timeout:g} s (connection closed before "
                "CONNACK, or a silent broker)") from None
        except asyncio.CancelledError:
            self._finish_late(attempt)
            raise
        return self

    def _finish_late(self, attempt: asyncio.Future[Any]) -> None:
        """Let a pending attempt end by itself; disconnect it cleanly if it connects after all."""
        if attempt.done():
            self._close_late(attempt)
            return
        self._late.add(attempt)
        attempt.add_done_callback(self._close_late)

    def _close_late(self, attempt: asyncio.Future[Any]) -> None:
        self._late.discard(attempt)
        if attempt.cancelled() or attempt.exception() is not None:
            return  # the attempt failed: nothing is open
        closing = asyncio.ensure_future(self.__aexit__(None, None, None))
        self._late.add(closing)
        closing.add_done_callback(self._closed_late)

    def _closed_late(self, closing: asyncio.Future[Any]) -> None:
        self._late.discard(closing)
        if not closing.cancelled():
            closing.exception()  # read: a failed goodbye to a late connection says nothing new

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            await super().__aexit__(exc_type, exc, tb)
        finally:
            await self._read_disconnect_reason()

    async def _read_disconnect_reason(self) -> None:
        """After the exit, the message iterator raises MqttError at once, chained to the
        disconnection's reason, which marks the reason read. Messages still queued are
        dropped: their connection is gone (QoS 1 brings them again)."""
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(1.0):
                while True:
                    await anext(self.messages)


async def until_disconnected(client: aiomqtt.Client) -> NoReturn:
    """Wait until the connection drops and raise its `MqttError`, for a session that only
    publishes (it must subscribe to nothing: messages that come are dropped)."""
    async for _ in client.messages:
        pass
    raise aiomqtt.MqttError("the message iterator ended")  # aiomqtt raises before this


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to connect. `tls` is called at every attempt (a renewed certificate is
    picked up without a restart); it may raise `aiomqtt.MqttError` for files gone bad, which
    counts as a failed attempt. `timeout_s` is aiomqtt's default for publish and subscribe."""

    host: str
    port: int
    client_id: str
    clean_session: bool = False
    keepalive_s: int = 30
    timeout_s: float = 10.0
    # How long an attempt may take up to CONNACK; None: 5 s on plain TCP (two round trips,
    # and a link that drops the connection is noticed within it), `timeout_s` with TLS (its
    # handshake takes more round trips, slow on a satellite link; and a dropped connection
    # fails the handshake at once anyway).
    connect_timeout_s: float | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: Callable[[], ssl.SSLContext | None] | None = None

    @property
    def broker(self) -> str:
        return f"{self.host}:{self.port}"


class MqttSession:
    """One connection kept up by `run()`, reconnecting with back-off (see the module's
    docstring). A connection that lasted `backoff.healthy_after_s` resets the back-off; one
    that dropped sooner (an ACL refusal, a twin with our client id) does not, so it is not
    hammered."""

    def __init__(self, endpoint: Endpoint, *, name: str,
                 will: Callable[[], aiomqtt.Will | None] | None = None,
                 backoff: Backoff = _RECONNECT) -> None:
        self.endpoint = endpoint
        self.name = name
        self.will = will
        self.backoff = backoff
        self._delay = backoff.first_s
        self.connects = 0
        self._log = log.bind(session=name, broker=endpoint.broker, client_id=endpoint.client_id)
        self._down_since: float | None = None  # monotonic start of the current outage

    def client(self) -> Client:
        """A client for one attempt, as the endpoint says."""
        e = self.endpoint
        tls = e.tls() if e.tls is not None else None
        connect_timeout = (e.connect_timeout_s if e.connect_timeout_s is not None
                           else _PLAIN_CONNECT_TIMEOUT_S if tls is None else e.timeout_s)
        return Client(e.host, e.port, identifier=e.client_id, clean_session=e.clean_session,
                      protocol=aiomqtt.ProtocolVersion.V311, keepalive=e.keepalive_s,
                      timeout=e.timeout_s, connect_timeout=connect_timeout,
                      will=self.will() if self.will is not None else None,
                      tls_context=tls, username=e.username, password=e.password)

    async def run(self, serve: Serve, *, on_down: OnDown | None = None) -> NoReturn:
        """Connect, `await serve(client)`, and reconnect whenever the connection or an attempt
        fails, until cancelled. `on_down(error, first)` runs after each failure; `first` is
        true for the first of an outage."""
        while True:
            up_since: float | None = None
            try:
                async with self.client() as client:
                    up_since = time.monotonic()
                    self._connected()
                    await serve(client)
            except* aiomqtt.MqttError as group:
                exc = group.exceptions[0]
                assert isinstance(exc, aiomqtt.MqttError)
                first = self._went_down(exc, was_up=up_since is not None)
                if on_down is not None:
                    await on_down(exc, first)
            if (up_since is not None
                    and time.monotonic() - up_since >= self.backoff.healthy_after_s):
                self._delay = self.backoff.first_s
            await asyncio.sleep(self.backoff.wait_s(self._delay))
            self._delay = self.backoff.next_delay(self._delay)

    def _connected(self) -> None:
        self.connects += 1
        outage = None if self._down_since is None else time.monotonic() - self._down_since
        self._down_since = None
        self._log.info("mqtt_connected", connects=self.connects,
                       outage_s=None if outage is None else round(outage, 2))

    def _went_down(self, exc: aiomqtt.MqttError, *, was_up: bool) -> bool:
        """Log once per outage; returns whether this failure starts one."""
        first = was_up or self._down_since is None
        if first:
            self._down_since = time.monotonic()
            self._log.warning("mqtt_disconnected", error=str(exc), was_up=was_up,
                              retry_in_s=round(self._delay, 2))
        else:
            self._log.debug("mqtt_connect_failed", error=str(exc))
        return first


__all__ = ["Client", "Endpoint", "MqttSession", "TlsFileError", "client_tls_context",
           "until_disconnected"]
