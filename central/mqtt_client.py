"""The MQTT client central's ingest and command dispatcher use: aiomqtt's, reading the
disconnection reason when it exits.

After an unexpected disconnection aiomqtt keeps the reason in a future that only its message
iterator or its next publish reads. A loop that is cancelled before either (shutdown while the
dispatcher sleeps, ingest stopping mid-write) would leave it unread, and asyncio would log
"Future exception was never retrieved". The loop's own error or the cancellation already says
what happened. (The edge has the same fix in `edge_agent.uplink.link`; central may not import it.)

`connect(settings, ...)` builds it as the settings say: TLS with central's own certificate
(`mqtt_tls_ca`, `mqtt_tls_cert`, `mqtt_tls_key`), username and password (DESIGN.md §8).
"""

from __future__ import annotations

import contextlib
import ssl
import stat
from pathlib import Path
from typing import Any

import aiomqtt
import structlog

from central import CentralError
from central.settings import Settings

log = structlog.get_logger(__name__)


class Client(aiomqtt.Client):
    async def __aexit__(self, *exc_info: Any) -> None:
        try:
            await super().__aexit__(*exc_info)
        finally:
            if self._disconnected.done() and not self._disconnected.cancelled():
                self._disconnected.exception()


class MqttTlsError(CentralError):
    """The configured CA, certificate or key cannot be loaded into a TLS context."""

    def __init__(self, path: Path | None, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """Central's TLS context from `mqtt_tls_*`, or None when TLS is off (`mqtt_tls_ca` unset).

    The broker's certificate must chain to `mqtt_tls_ca` and name `mqtt_host`; central shows
    `mqtt_tls_cert` (CN `_central`) so that the broker's ACLs know it.
    """
    s = settings
    if s.mqtt_tls_ca is None:
        return None
    ca = Path(s.mqtt_tls_ca).expanduser()
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise MqttTlsError(ca, f"cannot load the CA certificate: {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if s.mqtt_tls_cert is not None and s.mqtt_tls_key is not None:
        cert, key = Path(s.mqtt_tls_cert).expanduser(), Path(s.mqtt_tls_key).expanduser()
        with contextlib.suppress(OSError):
            if stat.S_IMODE(key.stat().st_mode) & 0o077:
                log.warning("mqtt_tls_key_permissions", path=str(key),
                            mode=oct(stat.S_IMODE(key.stat().st_mode)), hint="chmod 600")
        try:
            ctx.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as exc:
            raise MqttTlsError(cert, f"cannot load the certificate and key: {exc}") from exc
    return ctx


def connect(settings: Settings, *, identifier: str, clean_session: bool,
            will: aiomqtt.Will | None = None, tls: ssl.SSLContext | None = None) -> Client:
    """Central's MQTT client as the settings say (host, port, TLS, username and password)."""
    s = settings
    if tls is None:
        try:
            # Read at every (re)connect: a renewed certificate is picked up without a restart.
            tls = tls_context(s)
        except MqttTlsError as exc:
            # The callers' loops retry on MqttError with back-off; a certificate that went
            # missing or bad is logged there and retried, never a crashed loop.
            raise aiomqtt.MqttError(str(exc)) from exc
    return Client(s.mqtt_host, s.mqtt_port, identifier=identifier,
                  protocol=aiomqtt.ProtocolVersion.V311, clean_session=clean_session,
                  keepalive=s.mqtt_keepalive_s, timeout=10, will=will, tls_context=tls,
                  username=s.mqtt_username, password=s.mqtt_password)
