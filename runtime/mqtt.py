"""One MQTT session for both daemons, on aiomqtt 2.x's public API only (STYLE.md §14).

`MqttSession(endpoint, name=...)` keeps one connection up for as long as `run(serve)` runs: it
connects (TLS, username and password, a Will), hands the connected client to `serve`, and when
the connection goes, reconnects after a jittered, capped, exponential back-off
(`runtime.tasks.Backoff`).
`serve` learns of a disconnection the public way: iterating `client.messages` raises
`aiomqtt.MqttError` when the link drops (so does a publish). A session that only publishes runs
`until_disconnected(client)` beside its work to hear of it at once.

Two kinds of failed attempt are retried differently. One that never reached a broker that
answered (connection refused, reset or closed before CONNACK, no CONNACK in time: the path is
down) is retried within `link_retry_max_s` (1 s, jittered): each try is a cheap SYN, and a link
that comes back is noticed within about a second instead of a whole back-off. One that a broker
refused (a CONNACK refusal: bad credentials, server unavailable; a TLS alert: our certificate
revoked or untrusted, `runtime.mqtt_refusal`) backs off in full, up to `Backoff.max_s`, so a
broker that is up but says no is not hammered. The session counts both kinds (`path_failures`,
`refusals` by `Refusal`) and keeps what refused the last attempt (`refused`). On plain
TCP a connection the link closes before CONNACK cannot be told from a slow broker (aiomqtt does
not report it), so while the path is down an attempt waits for CONNACK only a few times the last
connect's duration (at least 0.5 s); an attempt that connects after that wait raises the
estimate, so a slow path is not cut short twice.

Stopping: `run` is cancelled. `serve` runs in a task of its own and the session waits on that
task, so the cancel always reaches the session, whatever `serve` does with it, and the cancel
count of the session's task is not touched by what happens inside `serve` (Python 3.11's
TaskGroup leaves its parent task's count raised when a child fails while the parent waits in
`__aexit__`). The session then cancels `serve` and waits for it; a `serve` still running after
`_STOP_AGAIN_S` is cancelled again.

A broker restart is an expected event: the session logs it once per outage at WARNING
(`mqtt_disconnected`, with its `cause`: `dropped`, `path` or a `Refusal`), every failed attempt
after that at DEBUG but for the first of each refusal in the outage (`mqtt_refused`, WARNING: a
broker back from a restart that now refuses our certificate says so once), and the end of the
outage at INFO (`mqtt_connected`, with its length) — never an ERROR or a traceback.

What aiomqtt 2.5 lacks is wrapped here, once, in `Client` (hence the `aiomqtt~=2.5` pin):

- A connection closed before CONNACK (a cut link behind a NAT or proxy, a broker shedding
  load) is not noticed: the attempt waits out the client's whole `timeout`. `Client` bounds
  the wait for CONNACK by `connect_timeout` instead; an attempt still pending then is left to
  finish in the background and is closed cleanly if it connects late.
- After an unexpected disconnection aiomqtt keeps the reason where only the message iterator
  reads it; a session that stops before reading it would make asyncio log "Future exception
  was never retrieved". `Client.__aexit__` reads it through the public iterator.
- aiomqtt awaits every acknowledgement with `asyncio.wait_for`, which on Python 3.11 returns the
  result instead of raising when a cancel lands in the loop turn in which the result came (the
  cancel is lost, and a stop hangs). `Client`'s publish, subscribe, unsubscribe and exit raise
  such a cancel again (`_cancel_kept`).
- Under TLS 1.3 a broker that refuses our certificate says so with an alert on the first
  read, which paho only logs and aiomqtt drops before CONNACK: the attempt would wait out its
  CONNACK timeout and pass for a path failure. `Client` gives aiomqtt a logger of its own per
  client (`runtime.mqtt_refusal.AlertCatcher`, which says why a logger) and fails the attempt
  at once with `CertificateRefusedError`; a TLS 1.2 alert, which fails the handshake, becomes
  the same error.
- aiomqtt logs through paho at ERROR when a socket fails ("failed to receive on socket"), and
  asyncio logs an ERROR traceback when aiomqtt's socket registration, scheduled from paho's
  thread, runs after the link closed the socket ("add_writer … Bad file descriptor"). Both are
  the session's expected outage: `Client` logs through `runtime.mqtt.client`, where such lines
  are DEBUG, and the `asyncio` logger gets the same filter for aiomqtt's socket callbacks.
- paho 2.2 does not close the socket of a TLS handshake that failed: `Client` closes it as
  soon as the attempt ends (`runtime.mqtt_tls.SocketsKept`).

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
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, NoReturn, Self, cast

import aiomqtt
import structlog
from paho.mqtt.reasoncodes import ReasonCode

from runtime.files import FileError
from runtime.mqtt_refusal import AlertCatcher, Refusal, TlsClosedError, alert_error, refusal_of
from runtime.mqtt_tls import SocketsKept
from runtime.tasks import Backoff

log = structlog.get_logger(__name__)

Serve = Callable[[aiomqtt.Client], Coroutine[Any, Any, None]]
_PLAIN_CONNECT_TIMEOUT_S = 5.0
# While the path is down on plain TCP: the CONNACK wait is this many times the last connect's
# duration, at least the minimum (see the module's docstring).
_PROBE_CONNACK_FACTOR = 4.0
_PROBE_CONNACK_MIN_S = 0.5
# Reconnect back-off unless told otherwise: from 0.5 s up to 10 s, reset by every connect.
_RECONNECT = Backoff(first_s=0.5, max_s=10.0, healthy_after_s=0.0)
# Longest wait before retrying an attempt that failed on the path, unless told otherwise.
_LINK_RETRY_MAX_S = 1.0
# A serve still running this long after its cancel is cancelled again (a cancel it lost).
_STOP_AGAIN_S = 5.0
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


class _AtDebug(logging.Filter):
    """A logger's lines that `expected` picks, at DEBUG: they are the outage the session logs
    once (see the module's docstring); the logger's other lines keep their level."""

    def __init__(self, expected: Callable[[logging.LogRecord], bool]) -> None:
        super().__init__()
        self.expected = expected

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and self.expected(record):
            if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
                return False
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def _paho_link_failure(record: logging.LogRecord) -> bool:
    """paho's line for a failing socket (or for aiomqtt's socket callbacks failing on it)."""
    return str(record.msg).startswith(
        ("failed to receive on socket", "timeout on socket", "Caught exception in on_socket_"))


def _late_socket_callback(record: logging.LogRecord) -> bool:
    """asyncio's line for aiomqtt's socket registration that ran after paho had closed the
    socket: aiomqtt schedules it from paho's thread, and a link that closes wins the race."""
    exc = record.exc_info[1] if record.exc_info else None
    return isinstance(exc, (OSError, ValueError)) and "Client._on_socket_" in record.getMessage()


