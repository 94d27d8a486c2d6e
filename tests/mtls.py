"""Mutual TLS for tests (DESIGN.md §8): a certificate from central's CA, written as
`edge-agent enroll` and `renew` write it, and a private Mosquitto with the production config
that `central broker-config` writes (two mutual-TLS listeners, the CA's CRL)."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from central.identity.broker_config import write_broker_config
from central.identity.ca import (
    CertificateAuthority,
    new_key_and_csr,
    write_private,
    write_public,
)
from tests.helpers import Mosquitto, free_port


def issue(ca: CertificateAuthority, cn: str, cert: Path, key: Path) -> int:
    """A new key and certificate for `cn`, written over `key` and `cert` (key first, each by
    rename, as a renewal does); returns its serial."""
    key_pem, csr_pem = new_key_and_csr(cn)
    issued = ca.issue(cn, x509.load_pem_x509_csr(csr_pem).public_key(), days=1)  # type: ignore[arg-type]
    write_private(key, key_pem)
    write_public(cert, issued.public_bytes(serialization.Encoding.PEM))
    return issued.serial_number


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
    (folder / "mq").mkdir()
    broker = Mosquitto(folder / "mq", port=port)
    broker.conf = files.conf
    broker.start()
    return broker
