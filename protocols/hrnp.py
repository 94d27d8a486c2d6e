"""HRNP: the serial link between a gateway and a Hytera PDT/DMR radio, and the text messages on it.

Two layers, both big-endian unless said otherwise. Sources are public reverse-engineering work,
cited as [dmrlib] OK-DMR/ok-dmrlib `okdmr/dmrlib/hytera/pdu/*.py` and its tests (captures from
real radios), [kaitai] OK-DMR/dmr-kaitai `okdmr/kaitai/hytera/*.ksy`, [esp] jianxiongye/esp8266-2
`components/user_driver/*/hytera_protol.*` (a UART client of a Hytera radio).

An HRNP packet ([dmrlib] hrnp.py, [kaitai] hytera_radio_network_protocol.ksy, [esp] .h):

    7E  version  block  opcode  source  destination  packet-number:u16  length:u16  checksum:u16
    payload (DATA packets only)

`length` counts the whole packet. `checksum` is the RFC 1071 Internet checksum of the packet
(checksum field zero, odd length padded with a zero byte), as [esp] `checksum()` computes it.
[dmrlib] drops the end-around carry and adds 1 to DATA packets as a "quirk"; the carry explains
it, and RFC 1071 also verifies the capture [dmrlib] marks as failing (225 bytes, C657).

A DATA payload is one application message, HDAP ([dmrlib] hdap.py, [kaitai]
hytera_dmr_application_protocol.ksy):

    header  opcode:u16  length:u16  payload  checksum:u8  03

`header` is the service (0x02 radio control, 0x08 location, 0x09 text message, ...), its top
bit the "reliable" flag. `length` counts the payload only. The checksum is
`(~sum(opcode..payload) + 0x33) & 0xFF` ([dmrlib] `get_hdap_checksum`). Radio control (RCP)
writes its opcode and length little-endian ([kaitai] radio_control_protocol.ksy `endian: le`;
the RCP captures of [dmrlib] agree).

Text messages (TMP, HDAP service 0x09) and their acks are in `protocols.hrnp_text`.

`HrnpDecoder` is the h11-style state machine for the byte stream (`feed()` / `next_packet()` →
packet or `NEED_DATA`) that resynchronises on the next 0x7E. The application layer is decoded
apart (`decode_app`, then `hrnp_text.decode_text`), so a bad message never desynchronises the
stream. Every error on bad input is an `HrnpError`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, Literal

from protocols.errors import ChecksumMismatchError, DetailedError, FieldError, ProtocolError
from protocols.stream import NEED_DATA as NEED_DATA  # re-exported: what next_frame() answers
from protocols.stream import FramedStream, NeedData

START: Final = 0x7E
HEADER_LEN: Final = 12
HRNP_VERSION: Final = 0x04  # [dmrlib]: "current (last) version is 0x04"; captures also show 0x03
# [dmrlib] docstring: "HRNP Version (0x00 - 0x04)". Rejecting others keeps a stray 0x7E from
# posing as a header. Inferred as a limit; a parameter of the decoder.
ACCEPTED_VERSIONS: Final = frozenset(range(0x00, 0x05))
GATEWAY_ADDRESS: Final = 0x20  # [dmrlib], [esp]: the application side is 0x20, the radio 0x10
RADIO_ADDRESS: Final = 0x10
DEFAULT_MAX_PACKET_LEN: Final = 1024  # inferred: the longest capture is 225 bytes
MAX_PACKET_LEN: Final = 0xFFFF  # the length field is a u16

END: Final = 0x03
APP_OVERHEAD: Final = 7  # header, opcode, length, checksum, end
_APP_CHECKSUM_BIAS = 0x33

# HDAP services (header byte without the reliable bit), [kaitai] message_header_types; also
# 0x11 registration, 0x12 telemetry, 0x13 data transmit, 0x14 data delivery states.
SERVICE_RCP: Final = 0x02
SERVICE_LOCATION: Final = 0x08
SERVICE_TEXT: Final = 0x09
_RELIABLE = 0x80
_LITTLE_ENDIAN_SERVICES = frozenset({SERVICE_RCP})

class HrnpOpcode(enum.IntEnum):
    """HRNP opcodes, [dmrlib] HRNPOpcodes, [kaitai] opcodes, [esp] HYTERA_*."""

    DATA = 0x00
    DATA_ACK = 0x10
    CLOSE_ACK = 0xFA
    CLOSE = 0xFB
    REJECT = 0xFC
    ACCEPT = 0xFD
    CONNECT = 0xFE


_OPCODES = frozenset(int(op) for op in HrnpOpcode)


class HrnpError(ProtocolError):
    """Base of every HRNP / HDAP / TMP decode or encode error."""


class HrnpChecksumError(HrnpError, ChecksumMismatchError):
    """A checksum does not match its data; `layer` is "hrnp" (u16) or "app" (u8)."""

    template = "{layer} checksum mismatch: data gives {expected:#06x}, packet carries {got:#06x}"

    def __init__(self, layer: str, expected: int, got: int) -> None:
        self.layer = layer  # before the generated __init__, which formats the message
        super().__init__(expected, got)


class HrnpLengthError(HrnpError, DetailedError):
    """A length field is out of range or does not match the data."""

    template = "{layer} length: {reason}"
    layer: str
    reason: str
    declared: int | None = None


class HrnpFormatError(HrnpError, FieldError):
    """A field is missing, out of range or of an unknown kind."""


class HrnpTextError(HrnpFormatError):
    """The text is not valid UTF-16LE (odd length, lone surrogate) or cannot be encoded."""

    def __init__(self, reason: str, offset: int | None = None) -> None:
        super().__init__("text", reason)
        self.offset = offset


def check_int(field: str, value: object, top: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise HrnpFormatError(field, f"{value!r} is not an integer in 0..{top}")


def hrnp_checksum(packet: bytes | bytearray) -> int:
    """RFC 1071 checksum of a whole packet whose checksum field (bytes 10..11) is zero."""
    data = bytes(packet) + b"\x00" * (len(packet) % 2)  # odd: pad with one zero byte
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)  # end-around carry
    return ~total & 0xFFFF


def app_checksum(data: bytes | bytearray) -> int:
    """HDAP checksum of opcode, length and payload: `(~sum + 0x33) & 0xFF` ([dmrlib])."""
    return (~sum(data) + _APP_CHECKSUM_BIAS) & 0xFF


# ---------------------------------------------------------------------------- HRNP packets


@dataclass(frozen=True, slots=True)
class HrnpPacket:
    """One HRNP packet. Only DATA packets carry a payload (one encoded `AppMessage`)."""

    opcode: HrnpOpcode
    packet_number: int = 0
    source: int = GATEWAY_ADDRESS
    destination: int = RADIO_ADDRESS
    payload: bytes = b""
    version: int = HRNP_VERSION
    block: int = 0  # [kaitai] "block", [dmrlib] "fragment number"; 0 in every capture

    def __post_init__(self) -> None:
        if isinstance(self.opcode, bool) or self.opcode not in _OPCODES:
            raise HrnpFormatError("opcode", f"{self.opcode!r} is not an HRNP opcode")
        object.__setattr__(self, "opcode", HrnpOpcode(self.opcode))
        for name in ("source", "destination", "version", "block"):
            check_int(name, getattr(self, name), 0xFF)
        check_int("packet_number", self.packet_number, 0xFFFF)
        if not isinstance(self.payload, bytes):
            raise HrnpFormatError("payload", "must be bytes")
        if self.payload and self.opcode is not HrnpOpcode.DATA:
            # [dmrlib] `has_data()`: only DATA carries data; inferred for the others
            raise HrnpFormatError("payload", f"a {self.opcode.name} packet carries none")
        if HEADER_LEN + len(self.payload) > MAX_PACKET_LEN:
            raise HrnpLengthError("hrnp", f"payload of {len(self.payload)} bytes is too long",
                                  HEADER_LEN + len(self.payload))


def encode_packet(packet: HrnpPacket) -> bytes:
    """The bytes of one packet, 0x7E to the end of its payload, with the checksum filled in."""
    length = HEADER_LEN + len(packet.payload)
    raw = bytearray((START, packet.version, packet.block, packet.opcode, packet.source,
                     packet.destination))
    raw += packet.packet_number.to_bytes(2, "big") + length.to_bytes(2, "big") + b"\x00\x00"
    raw += packet.payload
    raw[10:12] = hrnp_checksum(raw).to_bytes(2, "big")
    return bytes(raw)


def _declared_length(header: bytes | bytearray, max_packet_len: int,
                     versions: frozenset[int]) -> int | None:
    """Check what is there of a header (from its 0x7E); its length, or None while incomplete."""
    if len(header) > 1 and header[1] not in versions:
        raise HrnpFormatError("version", f"{header[1]:#04x} is not an accepted HRNP version")
    if len(header) > 3 and header[3] not in _OPCODES:
        raise HrnpFormatError("opcode", f"{header[3]:#04x} is not an HRNP opcode")
    if len(header) < 10:
        return None
    declared = int.from_bytes(header[8:10], "big")
    if declared < HEADER_LEN or declared > max_packet_len:
        raise HrnpLengthError("hrnp", f"{declared} is outside {HEADER_LEN}..{max_packet_len}",
                              declared)
    if header[3] != HrnpOpcode.DATA and declared != HEADER_LEN:
        raise HrnpLengthError("hrnp", f"a {HrnpOpcode(header[3]).name} packet is "
                              f"{HEADER_LEN} bytes, not {declared}", declared)
    return declared


def decode_packet(data: bytes, *, max_packet_len: int = DEFAULT_MAX_PACKET_LEN,
                  versions: frozenset[int] = ACCEPTED_VERSIONS) -> HrnpPacket:
    """Decode exactly one packet; raises only `HrnpError`."""
    if not data or data[0] != START:
        raise HrnpFormatError("start", "does not start with 0x7E")
    declared = _declared_length(data, max_packet_len, versions)
    if declared is None:
        raise HrnpLengthError("hrnp", f"{len(data)} bytes are shorter than a header")
    if len(data) != declared:
        raise HrnpLengthError("hrnp", f"declared {declared} bytes, got {len(data)}", declared)
    got = int.from_bytes(data[10:12], "big")
    expected = hrnp_checksum(data[:10] + b"\x00\x00" + data[12:])
    if expected != got:
        raise HrnpChecksumError("hrnp", expected, got)
    return HrnpPacket(HrnpOpcode(data[3]), int.from_bytes(data[6:8], "big"), data[4], data[5],
                      bytes(data[12:]), data[1], data[2])


class HrnpDecoder(FramedStream):
    """Incremental decoder for the serial byte stream.

    `feed()` bytes as they come, then call `next_packet()` until it returns `NEED_DATA`. Bytes
    before a 0x7E are dropped and counted in `discarded`. A bad packet raises its `HrnpError`
    once, after the decoder has stepped past its 0x7E only (a packet may start inside the bad
    one). Header fields are checked as they arrive, so a stray 0x7E rarely makes it wait; when
    one does, the I/O loop calls `skip_partial()` after the line has been quiet a while (a
    packet comes in one burst). A caller that feeds without draining is bounded: `feed()` first
