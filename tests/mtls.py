"""Mutual TLS for tests (DESIGN.md §8): a certificate from central's CA, written as
`edge-agent enroll` and `renew` write it, and a private Mosquitto with the production config
that `central broker-config` writes (two mutual-TLS listeners, the CA's CRL), and a probe of
whether it lets a certificate in."""

from __future__ import annotations

import os
import time
from pathlib import Path

import aiomqtt
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from central.identity.broker_config import write_broker_config
from central.identity.ca import (
    CertificateAuthority,
    new_key_and_csr,
    write_private,
    write_public,
)
from runtime.mqtt import Client, client_tls_context
from tests.helpers import Mosquitto, free_port


def issue(ca: CertificateAuthority, cn: str, cert: Path, key: Path) -> int:
    """A new key and certificate for `cn`, written over `key` and `cert` (key first, each by
    rename, as a renewal does); returns its serial."""
    key_pem, csr_pem = new_key_and_csr(cn)
    issued = ca.issue(cn, x509.load_pem_x509_csr(csr_pem).public_key(), days=1)  # type: ignore[arg-type]
    write_private(key, key_pem)
    write_public(cert, issued.public_bytes(serialization.Encoding.PEM))
    return issued.serial_number


async def can_connect(port: int, ca: Path, cert: Path | None, key: Path | None) -> bool:
    """Whether the broker on `port` lets this certificate in (none: `cert` None): an MQTT
    session up to its CONNACK, not just TCP or the TLS handshake (under TLS 1.3 a refused
    certificate is told after it)."""
    ctx = client_tls_context(ca, cert, key)
    try:
        async with Client("127.0.0.1", port, identifier=f"probe-{time.monotonic_ns()}",
                          tls_context=ctx, timeout=5, connect_timeout=5):
            return True
    except aiomqtt.MqttError:
        return False


def start_broker(ca: CertificateAuthority, folder: Path, tls_version: str | None = None
                 ) -> Mosquitto:
    """The production broker for `ca` (its CRL must exist), started; with `tls_version`
    (Mosquitto's minimum, e.g. "tlsv1.3") on both listeners."""
    port = free_port()
    files = write_broker_config(ca, folder / "broker", hosts=["127.0.0.1"], port=port,
                                bind="127.0.0.1", central_port=free_port(),
                                user="root" if os.geteuid() == 0 else None)
    if tls_version is not None:
        conf = files.conf.read_text()
        held = conf.replace("require_certificate true\n",
                            f"require_certificate true\ntls_version {tls_version}\n")
        assert held != conf, "the broker config has no `require_certificate true` line to hold"
        files.conf.write_text(held)
    broker = Mosquitto(folder / "mq", port=port, conf=files.conf)
    broker.start()
    return broker