_CLIENT_LOG = logging.getLogger("runtime.mqtt.client")
_CLIENT_LOG.addFilter(_AtDebug(_paho_link_failure))
logging.getLogger("asyncio").addFilter(_AtDebug(_late_socket_callback))


@contextlib.contextmanager
def _cancel_kept() -> Iterator[None]:
    """Raise again a cancel that the call in the body swallowed: the task's cancel count rose
    during it and the call returned anyway (Python 3.11's `asyncio.wait_for`, see the module's
    docstring). Counts raised before the call (what some other code left behind) do not
    count."""
    task = asyncio.current_task()
    before = 0 if task is None else task.cancelling()
    yield
    if task is not None and task.cancelling() > before:
        raise asyncio.CancelledError


class Client(aiomqtt.Client):
    """aiomqtt's client with a bounded wait for CONNACK, the disconnection reason read on
    exit, no cancel lost in its calls, and link failures logged at DEBUG (see the module's
    docstring). Takes aiomqtt's keyword arguments, plus `connect_timeout` (seconds) and
    `on_connect_s`, called with the seconds an attempt took to connect (late ones too)."""

    # Attempts that outlived `connect_timeout`, kept referenced until they finish.
    _late: ClassVar[set[asyncio.Future[Any]]] = set()

    def __init__(self, hostname: str, port: int = 1883, *, connect_timeout: float = 5.0,
                 on_connect_s: Callable[[float], None] | None = None, **kwargs: Any) -> None:
        # Duck-typed where aiomqtt and paho annotate a Logger: they call only log() and the
        # level methods on it, which a LoggerAdapter has (`runtime.mqtt_refusal`).
        self._alerts = AlertCatcher(kwargs.pop("logger", None) or _CLIENT_LOG)
        tls = kwargs.pop("tls_context", None)
        self._tls = None if tls is None else SocketsKept(tls)
        kwargs["tls_context"] = cast(ssl.SSLContext | None, self._tls)
        super().__init__(hostname, port, logger=cast(logging.Logger, self._alerts), **kwargs)
        self.connect_timeout = connect_timeout
        self._on_connect_s = on_connect_s
        self._started = 0.0

    async def __aenter__(self) -> Self:
        self._started = time.monotonic()
        refused = self._alerts.listen()
        attempt = asyncio.ensure_future(super().__aenter__())
        if self._tls is not None:
            attempt.add_done_callback(self._tls.close_unfinished)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await asyncio.wait((attempt, refused), return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            self._finish_late(attempt)
            raise aiomqtt.MqttError(
                f"no CONNACK within {self.connect_timeout:g} s (connection closed before "
                "CONNACK, or a silent broker)") from None
        except asyncio.CancelledError:
            self._finish_late(attempt)
            raise
        if not attempt.done():  # a TLS error after the handshake: paho closed the socket
            self._finish_late(attempt)
            raise refused.result()
        try:
            attempt.result()
        except aiomqtt.MqttError as exc:  # a TLS 1.2 alert ends the handshake itself
            cause = exc.__context__
            if isinstance(cause, ssl.SSLError) and (refusal := alert_error(cause)) is not None:
                raise refusal from cause
            raise
        self._alerts.listening = False  # connected: the packets' log lines need no look
        self._connected_after()
        return self

    def _connected_after(self) -> None:
        if self._on_connect_s is not None:
            self._on_connect_s(time.monotonic() - self._started)

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
        self._connected_after()
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
            with _cancel_kept():
                await super().__aexit__(exc_type, exc, tb)
        finally:
            await self._read_disconnect_reason()

    async def publish(self, *args: Any, **kwargs: Any) -> None:
        with _cancel_kept():
            await super().publish(*args, **kwargs)

    async def subscribe(self, *args: Any, **kwargs: Any) -> tuple[int, ...] | list[ReasonCode]:
        with _cancel_kept():
            return await super().subscribe(*args, **kwargs)

    async def unsubscribe(self, *args: Any, **kwargs: Any) -> None:
        with _cancel_kept():
            await super().unsubscribe(*args, **kwargs)

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
    hammered. An attempt that failed on the path waits at most `link_retry_max_s` (jittered
    as the back-off is)."""

    def __init__(self, endpoint: Endpoint, *, name: str,
                 will: Callable[[], aiomqtt.Will | None] | None = None,
                 backoff: Backoff = _RECONNECT,
                 link_retry_max_s: float = _LINK_RETRY_MAX_S) -> None:
        self.endpoint = endpoint
        self.name = name
        self.will = will
        self.backoff = backoff
        self.link_retry_max_s = link_retry_max_s
        self._delay = backoff.first_s
        self.connects = 0
        self.path_failures = 0  # attempts that reached no broker that answered
        self.refusals: dict[str, int] = {}  # attempts a broker refused, by `Refusal`
        # What refused the last attempt, and the error that said so; None once connected or
        # when it failed on the path.
        self.refused: Refusal | None = None
        self.refusal: aiomqtt.MqttError | None = None
        self._log = log.bind(session=name, broker=endpoint.broker, client_id=endpoint.client_id)
        self._down_since: float | None = None  # monotonic start of the current outage
        self._path_down = False  # the last attempt failed on the path
        self._logged: set[Refusal | None] = set()  # causes logged at WARNING in this outage
        self._connect_s = 0.0  # how long the last connect took (late ones too)

    def client(self) -> Client:
        """A client for one attempt, as the endpoint says."""
        e = self.endpoint
        tls = e.tls() if e.tls is not None else None
        connect_timeout = (e.connect_timeout_s if e.connect_timeout_s is not None
                           else _PLAIN_CONNECT_TIMEOUT_S if tls is None else e.timeout_s)
        if self._path_down and tls is None:
            connect_timeout = min(connect_timeout, max(
                _PROBE_CONNACK_MIN_S, _PROBE_CONNACK_FACTOR * self._connect_s))
        return Client(e.host, e.port, identifier=e.client_id, clean_session=e.clean_session,
                      protocol=aiomqtt.ProtocolVersion.V311, keepalive=e.keepalive_s,
                      timeout=e.timeout_s, connect_timeout=connect_timeout,
                      on_connect_s=self._connect_took,
                      will=self.will() if self.will is not None else None,
                      tls_context=tls, username=e.username, password=e.password)

    def _connect_took(self, seconds: float) -> None:
        self._connect_s = seconds

    async def run(self, serve: Serve, *, on_down: OnDown | None = None) -> NoReturn:
        """Connect, run `serve(client)`, and reconnect whenever the connection or an attempt
        fails, until cancelled. `on_down(error, first)` runs after each failure; `first` is
        true for the first of an outage."""
        while True:
            up_since: float | None = None
            attempted = False
            error: aiomqtt.MqttError | None = None
            try:
                client = self.client()
                attempted = True
                async with client:
                    up_since = time.monotonic()
                    self._connected()
                    await _serve_apart(serve, client, self.name)
            except* aiomqtt.MqttError as group:
                error = _first_error(group)
            self._classify(error if attempted and up_since is None else None)
            wait = self._next_wait(up_since)
            if error is not None:
                first = self._went_down(error, was_up=up_since is not None, retry_in_s=wait)
                if on_down is not None:
                    await on_down(error, first)
            await asyncio.sleep(wait)

    def _classify(self, failed: aiomqtt.MqttError | None) -> None:
        """Count an attempt that failed before CONNACK (`failed`) as a refusal or a path
        failure; None: the attempt connected, or could not start. A TLS session closed without
        an alert right after a refusal is that refusal again (`runtime.mqtt_refusal`)."""
        cause = None if failed is None else refusal_of(failed)
        if cause is not None:
            self.refused, self.refusal = cause, failed
        elif not (isinstance(failed, TlsClosedError) and self.refused is not None):
            self.refused = self.refusal = None  # else the refusal before stands
        self._path_down = failed is not None and self.refused is None
        if self.refused is not None:
            self.refusals[self.refused] = self.refusals.get(self.refused, 0) + 1
        elif self._path_down:
            self.path_failures += 1

    def _next_wait(self, up_since: float | None) -> float:
        """The wait before the next attempt, and the back-off moved on."""
        b = self.backoff
        if up_since is not None and time.monotonic() - up_since >= b.healthy_after_s:
            self._delay = b.first_s
        delay = min(self._delay, self.link_retry_max_s) if self._path_down else self._delay
        self._delay = b.next_delay(self._delay)
        return b.wait_s(delay)

    def _connected(self) -> None:
        # Connected: no refusal stands, and a session closed without an alert from now on is
        # not the refusal before again.
        self.refused = self.refusal = None
        self.connects += 1
        outage = None if self._down_since is None else time.monotonic() - self._down_since
        self._down_since = None
        self._log.info("mqtt_connected", connects=self.connects,
                       outage_s=None if outage is None else round(outage, 2))

    def _went_down(self, exc: aiomqtt.MqttError, *, was_up: bool, retry_in_s: float) -> bool:
        """Log once per outage, and once more for each refusal first met in it (a broker back
        from a restart that now refuses our certificate); returns whether this failure starts
        an outage."""
        first = was_up or self._down_since is None
        cause = None if was_up else self.refused
        fields = {"error": str(exc), "retry_in_s": round(retry_in_s, 2),
                  "cause": "dropped" if was_up else str(cause or "path")}
        if first:
            self._down_since = time.monotonic()
            self._logged = {cause}
            self._log.warning("mqtt_disconnected", was_up=was_up, **fields)
        elif cause is not None and cause not in self._logged:
            self._logged.add(cause)
            self._log.warning("mqtt_refused", **fields)
        else:
            self._log.debug("mqtt_connect_failed", path_down=self._path_down, **fields)
        return first


def _first_error(group: BaseExceptionGroup[aiomqtt.MqttError]) -> aiomqtt.MqttError:
    exc = group.exceptions[0]
    return exc if isinstance(exc, aiomqtt.MqttError) else _first_error(exc)


async def _serve_apart(serve: Serve, client: Client, name: str) -> None:
    """`serve(client)` in a task of its own, until it ends; a cancel of the caller stops it
    (see the module's docstring)."""
    task = asyncio.create_task(serve(client), name=f"{name}.serve")
    try:
        await asyncio.wait((task,))
    except asyncio.CancelledError:
        await _stop_serving(task)
        raise
    task.result()


async def _stop_serving(task: asyncio.Task[None]) -> None:
    """Cancel `task` until it ends. What it ended with is dropped, as the session stops, but
    for an error other than the connection's, which is logged."""
    while not task.done():
        task.cancel()
        await asyncio.wait((task,), timeout=_STOP_AGAIN_S)
    if task.cancelled() or (exc := task.exception()) is None:
        return
    rest = exc.split(aiomqtt.MqttError)[1] if isinstance(exc, BaseExceptionGroup) else (
        None if isinstance(exc, aiomqtt.MqttError) else exc)
    if rest is not None:
        log.error("mqtt_serve_failed", task=task.get_name(), exc_info=exc)


__all__ = ["Client", "Endpoint", "MqttSession", "TlsFileError", "client_tls_context",
           "until_disconnected"]
