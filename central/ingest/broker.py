"""How central reaches the broker: its MQTT endpoint as the settings say (DESIGN.md §8).

TLS with central's own certificate (`mqtt_tls_ca`, `mqtt_tls_cert`, `mqtt_tls_key`), username
and password; the session itself (reconnect, back-off, logging) is `runtime.mqtt.MqttSession`.
Used by the ingest worker and the command dispatcher, each with its own client id.
"""

from __future__ import annotations

import contextlib
import ssl
import stat
from pathlib import Path

import aiomqtt
import structlog

from central import CentralError
from central.config.settings import Settings
from runtime.mqtt import Endpoint, TlsFileError, client_tls_context

log = structlog.get_logger(__name__)


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
    cert = key = None
    if s.mqtt_tls_cert is not None and s.mqtt_tls_key is not None:
        cert, key = Path(s.mqtt_tls_cert).expanduser(), Path(s.mqtt_tls_key).expanduser()
        with contextlib.suppress(OSError):
            if stat.S_IMODE(key.stat().st_mode) & 0o077:
                log.warning("mqtt_tls_key_permissions", path=str(key),
                            mode=oct(stat.S_IMODE(key.stat().st_mode)), hint="chmod 600")
    try:
        return client_tls_context(Path(s.mqtt_tls_ca).expanduser(), cert, key)
    except TlsFileError as exc:
        raise MqttTlsError(exc.path, exc.reason) from exc


def endpoint(settings: Settings, *, client_id: str, clean_session: bool) -> Endpoint:
    """Central's broker as the settings say (host, port, TLS, username and password)."""
    s = settings

    def tls() -> ssl.SSLContext | None:
        # Read at every (re)connect: a renewed certificate is picked up without a restart.
        try:
            return tls_context(s)
        except MqttTlsError as exc:
            # A failed attempt: the session logs it and retries with back-off, never a
            # crashed loop.
            raise aiomqtt.MqttError(str(exc)) from exc

    return Endpoint(s.mqtt_host, s.mqtt_port, client_id=client_id, clean_session=clean_session,
                    keepalive_s=s.mqtt_keepalive_s, timeout_s=10.0, username=s.mqtt_username,
                    password=s.mqtt_password, tls=tls)
