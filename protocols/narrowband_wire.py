"""The byte-level pieces of the narrowband frames (`protocols.narrowband`,
`protocols.narrowband_down`): their errors, LEB128 varints, zigzag, the body reader and packed
ids. Pure; see `protocols.narrowband` for the layouts.
"""

from __future__ import annotations

import re
from typing import Final

from protocols.errors import DetailedError, ProtocolError
from protocols.limits import INT64_MAX

VERSION: Final = 1  # of the frame layout
TEXT_PREFIX: Final = "FL1:"  # text form, version 1 of this frame layout
MAX_ID_CHARS: Final = 64  # protocols.callresp ids


class NarrowbandError(ProtocolError):
    """A narrowband frame that cannot be made or cannot be trusted."""


class FrameTooShortError(NarrowbandError, DetailedError):
    template = "narrowband frame of {length} bytes, at least {needed} needed"
    length: int
    needed: int


class MacMismatchError(NarrowbandError):
    """The MAC does not verify: a wrong key, a wrong stream, or bytes changed on the way."""

    def __init__(self) -> None:
        super().__init__("narrowband frame MAC does not verify")


class NarrowbandVersionError(NarrowbandError):
    def __init__(self, version: int) -> None:
        super().__init__(f"narrowband frame version {version}, this codec knows {VERSION}")
        self.version = version


class UnknownFrameKindError(NarrowbandError, DetailedError):
    template = "unknown narrowband frame kind {kind}"
    kind: int


class MalformedFrameError(NarrowbandError):
    """The MAC verified but the body does not parse (a bug on the sending side)."""


class FrameCapacityError(NarrowbandError, DetailedError):
    """Not even one entry fits the terminal's limit."""

    template = "narrowband limit is {limit} bytes, the smallest frame needs {needed}"
    limit: int
    needed: int


class FrameTextError(NarrowbandError, DetailedError):
    """A text that is not the text form of a frame: `reason` says how."""

    template = "narrowband frame text: {reason}"
    reason: str


class NotFrameTextError(FrameTextError):
    """The text does not start with `TEXT_PREFIX`: a person's message, not a frame."""

    def __init__(self) -> None:
        super().__init__(f"does not start with {TEXT_PREFIX!r}")


# --- varints ------------------------------------------------------------------------------------

def varint(n: int) -> bytes:
    if n < 0:
        raise ValueError(f"varint of a negative number {n}")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def zigzag(n: int) -> bytes:
    return varint(n * 2 if n >= 0 else -n * 2 - 1)


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def varint(self) -> int:
        n = shift = 0
        while True:
            if self.pos >= len(self.data):
                raise MalformedFrameError("narrowband frame body ends inside a number")
            byte = self.data[self.pos]
            self.pos += 1
            n |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if n > INT64_MAX:  # a BIGINT at central (protocols.limits)
                    raise MalformedFrameError("narrowband varint above 2**63-1")
                return n
            shift += 7
            if shift > 63:
                raise MalformedFrameError("narrowband varint longer than 64 bits")

    def zigzag(self) -> int:
        n = self.varint()
        return n >> 1 if not n & 1 else -(n >> 1) - 1

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise MalformedFrameError("narrowband frame body is cut short")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)

    def packed_id(self) -> str:
        """An id written by `pack_id`."""
        head = self.varint()
        if head >> 1 > MAX_ID_CHARS:
            raise MalformedFrameError("narrowband id longer than 64 characters")
        raw = self.take(head >> 1)
        if not raw.isascii():
            raise MalformedFrameError("narrowband id is not ASCII")
        text = raw.decode("ascii")
        if not head & 1:
            return text
        if text and not text.endswith("-"):
            raise MalformedFrameError("narrowband packed id prefix does not end in '-'")
        n = self.varint()
        if not 1 <= n <= MAX_ID_CHARS // 2:
            raise MalformedFrameError("narrowband packed id of a bad length")
        value = text + self.take(n).hex()
        if len(value) > MAX_ID_CHARS:
            raise MalformedFrameError("narrowband id longer than 64 characters")
        return value


_PACKABLE: Final = re.compile(r"^(.*-)?((?:[0-9a-f]{2})+)$", re.DOTALL)


def pack_id(value: str) -> bytes:
    """An ASCII id of at most 64 characters, hex tails packed (see the module doc)."""
    if not value.isascii() or len(value) > MAX_ID_CHARS:
        raise ValueError(f"an id is at most {MAX_ID_CHARS} ASCII characters")
    m = _PACKABLE.match(value)
    if m is None:
        return varint(len(value) << 1) + value.encode("ascii")
    prefix, tail = m.group(1) or "", bytes.fromhex(m.group(2))
    return varint(len(prefix) << 1 | 1) + prefix.encode("ascii") + varint(len(tail)) + tail



__all__ = ["MAX_ID_CHARS", "TEXT_PREFIX", "VERSION", "FrameCapacityError", "FrameTextError",
           "FrameTooShortError", "MacMismatchError", "MalformedFrameError", "NarrowbandError",
           "NarrowbandVersionError", "NotFrameTextError", "Reader", "UnknownFrameKindError",
           "pack_id", "varint", "zigzag"]
