"""Central's certificate authority for gateway identities (DESIGN.md §8).

One folder (`Settings.pki_dir`, default `pki/` next to the SQLite file) holds:

| file | mode | what |
|---|---|---|
| `ca.key` | 0600 | the CA's EC P-256 private key; central will not start if others can read it |
| `ca.crt` | 0644 | the CA certificate: gateways and the broker trust it |
| `crl.pem` | 0644 | the revocation list the broker reads (`crlfile`), new at each revocation |

A gateway certificate's subject CN is its gateway id (the broker's `use_identity_as_username`
makes it the MQTT username its ACLs name). Keys are never made here for gateways: a gateway
makes its own and sends a CSR (`check_csr`). Creation of the CA is atomic (temporary file,
hard link), so two central workers starting together end up with one CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from central import CentralError, RefusedError
from protocols.errors import DetailedError
from runtime.files import FileError, write_atomic

log = structlog.get_logger(__name__)

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
CRL = "crl.pem"
CA_DAYS = 3650
CRL_DAYS = 400  # the broker refuses every client once the CRL's next update has passed
_BACKDATE = dt.timedelta(minutes=5)  # a gateway clock a little behind still accepts the cert
_EC_CURVES = (ec.SECP256R1, ec.SECP384R1)
_RSA_MIN_BITS = 2048


class PkiError(CentralError):
    """Base of the certificate authority's errors."""


class CaFileError(PkiError, FileError):
    """A CA file cannot be read, parsed or written."""


class CaKeyPermissionError(PkiError, DetailedError):
    """The CA key is readable by group or others: central refuses to use it."""

    template = "{path}: mode {mode:04o} lets others read the CA key; run: chmod 600 {path}"
    path: Path
    mode: int


