"""Text messages (TMP) on a Hytera PDT/DMR radio's HRNP link: private and group texts, their acks.

Carried in an HDAP message of service 0x09 (`protocols.hrnp`, which holds the framing, the
sources [dmrlib] / [kaitai] / [esp] and the errors). The TMP opcode is `flags:u8 service:u8`
(flag 0x80 "ack", 0x40 "option"; service 0xA1 private, 0xB1 group, 0xA2/0xB2 their acks) and
the payload ([kaitai] text_message_protocol.ksy, [dmrlib] text_message_protocol.py)

    [option-length:u16]  request-id:u32  destination:4  [source:4]  text | result:u8  [option]

with no source in a group ack. An address is a subnet byte and a 24-bit radio id (10.x.y.z,
[dmrlib] radio_ip.py). The text is UTF-16LE with no terminator. Every error on bad input is an
`HrnpError`.
"""

from __future__ import annotations

import enum
from dataclasses import KW_ONLY, dataclass
from typing import Final

from protocols.hrnp import (
    SERVICE_TEXT,
    AppMessage,
    HrnpFormatError,
    HrnpLengthError,
    HrnpTextError,
    check_int,
    decode_app,
)

# TMP services and flags, [kaitai] service_types / ack_flag / option_flag.
TMP_PRIVATE: Final = 0xA1
TMP_PRIVATE_ACK: Final = 0xA2
TMP_GROUP: Final = 0xB1
TMP_GROUP_ACK: Final = 0xB2
_TMP_SERVICES = frozenset({TMP_PRIVATE, TMP_PRIVATE_ACK, TMP_GROUP, TMP_GROUP_ACK})
# The sources disagree on what the ack bit means ([kaitai]: 0 = ack required; [dmrlib]: 1 =
# confirmed); captured messages and acks both carry it set. Kept as the raw bit.
TMP_FLAG_ACK: Final = 0x80
TMP_FLAG_OPTION: Final = 0x40

DEFAULT_SUBNET: Final = 10  # [dmrlib] RadioIP default and every capture: 10.x.y.z
MAX_RADIO_ID: Final = 0xFFFFFF  # 24-bit, the three low bytes of the address
# Inferred, no public source gives the radios' limit: PDT short data is small, so a cautious
# 64 UTF-16 units (ample for "燃气泄漏 二级报警" and a place name). Read the deployed radios'
# real limit and pass it as `max_text_bytes`.
DEFAULT_MAX_TEXT_BYTES: Final = 128


class TextResult(enum.IntEnum):
    """TMP result codes, [kaitai] result_codes, [dmrlib] TMPResultCodes. An ack may carry
    others: `TextAck.result` stays an int."""

    OK = 0
    FAIL = 1
    INVALID_PARAMS = 3
    CHANNEL_BUSY = 4
    RX_ONLY = 5
    LOW_BATTERY = 6
    PLL_UNLOCK = 7
    PRIVATE_CALL_NO_ACK = 8
    REPEATER_WAKEUP_FAIL = 9
    NO_CONTACT = 10
    TX_DENIED = 11
    TX_INTERRUPTED = 12


# ---------------------------------------------------------------------------- text messages


def _check_addresses(msg: TextMessage | TextAck) -> None:
    check_int("request_id", msg.request_id, 0xFFFFFFFF)
    check_int("destination", msg.destination, MAX_RADIO_ID)
    check_int("destination_subnet", msg.destination_subnet, 0xFF)
    check_int("source_subnet", msg.source_subnet, 0xFF)
    if msg.option is not None and (not isinstance(msg.option, bytes) or len(msg.option) > 0xFFFF):
        raise HrnpFormatError("option", "must be None or bytes (at most 65535)")


@dataclass(frozen=True, slots=True)
class TextMessage:
    """A text message (TMP 0xA1 private / 0xB1 group). `destination` is a radio or group id."""

    request_id: int
    destination: int
    source: int
    text: str
    _: KW_ONLY
    group: bool = False
    ack_flag: bool = True  # the raw 0x80 bit (see TMP_FLAG_ACK); set in every capture
    option: bytes | None = None  # the option field; None: option flag clear
    destination_subnet: int = DEFAULT_SUBNET
    source_subnet: int = DEFAULT_SUBNET

    def __post_init__(self) -> None:
        _check_addresses(self)
        check_int("source", self.source, MAX_RADIO_ID)
        if not isinstance(self.text, str):
            raise HrnpTextError("must be a str")
        utf16_bytes(self.text)  # refuses lone surrogates now, not when encoding


@dataclass(frozen=True, slots=True)
class TextAck:
    """The radio's answer to a text message (TMP 0xA2 / 0xB2). A group ack has no source."""

    request_id: int
    destination: int
    result: int
    source: int | None = None
    _: KW_ONLY
    group: bool = False
    ack_flag: bool = True
    option: bytes | None = None
    destination_subnet: int = DEFAULT_SUBNET
    source_subnet: int = DEFAULT_SUBNET

    def __post_init__(self) -> None:
        _check_addresses(self)
        check_int("result", self.result, 0xFF)
        if self.group != (self.source is None):
            raise HrnpFormatError("source", "a private ack has one, a group ack none")
        if self.source is not None:
            check_int("source", self.source, MAX_RADIO_ID)
        elif self.source_subnet != DEFAULT_SUBNET:
            raise HrnpFormatError("source_subnet", "a group ack has no source")

    @property
    def ok(self) -> bool:
        return self.result == TextResult.OK


