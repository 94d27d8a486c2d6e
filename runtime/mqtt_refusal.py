"""What a failed MQTT connect attempt was: the path (no broker answered) or a refusal by a
broker that answered, and which refusal (`Refusal`): a CONNACK refusal, our certificate, or
another TLS refusal. `runtime.mqtt.MqttSession` backs off and counts by it.

A broker that refuses our certificate (a gateway's or central's: revoked by the CRL, from a CA
it does not trust, missing) answers with a TLS alert. Under TLS 1.2 the alert ends the client's
handshake, so the connect itself fails with the `ssl.SSLError`. Under TLS 1.3 the client's
handshake is over before the server has checked the client's certificate (RFC 8446 §4.4: the
client's Certificate, CertificateVerify and Finished are its last flight; the server answers a
bad one with an alert, §6.2), so the alert arrives on the first read, after the CONNECT went
out. paho catches that `ssl.SSLError`, logs it ("failed to receive on socket: %s", the error
itself as the argument), closes the socket and reports a disconnection, which aiomqtt 2.5
drops because no CONNACK had come; the attempt would only end at its CONNACK timeout, looking
like a path that closed before CONNACK, and be retried within a second for ever.

The only public place that error passes is the logger aiomqtt takes (`logger=`, which it hands
to paho's `enable_logger`). So each attempt gets its own `AlertCatcher`, a
`logging.LoggerAdapter` in front of the client logger: it looks at the arguments of every line
(not at the text, which paho may reword; and whatever the log level) for an `ssl.SSLError`
and hands the first one to the attempt, which then fails at once: with
`CertificateRefusedError` for an alert about our certificate (`TlsRefusedError` for another).
Rejected: aiomqtt's private `_client` and `_disconnected` (STYLE.md §14);
`SSLContext.sslsocket_class`, public but set on the caller's context, which is shared by
attempts and sessions and would change every socket it wraps; a probe handshake of our own
before each attempt (`edge-agent doctor`'s way: twice the handshakes on a metered link, and
the probe's verdict is not the attempt's).

The alert is not always read. A client that sends its CONNECT at once after the handshake
often reads an EOF instead (about half of a raw client's attempts on Mosquitto 2.0 with
OpenSSL 3; never when it sends nothing): most likely the broker closes with our CONNECT unread,
so its kernel resets the connection. paho writes its CONNECT a little later and meets it
rarely. Such an attempt fails at once too, as `TlsClosedError`: right after a refusal the
session takes it for the same refusal again (the same broker closing right after our
handshake), so a revoked gateway's state and back-off do not flap; on its own it stays a path
failure, since a cut link can end a TLS session the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import ssl
from typing import Any

import aiomqtt

from protocols.errors import DetailedError

# A TLS handshake or read that failed because the connection was cut, not because a side
# refused.
TLS_CUT = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)
# The alerts a server sends about the client's certificate (RFC 8446 §6.2; OpenSSL names them
# SSLV3_ALERT_*, TLSV1_ALERT_* or TLSV13_ALERT_*).
_CERTIFICATE_ALERTS = ("_CERTIFICATE_REQUIRED", "_CERTIFICATE_REVOKED", "_CERTIFICATE_UNKNOWN",
                       "_CERTIFICATE_EXPIRED", "_BAD_CERTIFICATE", "_UNSUPPORTED_CERTIFICATE",
                       "_UNKNOWN_CA")


class Refusal(enum.StrEnum):
    """Why a broker that answered refused an attempt."""

    CONNACK = "connack"  # a CONNACK refusal: credentials, not authorised, server unavailable
    CERTIFICATE = "certificate"  # a TLS alert about our certificate: revoked, untrusted, missing
    TLS = "tls"  # another TLS refusal (or the broker's certificate failed our check)


class TlsRefusedError(aiomqtt.MqttError, DetailedError):
    """The broker ended the TLS session with an alert: `alert` is OpenSSL's name for it."""

    template = "the broker refused the TLS session: {alert}"
    alert: str


class TlsClosedError(aiomqtt.MqttError, DetailedError):
    """The broker closed the TLS session after our handshake and before CONNACK, without an
    alert: `reason` is what the read said. On its own it is a path failure; right after a
    refusal it is that refusal again (see the module's docstring)."""

    template = "the broker closed the TLS session before CONNACK: {reason}"
    reason: str


class CertificateRefusedError(TlsRefusedError):
    """The broker refused our certificate (a CRL that revokes it, a CA it does not trust,
    none shown): waiting does not help, a new certificate does."""

    template = "the broker refused our certificate (revoked or untrusted): {alert}"


def alert_error(exc: ssl.SSLError) -> TlsRefusedError | None:
    """The refusal an alert from the broker means; None for a cut connection, and for a TLS
    error that is no alert (the broker's certificate failing our own check)."""
    reason = getattr(exc, "reason", None) or ""  # OpenSSL's errors have it; others may not
    if isinstance(exc, TLS_CUT) or "_ALERT_" not in reason:
        return None
    if reason.endswith(_CERTIFICATE_ALERTS):
        return CertificateRefusedError(reason)
    return TlsRefusedError(reason)


def refusal_of(exc: aiomqtt.MqttError) -> Refusal | None:
    """The refusal a failed attempt met, or None when it failed on the path. aiomqtt raises a
    CONNACK refusal as `MqttCodeError`, and a failed connect as `MqttError(str(os_error)) from
    None`, which keeps the OSError as the context: a handshake that a side refused is an
    `SSLError` other than a cut connection's."""
    if isinstance(exc, CertificateRefusedError):
        return Refusal.CERTIFICATE
    if isinstance(exc, TlsRefusedError):
        return Refusal.TLS
    if isinstance(exc, aiomqtt.MqttCodeError):
        return Refusal.CONNACK
    cause = exc.__context__
    return Refusal.TLS if isinstance(cause, ssl.SSLError) and not isinstance(
        cause, TLS_CUT) else None


class AlertCatcher(logging.LoggerAdapter[logging.Logger]):
    """One attempt's client logger (see the module's docstring): every line goes on to
    `logger` as it came; the first TLS error among a line's arguments resolves `heard`, as a
    refusal or as a session closed without an alert (paho logs from aiomqtt's executor thread
    as well as from the loop's). Only while an attempt waits for its CONNACK: once connected,
    paho logs every packet through here, and nobody waits for `heard`."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger)
        self._loop = asyncio.get_running_loop()
        self.heard: asyncio.Future[aiomqtt.MqttError] = self._loop.create_future()
        self.listening = True

    def listen(self) -> asyncio.Future[aiomqtt.MqttError]:
        """A fresh `heard` for the next attempt (a client may connect again)."""
        self.heard = self._loop.create_future()
        self.listening = True
        return self.heard

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        for arg in args if self.listening else ():
            if isinstance(arg, ssl.SSLError):
                error = alert_error(arg) or TlsClosedError(str(arg))
                # paho's thread may log after the loop has closed (at shutdown): nobody waits.
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._hear, self.heard, error)
                break
        super().log(level, msg, *args, **kwargs)

    @staticmethod
    def _hear(heard: asyncio.Future[aiomqtt.MqttError], error: aiomqtt.MqttError) -> None:
        if not heard.done():
            heard.set_result(error)


__all__ = ["AlertCatcher", "CertificateRefusedError", "Refusal", "TlsClosedError",
           "TlsRefusedError", "alert_error", "refusal_of"]