class CsrError(PkiError, RefusedError):
    """A certificate signing request is malformed, badly signed or asks for the wrong name."""

    what = "CSR"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` with mode 0600 from the start, atomically (rename)."""
    write_atomic(path, data, 0o600, exclusive=False)


def write_public(path: Path, data: bytes) -> None:
    write_atomic(path, data, 0o644, exclusive=False)


def check_key_mode(path: Path) -> None:
    """Raise `CaKeyPermissionError` when group or others have any access to `path`."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise CaFileError(path, f"cannot read: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CaKeyPermissionError(path, mode)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Fieldlink"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def common_name(cert_or_csr: x509.Certificate | x509.CertificateSigningRequest) -> str | None:
    """The single CN of the subject, or None when there is none or more than one."""
    cns = cert_or_csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        return None
    value = cns[0].value
    return value if isinstance(value, str) else None


def check_public_key(key: object) -> None:
    """Only EC P-256/P-384 and RSA ≥ 2048: what Mosquitto and small gateways handle well."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _EC_CURVES):
            raise CsrError(f"EC curve {key.curve.name} not accepted (P-256 or P-384)")
        return
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _RSA_MIN_BITS:
            raise CsrError(f"RSA key of {key.key_size} bits is too short (at least 2048)")
        return
    raise CsrError(f"key type {type(key).__name__} not accepted (EC P-256/P-384 or RSA)")


def check_csr(csr_pem: str | bytes, cn: str) -> x509.CertificateSigningRequest:
    """Parse a PEM CSR and check its self-signature, that its only CN is `cn` and its key."""
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    try:
        csr = x509.load_pem_x509_csr(data)
        valid = csr.is_signature_valid
        got = common_name(csr)
        key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CsrError(f"not a usable PEM certificate request ({exc})") from exc
    if not valid:
        raise CsrError("its signature does not verify")
    if got != cn:
        raise CsrError(f"subject CN must be exactly the gateway id {cn!r}, not {got!r}")
    check_public_key(key)
    return csr


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


@dataclass(frozen=True, slots=True)
class Revoked:
    serial: int
    revoked_at: dt.datetime


@dataclass(frozen=True)
class CertificateAuthority:
    """The CA key and certificate loaded from `dir` (see the module doc)."""

    dir: Path
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def cert_path(self) -> Path:
        return self.dir / CA_CERT

    @property
    def crl_path(self) -> Path:
        return self.dir / CRL

    def issue(self, cn: str, public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey, *,
              days: float, server_names: Sequence[str] = (), client: bool = True,
              now: dt.datetime | None = None) -> x509.Certificate:
        """A leaf certificate for `cn` (client auth; server auth with `server_names`)."""
        check_public_key(public_key)
        now = now or utcnow()
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        b = (x509.CertificateBuilder()
             .subject_name(_name(cn)).issuer_name(self.cert.subject)
             .public_key(public_key).serial_number(x509.random_serial_number())
             .not_valid_before(now - _BACKDATE).not_valid_after(now + dt.timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(
                 digital_signature=True, key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                 key_agreement=False, content_commitment=False, data_encipherment=False,
                 key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False),
                 critical=True)
             .add_extension(x509.ExtendedKeyUsage(
                 ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
                 + ([ExtendedKeyUsageOID.SERVER_AUTH] if server_names else [])), critical=False)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                            critical=False))
        if server_names:
            b = b.add_extension(x509.SubjectAlternativeName(
                [_general_name(n) for n in server_names]), critical=False)
        return b.sign(self.key, hashes.SHA256())

    def verify_issued(self, cert: x509.Certificate) -> None:
        """Raise `PkiError` unless `cert` was signed by this CA."""
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
            raise PkiError("certificate was not issued by this CA") from exc

    def crl_pem(self, revoked: Iterable[Revoked], *, now: dt.datetime | None = None) -> bytes:
        now = now or utcnow()
        b = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
             .last_update(now - _BACKDATE).next_update(now + dt.timedelta(days=CRL_DAYS)))
        for r in revoked:
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(r.serial)
                .revocation_date(r.revoked_at).build())
        return b.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def write_crl(self, revoked: Iterable[Revoked]) -> Path:
        """Write `crl.pem` atomically (the broker may be reading the old one)."""
        try:
            write_public(self.crl_path, self.crl_pem(revoked))
        except OSError as exc:
            raise CaFileError(self.crl_path, f"cannot write: {exc.strerror}") from exc
        return self.crl_path


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def load_ca(directory: Path) -> CertificateAuthority:
    """The CA in `directory`; `CaFileError` when absent, `CaKeyPermissionError` when loose."""
    directory = Path(directory)
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    check_key_mode(key_path)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as exc:
        raise CaFileError(key_path, f"cannot read: {exc.strerror}") from exc
    except (ValueError, TypeError) as exc:
        raise CaFileError(key_path, f"not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CaFileError(key_path, f"not an EC key: {type(key).__name__}")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except OSError as exc:
        raise CaFileError(cert_path, f"cannot read: {exc.strerror}") from exc
    except ValueError as exc:
        raise CaFileError(cert_path, f"not a PEM certificate: {exc}") from exc
    if cert.public_key() != key.public_key():
        raise CaFileError(cert_path, f"does not belong to {key_path}")
    return CertificateAuthority(directory, key, cert)


def load_or_create_ca(directory: Path, *, name: str = "Fieldlink CA") -> CertificateAuthority:
    """The CA in `directory`, made on first use (key 0600) with an empty CRL."""
    directory = Path(directory)
    if not (directory / CA_KEY).exists():
        _create(directory, name)
    return load_ca(directory)


def _create(directory: Path, name: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = utcnow()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(_name(name)).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE).not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, key_encipherment=False, key_agreement=False,
                content_commitment=False, data_encipherment=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    try:
        directory.mkdir(parents=True, exist_ok=True)  # the broker reads crl.pem here
        if not write_atomic(directory / CA_KEY, pem_key, 0o600, exclusive=True):
            return  # another worker made it first: keep theirs (and its certificate)
        write_public(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
    except OSError as exc:
        raise CaFileError(directory, f"cannot create the CA: {exc.strerror}") from exc
    ca = CertificateAuthority(directory, key, cert)
    ca.write_crl(())
    log.info("ca_created", dir=str(directory), subject=name)


def new_key_and_csr(cn: str) -> tuple[bytes, bytes]:
    """A fresh EC P-256 key (PEM) and a CSR for `cn` (PEM), e.g. for central's own cert."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(_name(cn))
           .sign(key, hashes.SHA256()))
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            csr.public_bytes(serialization.Encoding.PEM))


__all__ = ["CA_CERT", "CA_KEY", "CRL", "CaFileError", "CaKeyPermissionError",
           "CertificateAuthority", "CsrError", "PkiError", "Revoked", "check_csr",
           "check_key_mode", "common_name", "fingerprint", "load_ca", "load_or_create_ca",
           "new_key_and_csr", "write_private", "write_public"]