drops the oldest undrained bytes (counted) past `max_buffer`, then takes the new ones whole.
    """

    def __init__(self, *, max_packet_len: int = DEFAULT_MAX_PACKET_LEN,
                 versions: frozenset[int] = ACCEPTED_VERSIONS,
                 max_buffer: int | None = None) -> None:
        if not HEADER_LEN <= max_packet_len <= MAX_PACKET_LEN:
            raise ValueError(f"max_packet_len must be in {HEADER_LEN}..{MAX_PACKET_LEN}")
        super().__init__()
        self._max_packet_len = max_packet_len
        self._versions = versions
        self._max_buffer = max(max_buffer or 4 * max_packet_len, max_packet_len)

    def feed(self, data: bytes) -> None:
        # The bound applies to what earlier feeds left undrained, never to the new bytes: one
        # large read (several packets in one burst) must not lose its first packets.
        excess = len(self._buffer) - self._max_buffer
        if excess > 0:
            self._drop(excess)
        super().feed(data)

    def next_packet(self) -> HrnpPacket | Literal[NeedData.NEED_DATA]:
        buf = self._buffer
        start = buf.find(START)
        self._drop(len(buf) if start < 0 else start)
        if not buf:
            return NEED_DATA
        try:
            declared = _declared_length(buf[:HEADER_LEN], self._max_packet_len, self._versions)
            if declared is None or len(buf) < declared:
                return NEED_DATA
            packet = decode_packet(bytes(buf[:declared]), max_packet_len=self._max_packet_len,
                                   versions=self._versions)
        except HrnpError:
            self._step_past_bad()
            raise
        del buf[:declared]
        return packet


# ---------------------------------------------------------------------------- HDAP messages


@dataclass(frozen=True, slots=True)
class AppMessage:
    """One HDAP message: the service (header byte), a u16 opcode and the raw payload."""

    service: int
    opcode: int
    payload: bytes = b""
    reliable: bool = False  # the header's top bit, [kaitai] `is_reliable_message`

    def __post_init__(self) -> None:
        check_int("service", self.service, 0x7F)
        check_int("opcode", self.opcode, 0xFFFF)
        if not isinstance(self.payload, bytes):
            raise HrnpFormatError("payload", "must be bytes")
        if len(self.payload) > MAX_PACKET_LEN - HEADER_LEN - APP_OVERHEAD:
            raise HrnpLengthError("app", f"payload of {len(self.payload)} bytes is too long",
                                  len(self.payload))


def _order(service: int) -> Literal["big", "little"]:
    return "little" if service in _LITTLE_ENDIAN_SERVICES else "big"


def encode_app(message: AppMessage) -> bytes:
    """The bytes of one HDAP message, header byte to 0x03."""
    order = _order(message.service)
    body = (message.opcode.to_bytes(2, order) + len(message.payload).to_bytes(2, order)
            + message.payload)
    header = message.service | (_RELIABLE if message.reliable else 0)
    return bytes((header,)) + body + bytes((app_checksum(body), END))


def decode_app(data: bytes) -> AppMessage:
    """Decode exactly one HDAP message (a DATA packet's payload); raises only `HrnpError`."""
    if len(data) < APP_OVERHEAD:
        raise HrnpLengthError("app", f"{len(data)} bytes are shorter than a message")
    service = data[0] & 0x7F  # the top bit is the reliable flag
    order = _order(service)
    declared = int.from_bytes(data[3:5], order)
    if len(data) != declared + APP_OVERHEAD:
        raise HrnpLengthError("app", f"declared {declared} payload bytes, got "
                              f"{len(data) - APP_OVERHEAD}", declared)
    if data[-1] != END:
        raise HrnpFormatError("end", f"{data[-1]:#04x} where 0x03 ends the message")
    expected, got = app_checksum(data[1:-2]), data[-2]
    if expected != got:
        raise HrnpChecksumError("app", expected, got)
    return AppMessage(service, int.from_bytes(data[1:3], order), bytes(data[5:-2]),
                      bool(data[0] & _RELIABLE))


def reply_to(packet: HrnpPacket, opcode: HrnpOpcode) -> HrnpPacket:
    """A payload-less answer to `packet` (`DATA_ACK`, `CLOSE_ACK`, `ACCEPT`, ...): the same
    packet number and version, addressed back to its sender."""
    return HrnpPacket(opcode, packet.packet_number, packet.destination, packet.source,
                      version=packet.version)
