"""Enrolment tokens and issued gateway certificates, in central's database (DESIGN.md §8).

Two tables beside the main storage, with their own migration list and version table
(`identity_schema_version`), on SQLite or PostgreSQL (`central.storage.side_store`):

- `gateway_enrol_tokens`: only the SHA-256 of each token (a token is 32 random bytes, so a
  plain hash is enough: nothing to guess), for which gateway, until when, and when it was used.
  A token is consumed in the same transaction that records the certificate it paid for.
- `gateway_certs`: every certificate issued, by serial (hex: serials exceed BIGINT), with its
  validity, how it came (`enrol` / `renew`) and when it was revoked.

Blocking driver calls run on the store's one thread (`SideStore`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from central import CentralError
from central.storage.side_store import Migration, SideStore
from runtime import clock

log = structlog.get_logger(__name__)


class EnrolmentStoreError(CentralError):
    """The identity tables cannot be read or written; wraps the driver error."""


class TokenRefusedError(EnrolmentStoreError):
    """An enrolment token is unknown, used, expired or for another gateway."""

    def __init__(self, reason: Literal["unknown", "used", "expired", "wrong_gateway"]) -> None:
        super().__init__(f"enrolment token refused: {reason.replace('_', ' ')}")
        self.reason = reason


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class TokenInfo:
    gw: str
    created_ms: int
    expires_ms: int
    used_ms: int | None


@dataclass(frozen=True, slots=True)
class CertRecord:
    serial: str  # hex
    gw: str
    fingerprint: str
    not_before_ms: int
    not_after_ms: int
    issued_ms: int
    how: str
    revoked_ms: int | None = None


_CERT_COLS = "serial, gw, fingerprint, not_before_ms, not_after_ms, issued_ms, how, revoked_ms"


def _cert_row(r: Sequence[Any]) -> CertRecord:
    return CertRecord(*r)


_MIGRATIONS: list[Migration] = [
    lambda _dialect: [
        """CREATE TABLE gateway_enrol_tokens (
            token_hash TEXT PRIMARY KEY, gw TEXT NOT NULL, created_ms BIGINT NOT NULL,
            expires_ms BIGINT NOT NULL, used_ms BIGINT)""",
        "CREATE INDEX gateway_enrol_tokens_gw ON gateway_enrol_tokens (gw)",
        """CREATE TABLE gateway_certs (
            serial TEXT PRIMARY KEY, gw TEXT NOT NULL, fingerprint TEXT NOT NULL,
            not_before_ms BIGINT NOT NULL, not_after_ms BIGINT NOT NULL,
            issued_ms BIGINT NOT NULL, how TEXT NOT NULL, revoked_ms BIGINT)""",
        "CREATE INDEX gateway_certs_gw ON gateway_certs (gw)",
    ],
]


class EnrolmentStore(SideStore):
    """The identity tables on `db_url` (`sqlite:///PATH` or `postgresql://...`).

    Example::

        async with EnrolmentStore("sqlite:///./central.db") as store:
            await store.add_token(token_hash("..."), "gw-1", expires_ms)
    """

    def __init__(self, db_url: str) -> None:
        super().__init__(db_url, name="identity", error=EnrolmentStoreError,
                         migrations=_MIGRATIONS)

    # --- tokens -------------------------------------------------------------------------------

    async def add_token(self, hashed: str, gw: str, expires_ms: int, *,
                        now_ms: int | None = None) -> None:
        now = clock.now_ms() if now_ms is None else now_ms

        def body() -> None:
            with self._tx() as cur:
                self._q(cur, "INSERT INTO gateway_enrol_tokens (token_hash, gw, created_ms,"
                             " expires_ms) VALUES (?, ?, ?, ?)", (hashed, gw, now, expires_ms))

        await self._call(body)

    async def tokens(self, gw: str | None = None) -> list[TokenInfo]:
        def body() -> list[TokenInfo]:
            with self._tx() as cur:
                sql = "SELECT gw, created_ms, expires_ms, used_ms FROM gateway_enrol_tokens"
                args: tuple[Any, ...] = ()
                if gw is not None:
                    sql, args = sql + " WHERE gw = ?", (gw,)
                return [TokenInfo(*r) for r in self._q(cur, sql + " ORDER BY created_ms", args)]

        return await self._call(body)

    async def enrol(self, hashed: str, gw: str, cert: CertRecord, *, now_ms: int) -> None:
        """Consume the token and record `cert`, in one transaction; `TokenRefusedError` else."""

        def body() -> None:
            with self._tx() as cur:
                lock = " FOR UPDATE" if self.postgres else ""
                row = self._q(cur, "SELECT gw, expires_ms, used_ms FROM gateway_enrol_tokens"
                                   " WHERE token_hash = ?" + lock,
                              (hashed,)).fetchone()
                if row is None:
                    raise TokenRefusedError("unknown")
                if row[2] is not None:
                    raise TokenRefusedError("used")
                if row[1] <= now_ms:
                    raise TokenRefusedError("expired")
                if row[0] != gw:
                    raise TokenRefusedError("wrong_gateway")
                self._q(cur, "UPDATE gateway_enrol_tokens SET used_ms = ? WHERE token_hash = ?",
                        (now_ms, hashed))
                self._insert_cert(cur, cert)

        await self._call(body)

    def _insert_cert(self, cur: Any, c: CertRecord) -> None:
        self._q(cur, f"INSERT INTO gateway_certs ({_CERT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (c.serial, c.gw, c.fingerprint, c.not_before_ms, c.not_after_ms, c.issued_ms,
                 c.how, c.revoked_ms))

    # --- certificates -------------------------------------------------------------------------

    async def add_cert(self, cert: CertRecord) -> None:
        def body() -> None:
            with self._tx() as cur:
                self._insert_cert(cur, cert)

        await self._call(body)

    async def cert(self, serial: str) -> CertRecord | None:
        def body() -> CertRecord | None:
            with self._tx() as cur:
                row = self._q(cur, f"SELECT {_CERT_COLS} FROM gateway_certs WHERE serial = ?",
                              (serial,)).fetchone()
                return None if row is None else _cert_row(row)

        return await self._call(body)

    async def certs(self, gw: str | None = None) -> list[CertRecord]:
        def body() -> list[CertRecord]:
            with self._tx() as cur:
                sql = f"SELECT {_CERT_COLS} FROM gateway_certs"
                args: tuple[str, ...] = ()
                if gw is not None:
                    sql, args = sql + " WHERE gw = ?", (gw,)
                return [_cert_row(r) for r in self._q(cur, sql + " ORDER BY issued_ms", args)]

        return await self._call(body)

    async def revoke(self, gw: str, *, now_ms: int) -> tuple[list[str], int]:
        """Revoke every live certificate of `gw` and void its unused tokens; returns the
        serials revoked now and the number of tokens voided."""

        def body() -> tuple[list[str], int]:
            with self._tx() as cur:
                serials = [r[0] for r in self._q(
                    cur, "SELECT serial FROM gateway_certs WHERE gw = ? AND revoked_ms IS NULL",
                    (gw,)).fetchall()]
                self._q(cur, "UPDATE gateway_certs SET revoked_ms = ? WHERE gw = ?"
                             " AND revoked_ms IS NULL", (now_ms, gw))
                voided = self._q(cur, "UPDATE gateway_enrol_tokens SET used_ms = ? WHERE gw = ?"
                                      " AND used_ms IS NULL", (now_ms, gw)).rowcount
                return serials, voided

        return await self._call(body)

    async def revoked(self, *, now_ms: int) -> list[CertRecord]:
        """Revoked certificates that have not expired yet (what the CRL must list)."""

        def body() -> list[CertRecord]:
            with self._tx() as cur:
                return [_cert_row(r) for r in self._q(
                    cur, f"SELECT {_CERT_COLS} FROM gateway_certs WHERE revoked_ms IS NOT NULL"
                         " AND not_after_ms > ? ORDER BY revoked_ms", (now_ms,))]

        return await self._call(body)