def utf16_bytes(text: str) -> bytes:
    """`text` in UTF-16LE; `HrnpTextError` for what UTF-16 cannot carry (lone surrogates)."""
    try:
        return text.encode("utf-16-le")
    except UnicodeEncodeError as exc:
        raise HrnpTextError(f"cannot encode {text[exc.start:exc.end]!r}", exc.start) from exc


def _address(subnet: int, radio_id: int) -> bytes:
    return bytes((subnet,)) + radio_id.to_bytes(3, "big")


def encode_text(message: TextMessage | TextAck, *, reliable: bool = False,
                max_text_bytes: int | None = None) -> AppMessage:
    """The HDAP message carrying a text message or ack; with `max_text_bytes`, a longer text
    is refused with `HrnpLengthError` (see `text_capacity`)."""
    body = message.request_id.to_bytes(4, "big")
    body += _address(message.destination_subnet, message.destination)
    if message.source is not None:
        body += _address(message.source_subnet, message.source)
    if isinstance(message, TextMessage):
        text = utf16_bytes(message.text)
        if max_text_bytes is not None and len(text) > max_text_bytes:
            raise HrnpLengthError("text", f"{len(text)} bytes are over {max_text_bytes}",
                                  len(text))
        body += text
    else:
        body += bytes((message.result,))
    service = TMP_GROUP if message.group else TMP_PRIVATE
    if isinstance(message, TextAck):
        service += 1  # 0xA2, 0xB2: each ack is its message's service plus one
    flags = TMP_FLAG_ACK if message.ack_flag else 0
    if message.option is not None:
        flags |= TMP_FLAG_OPTION
        body = len(message.option).to_bytes(2, "big") + body + message.option
    return AppMessage(SERVICE_TEXT, flags << 8 | service, body, reliable)


def decode_text(app: AppMessage) -> TextMessage | TextAck:
    """The text message or ack in an HDAP message; raises only `HrnpError`."""
    if app.service != SERVICE_TEXT:
        raise HrnpFormatError("service", f"{app.service:#04x} is not a text message (0x09)")
    flags, service = app.opcode >> 8, app.opcode & 0xFF
    if service not in _TMP_SERVICES:
        raise HrnpFormatError("service", f"{service:#04x} is not a TMP text service")
    group = service in (TMP_GROUP, TMP_GROUP_ACK)
    ack = service in (TMP_PRIVATE_ACK, TMP_GROUP_ACK)
    data, at = app.payload, 0
    option_len = None
    if flags & TMP_FLAG_OPTION:
        if len(data) < 2:
            raise HrnpLengthError("text", "no option length")
        option_len, at = int.from_bytes(data[:2], "big"), 2
    end = len(data) - (option_len or 0)
    fixed = 8 if service == TMP_GROUP_ACK else 12
    if end < at + fixed + (1 if ack else 0):
        raise HrnpLengthError("text", f"{len(data)} payload bytes are too few", len(data))
    request_id = int.from_bytes(data[at : at + 4], "big")
    dest_subnet, destination = data[at + 4], int.from_bytes(data[at + 5 : at + 8], "big")
    source: int | None = None
    src_subnet = DEFAULT_SUBNET
    if fixed == 12:
        src_subnet, source = data[at + 8], int.from_bytes(data[at + 9 : at + 12], "big")
    at += fixed
    option = None if option_len is None else bytes(data[end:])
    ack_flag = bool(flags & TMP_FLAG_ACK)
    if ack:
        if end != at + 1:
            raise HrnpLengthError("text", f"{end - at} bytes where an ack has a result byte",
                                  len(data))
        return TextAck(request_id, destination, data[at], source, group=group,
                       ack_flag=ack_flag, option=option, destination_subnet=dest_subnet,
                       source_subnet=src_subnet)
    raw = bytes(data[at:end])
    if len(raw) % 2:
        raise HrnpTextError(f"{len(raw)} bytes of UTF-16 is an odd count", len(raw) - 1)
    try:
        text = raw.decode("utf-16-le")
    except UnicodeDecodeError as exc:
        raise HrnpTextError(f"bad UTF-16LE: {exc.reason}", exc.start) from exc
    assert source is not None  # every text service but the group ack has a source
    return TextMessage(request_id, destination, source, text, group=group, ack_flag=ack_flag,
                       option=option, destination_subnet=dest_subnet, source_subnet=src_subnet)



def decode_text_data(payload: bytes) -> tuple[TextMessage | TextAck, bool] | None:
    """The text message or ack in a DATA packet's payload and whether it asks for a reliable
    answer, or None when the payload is another HDAP service (radio control, location, ...);
    raises only `HrnpError`."""
    app = decode_app(payload)
    if app.service != SERVICE_TEXT:
        return None
    return decode_text(app), app.reliable

# ---------------------------------------------------------------------------- text capacity


@dataclass(frozen=True, slots=True)
class TextCapacity:
    """UTF-16 code units (one per Chinese or ASCII character, two outside the BMP) and bytes."""

    units: int
    bytes: int


def text_capacity(*, max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> TextCapacity:
    """How many UTF-16 characters / bytes fit one text message of at most `max_text_bytes`."""
    if max_text_bytes < 0:
        raise ValueError("max_text_bytes must not be negative")
    return TextCapacity(max_text_bytes // 2, max_text_bytes // 2 * 2)
