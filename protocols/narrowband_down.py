"""The narrowband downlink: a signed 叫应 warning from central to a gateway by BeiDou or PDT
while the gateway is off IP (DESIGN.md §5 "Downlink", §6, §7). Pure; layouts and examples are
in docs/narrowband-frames.md.

A warning is the `play_warning` command (`protocols.commands`, args
`protocols.callresp.PlayWarning`) in a compact binary form, signed with central's Ed25519
command key (the key gateways pin at enrolment, the same that signs `down/cmd`):

    byte 0        version (high nibble, 1) | kind 4 (`FrameKind.WARNING`)
    bytes 1..4    issued_at, u32 Unix seconds
    varint        lifetime in seconds (expires_at - issued_at)
    packed id     cmd_id
    packed id     warning_id
    byte          level (high nibble: 0 red, 1 orange, 2 yellow, 3 blue) | repeat (low nibble)
    varint        number of terminals, then each a packed id
    byte          text flags: bit 0 UTF-16BE (else UTF-8), bit 1 truncated
    varint        text length in bytes, then the text
    64 bytes      Ed25519 over b"fieldlink-nbw1" + varint(len(gw)) + gw + bytes 0..end of text

The gateway id is signed but not sent (the receiving gateway knows its own), so a warning for
one gateway does not verify at another. Replays are the gateway's to refuse, by `cmd_id`, as
for any command; an expired warning is refused too.

**Size.** A warning rarely fits one short message (the signature alone is 64 bytes; BD-2 level
3 carries 77, a 128-byte PDT text 45), so it goes in segments, each one short message:

    byte 0        version | kind 4, as above
    bytes 1..2    message id: the first two bytes of SHA-256(the signed warning)
    byte 3        segment index (high nibble) | segment count - 1 (low nibble)
    rest          the next `limit - 4` bytes of the signed warning

At most `max_segments` (default 3, at most 16) go for one warning; the text is the one thing
that gives way, deterministically: the text is cut to the longest prefix that, with `…`
appended, fits (the truncated bit is set), and it is sent in UTF-16BE when that is shorter than
UTF-8 (Chinese text: 2 bytes a character instead of 3). The full text still reaches the
gateway over IP when its link returns. The same command signed again gives the same bytes
(Ed25519 is deterministic), so segments of two sends of one warning combine.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from protocols.callresp import CallRespError, Level, PlayWarning, play_warning
from protocols.command_keys import VerifyKey
from protocols.commands import Command, CommandError, make_command
from protocols.narrowband_wire import (
    VERSION,
    FrameCapacityError,
    FrameTooShortError,
    MalformedFrameError,
    NarrowbandError,
    NarrowbandVersionError,
    Reader,
    UnknownFrameKindError,
    pack_id,
    varint,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

KIND: Final = 4  # protocols.narrowband.FrameKind.WARNING
SIGN_DOMAIN: Final = b"fieldlink-nbw1"
SIG_BYTES: Final = 64
SEGMENT_HEADER: Final = 4
MAX_SEGMENTS: Final = 16
DEFAULT_MAX_SEGMENTS: Final = 3
ELLIPSIS: Final = "…"
_LEVELS: Final = (Level.RED, Level.ORANGE, Level.YELLOW, Level.BLUE)
_MAX_U32: Final = 0xFFFFFFFF
_UTF16, _TRUNCATED = 1, 2


class BadWarningSignatureError(NarrowbandError):
    """The warning's Ed25519 signature does not verify (another key, another gateway, bytes
    changed, or segments of two warnings mixed)."""

    def __init__(self) -> None:
        super().__init__("narrowband warning signature does not verify")


@dataclass(frozen=True, slots=True)
class RadioWarning:
    """A verified warning: the command it carries (args `PlayWarning`) and whether its text
    was cut to fit the radio."""

    command: Command
    truncated: bool

    @property
    def args(self) -> PlayWarning:
        assert isinstance(self.command.args, PlayWarning)  # decode builds nothing else
        return self.command.args


@dataclass(frozen=True, slots=True)
class Segment:
    message_id: int
    index: int
    count: int
    chunk: bytes


# --- encoding ------------------------------------------------------------------------------


def _signed_prefix(gw: str) -> bytes:
    raw = gw.encode()
    return SIGN_DOMAIN + varint(len(raw)) + raw


def _text_field(text: str, truncated: bool) -> bytes:
    utf8, utf16 = text.encode(), text.encode("utf-16-be")
    flags, raw = (_UTF16, utf16) if len(utf16) < len(utf8) else (0, utf8)
    return bytes([flags | (_TRUNCATED if truncated else 0)]) + varint(len(raw)) + raw


def _head(cmd: Command, args: PlayWarning) -> bytes:
    issued = cmd.issued_at_ms // 1000
    lifetime = max(1, cmd.expires_at_ms // 1000 - issued)
    if issued > _MAX_U32:
        raise ValueError("issued_at does not fit u32 seconds")
    out = bytearray([VERSION << 4 | KIND]) + issued.to_bytes(4, "big") + varint(lifetime)
    out += pack_id(cmd.cmd_id) + pack_id(args.warning_id)
    out.append(_LEVELS.index(args.level) << 4 | args.repeat)
    out += varint(len(args.terminals))
    for t in args.terminals:
        out += pack_id(t)
    return bytes(out)


def _fit_text(head: bytes, text: str, budget: int) -> tuple[str, bool]:
    """The longest text (cut + `…` if need be) with which head + text + signature fit."""
    if len(head) + len(_text_field(text, False)) + SIG_BYTES <= budget:
        return text, False
    lo, hi = 0, len(text) - 1  # characters kept before the ellipsis
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(head) + len(_text_field(text[:mid] + ELLIPSIS, True)) + SIG_BYTES <= budget:
            lo = mid
        else:
            hi = mid - 1
    cut = text[:lo].rstrip()
    if not cut:
        raise FrameCapacityError(budget, len(head) + len(_text_field(text[:1] + ELLIPSIS, True))
                                 + SIG_BYTES)
    return cut + ELLIPSIS, True


def sign_warning(key: Ed25519PrivateKey, cmd: Command, *, limit: int,
                 max_segments: int = DEFAULT_MAX_SEGMENTS) -> bytes:
    """The signed warning for `cmd` (kind play_warning), its text cut so that it fits
    `max_segments` segments of `limit` bytes. Raises `FrameCapacityError` when not even one
    character of text fits, `ValueError` for a command that is not a warning."""
    args = cmd.args
    if not isinstance(args, PlayWarning):
        raise ValueError(f"a radio warning carries play_warning, not {cmd.kind}")
    if not 1 <= max_segments <= MAX_SEGMENTS or limit <= SEGMENT_HEADER:
        raise ValueError(f"max_segments must be 1..{MAX_SEGMENTS} and limit > {SEGMENT_HEADER}")
    head = _head(cmd, args)
    text, truncated = _fit_text(head, args.text, max_segments * (limit - SEGMENT_HEADER))
    body = head + _text_field(text, truncated)
    return body + key.sign(_signed_prefix(cmd.gw) + body)


def message_id(signed: bytes) -> int:
    return int.from_bytes(hashlib.sha256(signed).digest()[:2], "big")


def segments(signed: bytes, limit: int) -> list[bytes]:
    """The short messages that carry `signed`, each at most `limit` bytes."""
    size = limit - SEGMENT_HEADER
    if size <= 0:
        raise ValueError(f"limit must be above {SEGMENT_HEADER}")
    count = math.ceil(len(signed) / size)
    if not 1 <= count <= MAX_SEGMENTS:
        raise FrameCapacityError(limit, math.ceil(len(signed) / MAX_SEGMENTS) + SEGMENT_HEADER)
    mid = message_id(signed).to_bytes(2, "big")
    return [bytes([VERSION << 4 | KIND]) + mid + bytes([i << 4 | (count - 1)])
            + signed[i * size:(i + 1) * size] for i in range(count)]


# --- decoding ------------------------------------------------------------------------------


def parse_segment(data: bytes) -> Segment:
    """One short message of the downlink; raises only `NarrowbandError`s."""
    if len(data) < SEGMENT_HEADER + 1:
        raise FrameTooShortError(len(data), SEGMENT_HEADER + 1)
    version, kind = data[0] >> 4, data[0] & 0x0F
    if version != VERSION:
        raise NarrowbandVersionError(version)
    if kind != KIND:
        raise UnknownFrameKindError(kind)
    index, count = data[3] >> 4, (data[3] & 0x0F) + 1
    if index >= count:
        raise MalformedFrameError(f"narrowband segment {index} of {count}")
    return Segment(int.from_bytes(data[1:3], "big"), index, count, bytes(data[SEGMENT_HEADER:]))


class Assembler:
    """Collects segments into signed warnings (a pure state machine): `feed` returns the
    signed bytes when the last missing segment of a message arrives. At most `max_partial`
    messages are held (the oldest goes first); a segment that arrives again replaces its copy
    (a resend after a lost one), so a message whose bytes do not verify is simply dropped
    by the caller and completes again from the next send."""

    def __init__(self, max_partial: int = 8) -> None:
        self.max_partial = max_partial
        self._held: OrderedDict[tuple[int, int], dict[int, bytes]] = OrderedDict()

    def feed(self, segment: Segment) -> bytes | None:
        key = (segment.message_id, segment.count)
        parts = self._held.pop(key, {})
        parts[segment.index] = segment.chunk
        if len(parts) == segment.count:
            return b"".join(parts[i] for i in range(segment.count))
        self._held[key] = parts
        while len(self._held) > self.max_partial:
            self._held.popitem(last=False)
        return None

    @property
    def partial(self) -> int:
        return len(self._held)


def open_warning(public_key: VerifyKey, gw: str, signed: bytes) -> RadioWarning:
    """Verify a reassembled warning for gateway `gw`, then parse it; raises only
    `NarrowbandError`s (`BadWarningSignatureError` before anything is believed)."""
    if len(signed) < SIG_BYTES + 6:
        raise FrameTooShortError(len(signed), SIG_BYTES + 6)
    body, sig = signed[:-SIG_BYTES], signed[-SIG_BYTES:]
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(sig, _signed_prefix(gw) + body)
    except InvalidSignature:
        raise BadWarningSignatureError() from None
    if body[0] != VERSION << 4 | KIND:
        raise MalformedFrameError(f"narrowband warning header {body[0]:#x}")
    return _parse(gw, body)


def _parse(gw: str, body: bytes) -> RadioWarning:
    r = Reader(body)
    r.take(1)
    issued = int.from_bytes(r.take(4), "big")
    lifetime = r.varint()
    cmd_id, warning_id = r.packed_id(), r.packed_id()
    code = r.take(1)[0]
    if code >> 4 >= len(_LEVELS):
        raise MalformedFrameError(f"narrowband warning level {code >> 4}")
    count = r.varint()
    if count > 64:
        raise MalformedFrameError(f"narrowband warning for {count} terminals")
    terminals = [r.packed_id() for _ in range(count)]
    flags = r.take(1)[0]
    if flags > 3:
        raise MalformedFrameError(f"narrowband warning text flags {flags:#x}")
    raw = r.take(r.varint())
    if not r.done:
        raise MalformedFrameError("narrowband warning has bytes after its text")
    try:
        text = raw.decode("utf-16-be" if flags & _UTF16 else "utf-8")
        args = play_warning(warning_id, _LEVELS[code >> 4], text, code & 0x0F, terminals)
        cmd = make_command(cmd_id, gw=gw, args=args, issued_at_ms=issued * 1000,
                           ttl_ms=lifetime * 1000)
    except (UnicodeDecodeError, CallRespError, CommandError) as exc:
        raise MalformedFrameError(f"narrowband warning: {exc}") from exc
    return RadioWarning(cmd, bool(flags & _TRUNCATED))


__all__ = ["DEFAULT_MAX_SEGMENTS", "ELLIPSIS", "KIND", "MAX_SEGMENTS", "SEGMENT_HEADER",
           "SIG_BYTES", "Assembler", "BadWarningSignatureError", "RadioWarning", "Segment",
           "message_id", "open_warning", "parse_segment", "segments", "sign_warning"]
