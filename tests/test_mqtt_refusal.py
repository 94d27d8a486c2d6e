"""runtime.mqtt_refusal and the session's count: which failed attempt is a refusal (and of
what) and which a path failure, as a table of the errors paho and aiomqtt raise. The real
broker cases are in test_tls_refusal.py; these pin every alert name and the rule for a
session closed without an alert."""

from __future__ import annotations

import ssl

import aiomqtt
import pytest

from runtime.mqtt import Endpoint, MqttSession
from runtime.mqtt_refusal import (
    CertificateRefusedError,
    Refusal,
    TlsClosedError,
    TlsRefusedError,
    alert_error,
    refusal_of,
)


def _ssl_error(reason: str, cls: type[ssl.SSLError] = ssl.SSLError) -> ssl.SSLError:
    exc = cls(1, f"[SSL: {reason}] ({reason.lower()})")
    exc.reason = reason
    return exc


@pytest.mark.parametrize("reason", [
    "TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_CERTIFICATE_REVOKED",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    "TLSV1_ALERT_UNKNOWN_CA"])
def test_an_alert_about_our_certificate_is_a_certificate_refusal(reason: str) -> None:
    error = alert_error(_ssl_error(reason))
    assert isinstance(error, CertificateRefusedError) and error.alert == reason
    assert refusal_of(error) is Refusal.CERTIFICATE


@pytest.mark.parametrize("exc, want", [
    (_ssl_error("SSLV3_ALERT_HANDSHAKE_FAILURE"), TlsRefusedError),  # another alert
    (_ssl_error("TLSV1_ALERT_PROTOCOL_VERSION"), TlsRefusedError),
    (_ssl_error("CERTIFICATE_VERIFY_FAILED"), None),  # our check of the broker: no alert
    (_ssl_error("UNEXPECTED_EOF_WHILE_READING", ssl.SSLEOFError), None),  # a cut
    (ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed"), None),
])
def test_other_tls_errors(exc: ssl.SSLError, want: type | None) -> None:
    error = alert_error(exc)
    assert (type(error) if error is not None else None) is want


def _failed_from(context: BaseException) -> aiomqtt.MqttError:
    """As aiomqtt raises a failed connect: `MqttError(str(exc)) from None`, the OSError kept
    as the context."""
    try:
        try:
            raise context
        except BaseException as exc:
            raise aiomqtt.MqttError(str(exc)) from None
    except aiomqtt.MqttError as failed:
        return failed


@pytest.mark.parametrize("failed, want", [
    (TlsRefusedError("SSLV3_ALERT_HANDSHAKE_FAILURE"), Refusal.TLS),
    (aiomqtt.MqttCodeError(5, "Not authorized"), Refusal.CONNACK),
    (_failed_from(_ssl_error("CERTIFICATE_VERIFY_FAILED")), Refusal.TLS),
    (_failed_from(ssl.SSLEOFError(8, "EOF occurred in violation of protocol")), None),
    (_failed_from(ConnectionRefusedError(111, "Connection refused")), None),
    (TlsClosedError("EOF"), None),
    (aiomqtt.MqttError("no CONNACK within 5 s"), None),
])
def test_refusal_of_a_failed_attempt(failed: aiomqtt.MqttError, want: Refusal | None) -> None:
    assert refusal_of(failed) is want


def test_a_session_closed_without_an_alert_is_a_path_failure_unless_a_refusal_came_first(
        ) -> None:
    session = MqttSession(Endpoint("127.0.0.1", 1, client_id="t"), name="t")
    session._classify(TlsClosedError("EOF"))
    assert (session.path_failures, session.refusals, session.refused) == (1, {}, None)
    revoked = CertificateRefusedError("SSLV3_ALERT_CERTIFICATE_REVOKED")
    session._classify(revoked)
    session._classify(TlsClosedError("EOF"))  # the alert lost: the refusal again
    assert session.refusals == {Refusal.CERTIFICATE: 2} and session.path_failures == 1
    assert session.refused is Refusal.CERTIFICATE and session.refusal is revoked
    session._classify(_failed_from(ConnectionRefusedError(111, "Connection refused")))
    assert session.refused is None and session.path_failures == 2


def test_a_connect_clears_the_refusal_before_it() -> None:
    """Connected after a refusal: no refusal stands while connected, and a session closed
    without an alert afterwards is a path failure, not that refusal again."""
    session = MqttSession(Endpoint("127.0.0.1", 1, client_id="t"), name="t")
    session._classify(CertificateRefusedError("SSLV3_ALERT_CERTIFICATE_REVOKED"))
    session._connected()
    assert (session.refused, session.refusal) == (None, None)
    session._classify(TlsClosedError("EOF"))
    assert session.refused is None and session.path_failures == 1
    assert session.refusals == {Refusal.CERTIFICATE: 1}
