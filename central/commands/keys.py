"""Central's command-signing key (DESIGN.md §6, §8): Ed25519, made on first start only.

The private key is a PKCS#8 PEM file, mode 0600, by default next to the SQLite database
(`central-command-key.pem`) or where `Settings.command_key_path` says (with PostgreSQL it must
be set, absolute: every central worker (§9) must use the same file). The public key is what
gateways pin at enrolment: its base64 form (`public_key_b64`) goes into the gateway's
`[commands] central_public_key`.

The database remembers which public key central signs with (table `command_key`, written the
first time a key is loaded). So a key is made only on first start: when the file is missing
but the database names a key, central refuses to start (`SigningKeyMissingError`) instead of
making a new one that every enrolled gateway would refuse; a file holding another key than the
recorded one (a worker pointed at the wrong file) is refused too (`SigningKeyMismatchError`).

Creation is atomic: the key is written to a private temporary file and hard-linked into place,
so two workers starting at once end up with the same key, and a crash never leaves half a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import tempfile
from pathlib import Path

import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from central import CentralError
from central.config.settings import Settings
from central.storage.side_store import Dialect, SideStore
from protocols.command_keys import public_key_b64
from runtime import clock
from runtime.files import FileError

log = structlog.get_logger(__name__)

KEY_FILE_NAME = "central-command-key.pem"


class SigningKeyError(CentralError, FileError):
    """The signing key file cannot be read, created or parsed."""


class SigningKeyMissingError(SigningKeyError):
    """The key file is gone, but central has signed with a key the gateways pinned."""

    def __init__(self, path: Path, pinned: str) -> None:
        super().__init__(path, f"missing, but central's database says commands are signed with "
                               f"key {pinned} and gateways pinned it; a new key would make them "
                               "refuse every command, so none is made. Restore the file from a "
                               "backup, or set command_key_path to it. Only if the key is lost "
                               "for good: DELETE FROM command_key, start central (a new key is "
                               "made) and pin the new key on every gateway")
        self.pinned = pinned


class SigningKeyMismatchError(SigningKeyError):
    """The key file holds another key than the one central signs with (the recorded one)."""

    def __init__(self, path: Path, found: str, pinned: str) -> None:
        super().__init__(path, f"holds key {found}, but central's database says commands are "
                               f"signed with key {pinned} (gateways pinned it): point "
                               "command_key_path at that key's file (every worker the same)")
        self.found = found
        self.pinned = pinned


class KeyRecordError(CentralError):
    """The `command_key` table cannot be read or written."""


def _m001_command_key(d: Dialect) -> list[str]:
    return [f"""CREATE TABLE command_key (
        id INTEGER PRIMARY KEY CHECK (id = 1), public_key TEXT NOT NULL, path TEXT NOT NULL,
        created_ms {d.bigint} NOT NULL)"""]


class KeyRecord(SideStore):
    """The one row saying which public key central signs with (first writer wins)."""

    def __init__(self, db_url: str) -> None:
        super().__init__(db_url, name="command_key", error=KeyRecordError,
                         migrations=[_m001_command_key])

    async def pinned(self) -> str | None:
        """The recorded public key (base64), None before the first key was made."""
        def body() -> str | None:
            with self._tx() as cur:
                row = self._q(cur, "SELECT public_key FROM command_key WHERE id = 1").fetchone()
            return None if row is None else str(row[0])

        return await self._call(body)

    async def remember(self, public_key: str, path: Path) -> str:
        """Record `public_key` unless one is recorded already; the recorded one."""
        def body() -> str:
            with self._tx() as cur:
                self._q(cur, "INSERT INTO command_key (id, public_key, path, created_ms)"
                             " VALUES (1, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                        (public_key, str(path), clock.now_ms()))
                row = self._q(cur, "SELECT public_key FROM command_key WHERE id = 1").fetchone()
            return str(row[0])

        return await self._call(body)


def key_path_for(settings: Settings) -> Path | None:
    """The configured key path, else next to the SQLite file; None for a throwaway
    `sqlite:///:memory:` central (its key lives only in memory). With PostgreSQL the path must
    be configured and absolute (`SettingsError`)."""
    return settings.beside_database("command_key_path", KEY_FILE_NAME)


async def signing_key(settings: Settings) -> tuple[Ed25519PrivateKey, Path | None]:
    """Central's key and where it lives: loaded, made on first start only, or in memory only.

    Raises `SigningKeyMissingError` when the file is missing but the database records a key,
    `SigningKeyMismatchError` when the file holds another key.
    """
    path = key_path_for(settings)
    if path is None:
        log.warning("signing_key_ephemeral", reason="in-memory database")
        return Ed25519PrivateKey.generate(), None
    async with KeyRecord(settings.db_url) as record:
        pinned = await record.pinned()
        if pinned is not None and not path.exists():
            raise SigningKeyMissingError(path, pinned)
        key = await asyncio.to_thread(load_or_create_key, path)
        found = public_key_b64(key.public_key())
        pinned = await record.remember(found, path)
    if pinned != found:
        raise SigningKeyMismatchError(path, found, pinned)
    return key, path


async def check_signing_key(settings: Settings) -> None:
    """What `central serve` checks before it starts, making and recording nothing: the key's
    path is valid for the database, and a key the database records is the one in the file."""
    path = key_path_for(settings)
    if path is None:
        return
    async with KeyRecord(settings.db_url) as record:
        pinned = await record.pinned()
    if pinned is None:
        return  # first start: `signing_key` makes (or adopts) the key and records it
    if not path.exists():
        raise SigningKeyMissingError(path, pinned)
    found = public_key_b64((await asyncio.to_thread(load_private_key, path)).public_key())
    if found != pinned:
        raise SigningKeyMismatchError(path, found, pinned)


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """Central's private key from `path`, creating it (mode 0600) when the file is missing."""
    path = Path(path)
    if not path.exists():
        _create(path)
    return load_private_key(path)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        raise SigningKeyError(path, f"cannot read: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("signing_key_permissions", path=str(path), mode=oct(mode & 0o777),
                    hint="chmod 600")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(path, f"not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(path, f"not an Ed25519 key: {type(key).__name__}")
    return key


def _create(path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".key-", dir=path.parent)  # mkstemp makes it 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # fails if another worker made the key first: keep theirs
            except FileExistsError:
                return
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    except OSError as exc:
        raise SigningKeyError(path, f"cannot create: {exc.strerror}") from exc
    log.info("signing_key_created", path=str(path))
