"""Gateway enrolment, renewal and revocation (DESIGN.md §8): the service behind the CLI and
`POST /api/gateways/enroll|renew`.

- `issue_token(gw, ttl_s)`: a one-time token (shown once; only its hash is stored).
- `enrol(gw, token, csr_pem)`: the CSR must name the gateway as its only CN and carry an
  EC P-256/P-384 or RSA ≥ 2048 key; the token must be unused, unexpired and for `gw`. Returns
  the certificate, the CA certificate and central's Ed25519 command key (the gateway pins it).
- `renew(gw, cert_pem, csr_pem, signature)`: no token; the current certificate (issued here,
  CN = gw, not expired, not revoked) and a signature by its key over
  `renewal_message(gw, csr_pem)` prove the caller holds it. A replay gains nothing: the new
  certificate is for the key in the CSR.
- `revoke(gw)`: every live certificate of the gateway goes into the CRL (`crl.pem`), unused
  tokens are voided. The broker reads the CRL when it starts (and on reload where it
  supports that): see README "Production set-up".

Audit: each of these calls `audit(IdentityEvent)` once — the single call point the audit log
is wired to (a no-op by default).
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from central import RefusedError
from central.identity.ca import (
    CertificateAuthority,
    PkiError,
    Revoked,
    check_csr,
    common_name,
    fingerprint,
    utcnow,
)
from central.identity.enrolment_store import (
    CertRecord,
    EnrolmentStore,
    TokenRefusedError,
    token_hash,
)
from protocols.topics import TopicError, check_gateway_id
from runtime import clock

log = structlog.get_logger(__name__)

DEFAULT_TOKEN_TTL_S = 86_400.0
DEFAULT_CERT_DAYS = 365.0


class RenewalRefusedError(PkiError, RefusedError):
    """The renewal request does not prove a live certificate of this gateway."""

    what = "renewal"


class BadGatewayIdError(PkiError):
    def __init__(self, gw: str, reason: str) -> None:
        super().__init__(f"gateway id {gw!r}: {reason}")
        self.gw = gw


@dataclass(frozen=True, slots=True)
class IdentityEvent:
    """What the audit log records: `action` is one of enrol_token_issued, enrolled,
    enrol_refused, renewed, renew_refused, revoked."""

    action: str
    gw: str
    detail: Mapping[str, Any] = field(default_factory=dict)


AuditHook = Callable[[IdentityEvent], Awaitable[None] | None]


def no_audit(event: IdentityEvent) -> None:
    """The default `audit`: nothing (the lead wires the audit log here)."""


@dataclass(frozen=True, slots=True)
class IssuedToken:
    gw: str
    token: str
    expires_ms: int


@dataclass(frozen=True, slots=True)
class Issued:
    gw: str
    certificate_pem: str
    ca_pem: str
    central_public_key: str  # base64 of the raw Ed25519 key, as [commands] central_public_key
    serial: str
    not_after_ms: int


@dataclass(frozen=True, slots=True)
class Revocation:
    gw: str
    serials: tuple[str, ...]
    tokens_voided: int
    crl_path: Path


def renewal_message(gw: str, csr_pem: str) -> bytes:
    """The bytes a renewing gateway signs with its current key."""
    return b"fieldlink-renew\n" + gw.encode() + b"\n" + csr_pem.strip().encode()


def sign_renewal(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, gw: str,
                 csr_pem: str) -> str:
    """Base64 signature of `renewal_message` (what the edge sends; also for tests)."""
    msg = renewal_message(gw, csr_pem)
    if isinstance(key, rsa.RSAPrivateKey):
        sig = key.sign(msg, padding.PKCS1v15(), hashes.SHA256())
    else:
        sig = key.sign(msg, ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(sig).decode()


def _ms(t: Any) -> int:
    return int(t.timestamp() * 1000)


@dataclass(kw_only=True, eq=False)
class Enrolment:
    """Issues and revokes gateway certificates with `ca`, recorded in `store`."""

    ca: CertificateAuthority
    store: EnrolmentStore
    central_public_key: str
    cert_days: float = DEFAULT_CERT_DAYS
    token_ttl_s: float = DEFAULT_TOKEN_TTL_S
    audit: AuditHook = no_audit

    async def _audit(self, action: str, gw: str, **detail: Any) -> None:
        try:
            result = self.audit(IdentityEvent(action, gw, detail))
            if inspect.isawaitable(result):
                await result
        except Exception:  # the audit sink's own failure must not undo the action
            log.exception("identity_audit_failed", action=action, gw=gw)

    @staticmethod
    def _gateway(gw: str) -> str:
        try:
            return check_gateway_id(gw)
        except TopicError as exc:
            raise BadGatewayIdError(gw, exc.reason) from exc

    async def issue_token(self, gw: str, ttl_s: float | None = None) -> IssuedToken:
        self._gateway(gw)
        ttl = self.token_ttl_s if ttl_s is None else ttl_s
        if ttl <= 0:
            raise PkiError("token lifetime must be positive")
        token = secrets.token_urlsafe(32)
        expires = clock.now_ms() + int(ttl * 1000)
        await self.store.add_token(token_hash(token), gw, expires)
        log.info("enrol_token_issued", gw=gw, expires_ms=expires)
        await self._audit("enrol_token_issued", gw, expires_ms=expires)
        return IssuedToken(gw, token, expires)

    def _issue(self, gw: str, csr: x509.CertificateSigningRequest,
               how: str) -> tuple[x509.Certificate, CertRecord]:
        key = csr.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)  # check_csr did
        cert = self.ca.issue(gw, key, days=self.cert_days)
        rec = CertRecord(serial=format(cert.serial_number, "x"), gw=gw,
                         fingerprint=fingerprint(cert),
                         not_before_ms=_ms(cert.not_valid_before_utc),
                         not_after_ms=_ms(cert.not_valid_after_utc),
                         issued_ms=clock.now_ms(), how=how)
        return cert, rec

    def _issued(self, gw: str, cert: x509.Certificate, rec: CertRecord) -> Issued:
        return Issued(gw=gw, certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
                      ca_pem=self.ca.cert_pem, central_public_key=self.central_public_key,
                      serial=rec.serial, not_after_ms=rec.not_after_ms)

    async def enrol(self, gw: str, token: str, csr_pem: str) -> Issued:
        """Check the CSR and the token, issue the certificate; one token, one certificate."""
        self._gateway(gw)
        try:
            csr = check_csr(csr_pem, gw)
            cert, rec = await asyncio.to_thread(self._issue, gw, csr, "enrol")
            await self.store.enrol(token_hash(token), gw, rec, now_ms=clock.now_ms())
        except PkiError as exc:
            await self._refused("enrol_refused", gw, exc)
            raise
        except TokenRefusedError as exc:
            await self._refused("enrol_refused", gw, exc, reason=exc.reason)
            raise
        log.info("gateway_enrolled", gw=gw, serial=rec.serial, not_after_ms=rec.not_after_ms)
        await self._audit("enrolled", gw, serial=rec.serial, fingerprint=rec.fingerprint,
                          not_after_ms=rec.not_after_ms)
        return self._issued(gw, cert, rec)

    async def _refused(self, action: str, gw: str, exc: Exception,
                       reason: str | None = None) -> None:
        log.warning(action, gw=gw, error=str(exc))
        await self._audit(action, gw, error=str(exc), **({"reason": reason} if reason else {}))

    async def renew(self, gw: str, cert_pem: str, csr_pem: str, signature: str) -> Issued:
        """A new certificate for the key in `csr_pem`, proven by the current one."""
        self._gateway(gw)
        try:
            old = await self._check_current(gw, cert_pem)
            csr = check_csr(csr_pem, gw)
            _verify(old.public_key(), signature, renewal_message(gw, csr_pem))
            cert, rec = await asyncio.to_thread(self._issue, gw, csr, "renew")
            await self.store.add_cert(rec)
        except PkiError as exc:
            await self._refused("renew_refused", gw, exc)
            raise
        log.info("gateway_renewed", gw=gw, serial=rec.serial,
                 previous=format(old.serial_number, "x"))
        await self._audit("renewed", gw, serial=rec.serial, fingerprint=rec.fingerprint,
                          previous=format(old.serial_number, "x"), not_after_ms=rec.not_after_ms)
        return self._issued(gw, cert, rec)

    async def _check_current(self, gw: str, cert_pem: str) -> x509.Certificate:
        try:
            old = x509.load_pem_x509_certificate(cert_pem.encode())
            old.public_key()
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise RenewalRefusedError("the current certificate is not a usable PEM") from exc
        self.ca.verify_issued(old)
        if common_name(old) != gw:
            raise RenewalRefusedError(f"the certificate is not {gw!r}'s")
        rec = await self.store.cert(format(old.serial_number, "x"))
        if rec is None:
            raise RenewalRefusedError("the certificate is unknown to this central")
        if rec.revoked_ms is not None:
            raise RenewalRefusedError("the certificate is revoked")
        if old.not_valid_after_utc <= utcnow():
            raise RenewalRefusedError("the certificate has expired: enrol again with a token")
        return old

    async def revoke(self, gw: str) -> Revocation:
        self._gateway(gw)
        serials, voided = await self.store.revoke(gw, now_ms=clock.now_ms())
        crl = await self.write_crl()
        log.warning("gateway_revoked", gw=gw, serials=serials, tokens_voided=voided)
        await self._audit("revoked", gw, serials=serials, tokens_voided=voided)
        return Revocation(gw, tuple(serials), voided, crl)

    async def write_crl(self) -> Path:
        """Rewrite `crl.pem` from the database (also at start: it must not run out)."""
        from datetime import UTC, datetime

        rows = await self.store.revoked(now_ms=clock.now_ms())
        revoked = [Revoked(int(r.serial, 16), datetime.fromtimestamp(
            (r.revoked_ms or 0) / 1000, UTC)) for r in rows]
        return await asyncio.to_thread(self.ca.write_crl, revoked)


def _verify(key: Any, signature: str, message: bytes) -> None:
    try:
        sig = base64.b64decode(signature, validate=True)
    except ValueError as exc:
        raise RenewalRefusedError("the signature is not base64") from exc
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(sig, message, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(sig, message, ec.ECDSA(hashes.SHA256()))
        else:
            raise RenewalRefusedError(f"unsupported key {type(key).__name__}")
    except InvalidSignature as exc:
        raise RenewalRefusedError("the signature does not verify with the current "
                                  "certificate's key") from exc
