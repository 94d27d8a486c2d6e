"""A renewed gateway certificate is used without a restart (DESIGN.md §8): the uplink builds
its TLS context from the files on disk at each connect, on a real Mosquitto with the production
mutual-TLS config and CRL."""

from __future__ import annotations

import contextlib
import datetime as dt
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog

from central.identity.ca import (
    CertificateAuthority,
    Revoked,
    load_or_create_ca,
    write_private,
)
from edge_agent.outbox.store import Outbox
from edge_agent.uplink.link import Uplink
from edge_agent.uplink.mqtt_config import MqttConfig, MqttTlsConfig, TlsFiles
from tests.helpers import Mosquitto, until
from tests.mtls import can_connect, issue, start_broker
from tests.uplinks import running_uplink

GW = "gw-renew"


@dataclass
class Pki:
    ca: CertificateAuthority
    broker: Mosquitto
    cert: Path
    key: Path

    def issue(self) -> int:
        """A new key and certificate for GW, written over the old ones as `edge-agent renew`
        does; returns its serial."""
        return issue(self.ca, GW, self.cert, self.key)

    def tls(self) -> MqttTlsConfig:
        return MqttTlsConfig(ca=self.ca.cert_path, cert=self.cert, key=self.key)


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[Pki]:
    ca = load_or_create_ca(tmp_path / "pki")
    ca.write_crl([])
    broker = start_broker(ca, tmp_path)
    gw_dir = tmp_path / "gw"
    gw_dir.mkdir()
    try:
        yield Pki(ca, broker, gw_dir / "gateway.crt", gw_dir / "gateway.key")
    finally:
        broker.stop()


@contextlib.asynccontextmanager
async def uplink(ob: Outbox, pki: Pki) -> AsyncIterator[Uplink]:
    mqtt = MqttConfig(host="127.0.0.1", port=pki.broker.port, tls=pki.tls(),
                      reconnect_min_s=0.2, reconnect_max_s=0.5)
    async with running_uplink(GW, ob, mqtt) as up:
        yield up


async def test_reconnect_after_renewal_uses_the_new_certificate(pki: Pki, tmp_path: Path) -> None:
    """Connected with certificate A; B is written in its place and A revoked; after a broker
    restart the same uplink comes back with B, without a restart of its own."""
    first = pki.issue()
    async with Outbox.open(tmp_path / "outbox.db") as ob, uplink(ob, pki) as up:
        await until(lambda: up.connected, "connected with A")
        old_cert, old_key = tmp_path / "a.crt", tmp_path / "a.key"
        old_cert.write_bytes(pki.cert.read_bytes())
        old_key.write_bytes(pki.key.read_bytes())
        pki.issue()
        pki.ca.write_crl([Revoked(first, dt.datetime.now(dt.UTC))])
        pki.broker.stop()  # a restart re-reads the CRL and ends A's session
        pki.broker.start()
        # A is no good any more.
        assert not await can_connect(pki.broker.port, pki.ca.cert_path, old_cert, old_key)
        await until(lambda: up.connected and up.counters.connects == 2,
                    "reconnected with the renewed certificate", timeout=15)
        assert up.tls is not None and up.tls.reloads == 1


def test_files_that_do_not_load_keep_the_last_good_context(pki: Pki) -> None:
    """A key file that no longer loads (a renewal caught half-way) keeps the context in use,
    warns once, and loads again when the files change again."""
    pki.issue()
    files = TlsFiles(pki.tls())
    good = files.context()
    assert files.context() is good  # unchanged files: no rebuild
    write_private(pki.key, b"not a key")
    with structlog.testing.capture_logs() as logs:
        assert files.context() is good
        assert files.context() is good
    assert [e["event"] for e in logs] == ["mqtt_tls_reload_failed"]
    pki.issue()
    renewed = files.context()
    assert renewed is not good and isinstance(renewed, ssl.SSLContext)
    assert files.reloads == 1
