"""Central's command-signing public key as text, and as a gateway pins it (DESIGN.md §6).

A gateway's config names central's Ed25519 public key as PEM (SubjectPublicKeyInfo) or as
base64 of its 32 raw bytes. `public_key_bytes` checks either form without `cryptography`;
`PinnedKey` keeps the checked bytes and loads the library (~9 MB resident for the months a
daemon runs) only when a first signature is to be verified. Signing and verifying commands
is `protocols.commands`.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import TYPE_CHECKING, Protocol

from protocols.errors import ProtocolError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

PUBLIC_KEY_BYTES = 32


class BadKeyError(ProtocolError):
    """A public key that cannot be parsed."""


def public_key_raw(public_key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_b64(public_key: Ed25519PublicKey) -> str:
    """The 32 raw key bytes in base64: the form a gateway config pins."""
    return base64.b64encode(public_key_raw(public_key)).decode("ascii")


def public_key_pem(public_key: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


# RFC 8410 §4: the DER of an Ed25519 SubjectPublicKeyInfo is these 12 bytes, then the key's 32.
_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PEM_PUBLIC_RE = re.compile(rb"-----BEGIN PUBLIC KEY-----(.*)-----END PUBLIC KEY-----", re.S)


def public_key_bytes(text: str | bytes) -> bytes:
    """The 32 raw bytes of an Ed25519 public key given as PEM (SubjectPublicKeyInfo) or as base64
    of those bytes; `BadKeyError` if it is neither. Any 32 bytes are a key to `cryptography`
    (a point off the curve fails each verification), so this is the whole check."""
    data = text.encode("ascii", "replace") if isinstance(text, str) else bytes(text)
    data = data.strip()
    pem = data.startswith(b"-----BEGIN")
    if pem:
        match = _PEM_PUBLIC_RE.fullmatch(data)
        if match is None:
            raise BadKeyError("not a PEM public key")
        data = b"".join(match[1].split())
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadKeyError("not a PEM public key" if pem else "not base64") from exc
    if pem:
        if not (raw.startswith(_ED25519_SPKI_PREFIX)
                and len(raw) == len(_ED25519_SPKI_PREFIX) + PUBLIC_KEY_BYTES):
            raise BadKeyError("not an Ed25519 public key")
        raw = raw[len(_ED25519_SPKI_PREFIX):]
    if len(raw) != PUBLIC_KEY_BYTES:
        raise BadKeyError(f"expected {PUBLIC_KEY_BYTES} key bytes, got {len(raw)}")
    return raw


def parse_public_key(text: str | bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (SubjectPublicKeyInfo) or base64 of its 32 raw bytes."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return Ed25519PublicKey.from_public_bytes(public_key_bytes(text))


class VerifyKey(Protocol):
    """What checks a signature: an `Ed25519PublicKey` or a `PinnedKey`. `verify` raises
    `cryptography.exceptions.InvalidSignature` when the signature is not good."""

    def verify(self, signature: bytes, data: bytes) -> None: ...


class PinnedKey:
    """Central's public key as a gateway pins it: read and checked when the agent starts, made
    an `Ed25519PublicKey` (loading `cryptography`) when the first signature is verified."""

    __slots__ = ("_key", "raw")

    def __init__(self, text: str | bytes) -> None:
        self.raw = public_key_bytes(text)
        self._key: Ed25519PublicKey | None = None

    def verify(self, signature: bytes, data: bytes) -> None:
        if self._key is None:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

            self._key = Ed25519PublicKey.from_public_bytes(self.raw)
        self._key.verify(signature, data)
