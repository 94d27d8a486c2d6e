"""The `[mqtt]` section of a gateway's config, its `[mqtt.tls]` table (DESIGN.md §8), and the
TLS context the uplink connects with.

`[mqtt.tls]` names three PEM files: `ca` (the CA the broker's certificate chains to),
`cert` (this gateway's certificate, CN = gateway id) and `key` (its private key, mode 0600).
`edge-agent enroll` writes them and this table. Relative paths are relative to the config
file. `edge-agent renew` replaces the certificate and key in place; `TlsFiles` gives the
uplink a context built from the files as they are at each connect, so the next connect after a
renewal shows the new certificate without a restart. `username`/`password` are for brokers
that authenticate by password (EMQX, ...); with Mosquitto and `use_identity_as_username` the
certificate is the identity.
"""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path
from typing import Annotated, ClassVar

import structlog
from msgspec import Meta

from edge_agent import EdgeError
from edge_agent.config.table import ConfigTable
from runtime.files import FileError
from runtime.mqtt import TlsFileError, client_tls_context

log = structlog.get_logger(__name__)

# What identifies a version of the TLS files: (inode, size, mtime) of each, None if missing.
# `edge-agent renew` writes by rename, so a renewal always changes the inode.
FilesStamp = tuple[tuple[int, int, int] | None, ...]


class MqttTlsError(EdgeError, FileError):
    """The CA, certificate or key cannot be loaded into a TLS context."""


class MqttTlsConfig(ConfigTable, frozen=True):
    ca: Path
    cert: Path | None = None
    key: Path | None = None
    # Off only for a broker reached by an address its certificate does not name (lab set-ups).
    check_hostname: bool = True

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together")

    def files(self) -> list[tuple[str, Path]]:
        return [(n, p) for n, p in (("ca", self.ca), ("cert", self.cert), ("key", self.key))
                if p is not None]


Seconds = Annotated[float, Meta(gt=0, le=3600)]


class MqttConfig(ConfigTable, frozen=True):
    _secret: ClassVar[frozenset[str]] = frozenset({"password"})

    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535)] = 1883
    ack_timeout_s: Annotated[float, Meta(gt=0)] = 10.0
    batch_size: Annotated[int, Meta(ge=1, le=10_000)] = 500
    # Backlog drains in bigger batches: per-message costs (a publish, a commit, an ack and
    # its bookkeeping on both sides) dominate at 500 records when a long outage ends.
    backlog_batch_size: Annotated[int, Meta(ge=1, le=50_000)] = 5000
    # Data messages awaiting central's ack; a quarter is kept for alarms and live data, the
    # rest bounds the backlog drain's window (which the ack round trip paces below it).
    max_inflight: Annotated[int, Meta(ge=1, le=1000)] = 16
    keepalive_s: Annotated[int, Meta(ge=5, le=3600)] = 30
    # Reconnect back-off: doubles from `reconnect_min_s` up to `reconnect_max_s`, jittered
    # (x0.5..1) so that a city of gateways does not reconnect in lockstep. That full back-off
    # is for a broker that answers and refuses (CONNACK refusal, TLS refusal); an attempt that
    # fails on the path (refused, reset, closed before CONNACK, timed out) is retried within
    # `reconnect_link_max_s`, which bounds how long after the link returns the gateway notices.
    # A metered link whose far end accepts and closes connections while the path is down may
    # raise it (each try costs a TCP handshake, and a TLS hello).
    reconnect_min_s: Annotated[float, Meta(gt=0, le=60)] = 0.5
    reconnect_max_s: Seconds = 10.0
    reconnect_link_max_s: Seconds = 1.0
    client_id: str | None = None
    tls: MqttTlsConfig | None = None
    username: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    password: Annotated[str, Meta(max_length=1024)] | None = None  # never in its repr

    def __post_init__(self) -> None:
        if self.password is not None and self.username is None:
            raise ValueError("password needs username")


def tls_context(tls: MqttTlsConfig) -> ssl.SSLContext:
    """The client context: the broker must chain to `ca` (and name the host, unless
    `check_hostname = false`); the gateway shows `cert`/`key`."""
    try:
        return client_tls_context(tls.ca, tls.cert, tls.key, check_hostname=tls.check_hostname)
    except TlsFileError as exc:
        raise MqttTlsError(exc.path, exc.reason) from exc


class TlsFiles:
    """The uplink's TLS context, built from `[mqtt.tls]`'s files as they are on disk.

    `context()` runs at every connect attempt: it stats the files and builds a new context only
    when one changed, so a renewed certificate is used from the next connect on. Files that
    changed and do not load (a renewal caught between writing the key and the certificate, a
    file removed) keep the last good context, with one WARNING per such state; they are
    loaded again when they change again. At construction the files must load (a config
    error: `MqttTlsError`)."""

    def __init__(self, tls: MqttTlsConfig) -> None:
        self.tls = tls
        self._stamp = self._stat()
        self._context = tls_context(tls)
        self._bad: FilesStamp | None = None
        self.reloads = 0

    def _stat(self) -> FilesStamp:
        def one(path: Path) -> tuple[int, int, int] | None:
            try:
                st = os.stat(path)
            except OSError:
                return None
            return st.st_ino, st.st_size, st.st_mtime_ns

        return tuple(one(path) for _, path in self.tls.files())

    def context(self) -> ssl.SSLContext:
        """The context for this connect attempt (see the class's docstring)."""
        stamp = self._stat()
        if stamp in (self._stamp, self._bad):
            return self._context
        try:
            context = tls_context(self.tls)
        except MqttTlsError as exc:
            self._bad = stamp
            log.warning("mqtt_tls_reload_failed", path=str(exc.path), error=exc.reason,
                        using="the previous certificate")
            return self._context
        self._context, self._stamp, self._bad = context, stamp, None
        self.reloads += 1
        log.info("mqtt_tls_reloaded", cert=str(self.tls.cert), reloads=self.reloads)
        return context


def loose_mode(path: Path) -> int | None:
    """The file's mode when group or others may read it (a key should be 0600), else None."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None
    return mode if mode & (stat.S_IRWXG | stat.S_IRWXO) else None
