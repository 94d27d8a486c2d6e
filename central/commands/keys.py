"""Central's command-signing key (DESIGN.md §6, §8): Ed25519, made on first start.

The private key is a PKCS#8 PEM file, mode 0600, by default next to the SQLite database
(`central-command-key.pem`) or where `Settings.command_key_path` says; several central workers
(§9) must point at the same file. The public key is what gateways pin at enrolment: its
base64 form (`public_key_b64`) goes into the gateway's `[commands] central_public_key`.

Creation is atomic: the key is written to a private temporary file and hard-linked into place,
so two workers starting at once end up with the same key, and a crash never leaves half a key.
"""

from __future__ import annotations

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
from runtime.files import FileError

log = structlog.get_logger(__name__)

KEY_FILE_NAME = "central-command-key.pem"


class SigningKeyError(CentralError, FileError):
    """The signing key file cannot be read, created or parsed."""


def key_path_for(settings: Settings) -> Path | None:
    """The configured key path, else next to the SQLite file, else the working directory;
    None for a throwaway `sqlite:///:memory:` central (its key lives only in memory)."""
    configured = settings.command_key_path
    if configured:
        return Path(configured).expanduser()
    url = settings.db_url
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if path == ":memory:":
            return None
        return Path(path).expanduser().parent / KEY_FILE_NAME
    return Path(KEY_FILE_NAME)


def signing_key(settings: Settings) -> tuple[Ed25519PrivateKey, Path | None]:
    """Central's key and where it lives (loaded, made on first start, or in memory only)."""
    path = key_path_for(settings)
    if path is None:
        log.warning("signing_key_ephemeral", reason="in-memory database")
        return Ed25519PrivateKey.generate(), None
    return load_or_create_key(path), path


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
