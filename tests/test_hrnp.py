"""HRNP / HDAP / TMP codec: public captures and worked vectors, round trips, bad input, stream."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import ProtocolError
from protocols.hrnp import (
    ACCEPTED_VERSIONS,
    DEFAULT_MAX_PACKET_LEN,
    HEADER_LEN,
    NEED_DATA,
    SERVICE_LOCATION,
    SERVICE_RCP,
    SERVICE_TEXT,
    AppMessage,
    HrnpChecksumError,
    HrnpDecoder,
    HrnpError,
    HrnpFormatError,
    HrnpLengthError,
    HrnpOpcode,
    HrnpPacket,
    HrnpTextError,
    app_checksum,
    decode_app,
    decode_packet,
    encode_app,
    encode_packet,
    hrnp_checksum,
)
from protocols.hrnp_text import (
    TextAck,
    TextCapacity,
    TextMessage,
    TextResult,
    decode_text,
    encode_text,
    text_capacity,
)
from tests.helpers import frames_and_errors, frames_from_chunks, garbage_between, mutate

# Captures from real Hytera radios, published as test vectors of OK-DMR/ok-dmrlib
# (okdmr/tests/dmrlib/hytera/pdu/test_hrnp.py, test_hdap.py, test_tmp.py).
CONNECT = bytes.fromhex("7e0400fe20100000000c60e1")
CONNECT_V3 = bytes.fromhex("7e0300fe20100000000c60e2")
ACCEPT = bytes.fromhex("7e0400fd10200000000c70d2")
RCP_REQUEST = bytes.fromhex("7e0400002010000100189b6002040005006400000001c403")
RCP_REPLY = bytes.fromhex("7e040000102000010019d6240204800600000f690600012903")  # odd: 25
# A 225-byte RCP reply whose checksum ok-dmrlib's sum (no end-around carry, +1) calls wrong;
# the RFC 1071 sum accepts it.
LONG_REPLY = bytes.fromhex(
    "7e0400001020000300e1c65702d482ce00000f6906000200440039002e00300030002e00300037002e00320031"
    "0030002e0069004d000000410039002e00300030002e00300038002e003300300038002e0069004d0000004f00"
    "4b00300044004d0052000000000000000000000000000000000000000000520044003900380035002d00300030"
    "003000300030003000300030002d003000300030003000300030002d00550031002d0030002d00460000000000"
    "0000000031003200330032003000410030003300310032000000000000000000000000000f6906000000001b03")
TMP_TEXT = bytes.fromhex(
    "0980a10022000000010a01b2070a03640e4f004c004900560045005200200054004500530054007a03")
TMP_ACK = bytes.fromhex("0980a2000d000000010a01b2070a030000003103")
TMP_ACK_OPTION = bytes.fromhex("09c0a200120003000000020a01b2070a03000000010203e203")

# Worked by hand: "燃气" (U+71C3 U+6C14, UTF-16LE C3 71 14 6C) from radio 2002 (0x0007D2) to
# radio 1001 (0x0003E9), request id 7, in data packet 5 from the gateway (0x20) to the radio.
#
# HDAP: 09 | 80 A1 | 00 10 | 00 00 00 07 | 0A 00 03 E9 | 0A 00 07 D2 | C3 71 14 6C | cs | 03
#   payload length 0x10 = 4 + 4 + 4 + 4; sum of opcode..payload =
#   80+A1+10+07+0A+03+E9+0A+07+D2+C3+71+14+6C = 0x4C5; ~0xC5 = 0x3A; 0x3A + 0x33 = 0x6D.
# HRNP: 7E 04 00 00 20 10 | 00 05 | 00 23 (12 + 23 = 35) | cs | the 23 HDAP bytes
#   16-bit words, checksum zero, padded: 7E04+0000+2010+0005+0023+0000+0980+A100+1000+0000
#   +070A+0003+E90A+0007+D2C3+7114+6C6D+0300 = 0x3FC1E; fold: FC1E + 3 = FC21; ~ = 03DE.
GAS = TextMessage(7, 1001, 2002, "燃气")
GAS_APP = bytes.fromhex("0980a10010000000070a0003e90a0007d2c371146c6d03")
GAS_PACKET = bytes.fromhex("7e04000020100005002303de") + GAS_APP
# Its data ack from the radio: 7E04+0010+1020+0005+000C = 0x8E45; ~ = 0x71BA.
GAS_DATA_ACK = bytes.fromhex("7e04001010200005000c71ba")
# The radio's "channel busy" ack: 80+A2+0D+07+0A+03+E9+0A+07+D2+04 = 0x313; ~0x13 = 0xEC;
# 0xEC + 0x33 = 0x11F -> 0x1F.
GAS_BUSY = TextAck(7, 1001, TextResult.CHANNEL_BUSY, 2002)
GAS_BUSY_APP = bytes.fromhex("0980a2000d000000070a0003e90a0007d2041f03")


def drain(decoder: HrnpDecoder) -> tuple[list[HrnpPacket], list[HrnpError]]:
    """Every packet and every error the decoder has in it now."""
    return frames_and_errors(decoder.next_packet, HrnpError)


# ---------------------------------------------------------------------------- byte vectors


@pytest.mark.parametrize("wire", [CONNECT, CONNECT_V3, ACCEPT, RCP_REQUEST, RCP_REPLY,
                                  LONG_REPLY])
def test_captured_packets_both_ways(wire: bytes) -> None:
    """Each captured packet decodes, its checksum verifies, and it encodes back byte for byte."""
    packet = decode_packet(wire)
    assert encode_packet(packet) == wire
    assert hrnp_checksum(wire[:10] + b"\x00\x00" + wire[12:]) == int.from_bytes(wire[10:12])


def test_captured_connect_and_accept_fields() -> None:
    """The gateway connects as 0x20 to the radio 0x10 and the radio accepts back."""
    assert decode_packet(CONNECT) == HrnpPacket(HrnpOpcode.CONNECT, 0, 0x20, 0x10)
    assert decode_packet(CONNECT_V3).version == 3
    assert decode_packet(ACCEPT) == HrnpPacket(HrnpOpcode.ACCEPT, 0, 0x10, 0x20)


def test_radio_control_is_little_endian() -> None:
    """Radio control (0x02) writes opcode and length little-endian; its checksum verifies."""
    app = decode_app(decode_packet(RCP_REQUEST).payload)
    assert app == AppMessage(SERVICE_RCP, 0x0004, bytes.fromhex("6400000001"))
    assert app_checksum(RCP_REQUEST[13:-2]) == 0xC4
    assert encode_app(AppMessage(SERVICE_LOCATION, 0xA001, b"\x01"))[1:5] == b"\xa0\x01\x00\x01"


def test_captured_text_message_both_ways() -> None:
    """The captured private message decodes to its ids and text and encodes back exactly."""
    message = decode_text(decode_app(TMP_TEXT))
    assert message == TextMessage(1, 111111, 222222, "OLIVER TEST")  # 10.1.178.7, 10.3.100.14
    assert encode_app(encode_text(message)) == TMP_TEXT


def test_captured_acks_both_ways() -> None:
    """The captured private acks, with and without an option field, decode and encode back."""
    ack = decode_text(decode_app(TMP_ACK))
    assert ack == TextAck(1, 111111, TextResult.OK, 196608)
    assert isinstance(ack, TextAck) and ack.ok
    with_option = decode_text(decode_app(TMP_ACK_OPTION))
    assert with_option == TextAck(2, 111111, 0, 196608, option=b"\x01\x02\x03")
    for wire, decoded in ((TMP_ACK, ack), (TMP_ACK_OPTION, with_option)):
        assert encode_app(encode_text(decoded)) == wire


def test_worked_chinese_message_both_ways() -> None:
    """The hand-worked "燃气" data packet, its data ack and busy ack match byte for byte."""
    assert encode_app(encode_text(GAS)) == GAS_APP
    assert encode_packet(HrnpPacket(HrnpOpcode.DATA, 5, payload=GAS_APP)) == GAS_PACKET
    packet = decode_packet(GAS_PACKET)
    assert decode_text(decode_app(packet.payload)) == GAS
    assert encode_packet(HrnpPacket(HrnpOpcode.DATA_ACK, 5, 0x10, 0x20)) == GAS_DATA_ACK
    assert encode_app(encode_text(GAS_BUSY)) == GAS_BUSY_APP
    assert decode_text(decode_app(GAS_BUSY_APP)) == GAS_BUSY


def test_group_ack_has_no_source() -> None:
    """A group ack (0xB2) carries request id, group and result only."""
    ack = TextAck(9, 500, TextResult.OK, group=True)
    wire = encode_app(encode_text(ack))
    assert wire[1:5] == b"\x80\xb2\x00\x09"  # 4 + 4 + 1 payload bytes
    assert decode_text(decode_app(wire)) == ack
    with pytest.raises(HrnpFormatError):
        TextAck(9, 500, 0, 2002, group=True)


def test_checksum_mismatches_name_both_values() -> None:
    """A wrong checksum at either layer is a HrnpChecksumError with expected and got."""
    with pytest.raises(HrnpChecksumError) as info:
        decode_packet(CONNECT[:10] + b"\x12\x34")
    assert (info.value.layer, info.value.expected, info.value.got) == ("hrnp", 0x60E1, 0x1234)
    with pytest.raises(HrnpChecksumError) as info:
        decode_app(TMP_ACK[:-2] + b"\x00\x03")
    assert (info.value.layer, info.value.expected, info.value.got) == ("app", 0x31, 0)
    assert issubclass(HrnpError, ProtocolError)


def test_bad_utf16_is_a_typed_error() -> None:
    """An odd byte count or a lone surrogate in the text is a HrnpTextError, not Unicode's."""
    payload = GAS_APP[5:-2]  # request id, addresses, C3 71 14 6C
    odd = AppMessage(SERVICE_TEXT, 0x80A1, payload + b"\x41")
    lone = AppMessage(SERVICE_TEXT, 0x80A1, payload[:-2] + b"\x00\xd8")  # U+D800 alone
    for app in (odd, lone):
        with pytest.raises(HrnpTextError):
            decode_text(app)
    with pytest.raises(HrnpTextError):
        TextMessage(1, 2, 3, "\ud800")


@pytest.mark.parametrize("wire, error", [
    (b"", HrnpFormatError),
    (CONNECT[:11], HrnpLengthError),
    (CONNECT[:3] + b"\x42" + CONNECT[4:], HrnpFormatError),  # no such opcode
    (CONNECT[:1] + b"\x09" + CONNECT[2:], HrnpFormatError),  # no such version
    (CONNECT[:9] + b"\x0d" + CONNECT[10:] + b"\x00", HrnpLengthError),  # connect with data
    (RCP_REQUEST + b"\x00", HrnpLengthError),
])
def test_malformed_packets_rejected(wire: bytes, error: type[HrnpError]) -> None:
    """Short, unknown, mislabelled or overlong packets raise the narrow HrnpError."""
    with pytest.raises(error):
        decode_packet(wire)


def test_values_validated_on_construction() -> None:
    """Out-of-range fields are refused when the dataclass is built, as HrnpFormatError."""
    for build in (lambda: HrnpPacket(HrnpOpcode.CONNECT, payload=b"x"),
                  lambda: HrnpPacket(0x42),  # type: ignore[arg-type]
                  lambda: HrnpPacket(HrnpOpcode.DATA, 0x10000),
                  lambda: TextMessage(1, 0x1000000, 2, "x"),
                  lambda: TextMessage(-1, 1, 2, "x"),
                  lambda: AppMessage(0x80, 0)):
        with pytest.raises(HrnpFormatError):
            build()
    with pytest.raises(HrnpFormatError):
        decode_text(AppMessage(SERVICE_LOCATION, 0xA001))


def test_text_capacity_and_limit() -> None:
    """The capacity helper gives UTF-16 units and bytes; encode_text refuses a longer text."""
    assert text_capacity() == TextCapacity(64, 128)
    assert text_capacity(max_text_bytes=21) == TextCapacity(10, 20)
    encode_text(TextMessage(1, 2, 3, "燃" * 10), max_text_bytes=20)
    with pytest.raises(HrnpLengthError):
        encode_text(TextMessage(1, 2, 3, "燃" * 11), max_text_bytes=20)


# ---------------------------------------------------------------------------- round trips

# No deadline: CI is a loaded 2-core box, and these tests check behaviour, not speed.
relaxed = settings(deadline=None)
_IDS = st.integers(0, 0xFFFFFF)
_SUBNETS = st.integers(0, 255)
_OPTIONS = st.none() | st.binary(max_size=8)


@st.composite
def packets(draw: st.DrawFn) -> HrnpPacket:
    opcode = draw(st.sampled_from(HrnpOpcode))
    payload = draw(st.binary(max_size=64)) if opcode is HrnpOpcode.DATA else b""
    return HrnpPacket(opcode, draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 255)),
                      draw(st.integers(0, 255)), payload,
                      draw(st.sampled_from(sorted(ACCEPTED_VERSIONS))), draw(st.integers(0, 255)))


apps = st.builds(AppMessage, st.integers(0, 0x7F), st.integers(0, 0xFFFF),
                 st.binary(max_size=64), st.booleans())


@st.composite
def texts(draw: st.DrawFn) -> TextMessage:
    return TextMessage(draw(st.integers(0, 0xFFFFFFFF)), draw(_IDS), draw(_IDS),
                       draw(st.text(max_size=40)), group=draw(st.booleans()),
                       ack_flag=draw(st.booleans()), option=draw(_OPTIONS),
                       destination_subnet=draw(_SUBNETS), source_subnet=draw(_SUBNETS))


@st.composite
def acks(draw: st.DrawFn) -> TextAck:
    group = draw(st.booleans())
    return TextAck(draw(st.integers(0, 0xFFFFFFFF)), draw(_IDS), draw(st.integers(0, 255)),
                   None if group else draw(_IDS), group=group, ack_flag=draw(st.booleans()),
                   option=draw(_OPTIONS), destination_subnet=draw(_SUBNETS),
                   source_subnet=10 if group else draw(_SUBNETS))


@relaxed
@given(packets())
def test_packet_round_trip(packet: HrnpPacket) -> None:
    """decode_packet(encode_packet(p)) == p for every opcode."""
    wire = encode_packet(packet)
    assert len(wire) == int.from_bytes(wire[8:10]) == HEADER_LEN + len(packet.payload)
    assert decode_packet(wire) == packet


@relaxed
@given(apps)
def test_app_round_trip(app: AppMessage) -> None:
    """decode_app(encode_app(m)) == m for any service, both byte orders."""
    wire = encode_app(app)
    assert wire[-1] == 0x03 and len(wire) == len(app.payload) + 7
    assert decode_app(wire) == app


@relaxed
@given(texts() | acks(), st.booleans())
def test_text_round_trip_through_all_layers(message: TextMessage | TextAck, reliable: bool) -> None:
    """A text message or ack survives TMP, HDAP and HRNP encoding and decoding."""
    app = encode_text(message, reliable=reliable)
    assert decode_text(app) == message
    wire = encode_packet(HrnpPacket(HrnpOpcode.DATA, 1, payload=encode_app(app)))
    decoded = decode_app(decode_packet(wire, max_packet_len=0xFFFF).payload)
    assert decoded.reliable == reliable
    assert decode_text(decoded) == message


# ---------------------------------------------------------------------------- garbage


@relaxed
@given(st.binary(max_size=300))
def test_garbage_raises_only_hrnp_errors(data: bytes) -> None:
    """Random bytes, bare or behind plausible headers, raise nothing but HrnpError."""
    header = encode_packet(HrnpPacket(HrnpOpcode.DATA, payload=data))[:12]
    for decode in (decode_packet, decode_app, lambda d: decode_text(decode_app(d))):
        for candidate in (data, header + data, b"\x09" + data):
            try:
                decode(candidate)
            except HrnpError:
                pass
    for opcode in (0x80A1, 0xC0A1, 0x80A2, 0xC0B2, 0x00B1):
        try:
            decode_text(AppMessage(SERVICE_TEXT, opcode, data))
        except HrnpError:
            pass
    decoder = HrnpDecoder()
    decoder.feed(data + CONNECT + data + header + data)
    drain(decoder)


_VALID = [CONNECT, RCP_REPLY, GAS_PACKET, GAS_APP, TMP_ACK_OPTION]


@relaxed
@given(st.sampled_from(_VALID), st.data())
def test_mutated_frames_raise_only_hrnp_errors(wire: bytes, data: st.DataObject) -> None:
    """A good frame with bytes changed, cut or added gives a result or HrnpError, nothing else."""
    mutated = mutate(wire, data)
    for decode in (decode_packet, decode_app, lambda d: decode_text(decode_app(d))):
        try:
            decode(mutated)
        except HrnpError:
            pass


# ---------------------------------------------------------------------------- stream decoder


@relaxed
@given(
    st.lists(packets(), min_size=1, max_size=5),
    st.lists(st.binary(max_size=20).map(lambda b: b.replace(b"\x7e", b"")), min_size=6,
             max_size=6),
    st.lists(st.integers(1, 40), min_size=1, max_size=30),
)
def test_stream_decoder_over_random_chunks(packets_: list[HrnpPacket], garbage: list[bytes],
                                           sizes: list[int]) -> None:
    """Packets with garbage between them, fed in random chunks, come out whole and in order."""
    stream, junk = garbage_between([encode_packet(x) for x in packets_], garbage)
    decoder = HrnpDecoder()
    got = frames_from_chunks(decoder, decoder.next_packet, HrnpError, stream, sizes)
    assert got == packets_
    assert decoder.discarded == junk and decoder.errors == 0


def test_stream_decoder_byte_by_byte() -> None:
    """One byte at a time, the decoder answers NEED_DATA until the last byte, then the packet."""
    decoder = HrnpDecoder()
    for byte in GAS_PACKET[:-1]:
        decoder.feed(bytes([byte]))
        assert decoder.next_packet() is NEED_DATA
    decoder.feed(GAS_PACKET[-1:])
    assert decoder.next_packet() == decode_packet(GAS_PACKET)
    assert decoder.next_packet() is NEED_DATA and decoder.buffered == 0


def test_stream_decoder_resynchronises() -> None:
    """Noise, a stray 0x7E, a bad checksum and a cut-off packet cost errors; good ones survive."""
    decoder = HrnpDecoder()
    bad = CONNECT[:10] + b"\x00\x00"
    cut = GAS_PACKET[:20]
    decoder.feed(b"\r\nnoise\x7e\x7e" + CONNECT + bad + cut + ACCEPT + GAS_PACKET)
    packets_, errors = drain(decoder)
    assert packets_ == [decode_packet(p) for p in (CONNECT, ACCEPT, GAS_PACKET)]
    assert [type(e) for e in errors] == [HrnpFormatError, HrnpFormatError, HrnpChecksumError,
                                         HrnpChecksumError]
    assert decoder.errors == 4 and decoder.discarded > len(bad) + len(cut)
    assert decoder.buffered == 0


def test_stream_decoder_rejects_huge_length_at_once() -> None:
    """A declared length over the limit fails on the header instead of waiting for it."""
    decoder = HrnpDecoder()
    decoder.feed(bytes.fromhex("7e04000020100001ffff"))
    with pytest.raises(HrnpLengthError) as info:
        decoder.next_packet()
    assert info.value.declared == 0xFFFF > DEFAULT_MAX_PACKET_LEN


def test_stream_decoder_buffer_is_bounded() -> None:
    """Bytes fed without draining never hold more than the buffer bound plus the last feed."""
    decoder = HrnpDecoder(max_packet_len=64, max_buffer=256)
    for _ in range(100):
        decoder.feed(b"\x7e\x04" * 50)
    assert decoder.buffered <= 256 + 100
    assert decoder.discarded >= 100 * 100 - 256 - 100


def test_one_large_read_loses_no_packet() -> None:
    """A read holding more packets than the buffer bound keeps every one of them."""
    decoder = HrnpDecoder(max_packet_len=64, max_buffer=64)
    decoder.feed(ACCEPT * 10)
    assert drain(decoder) == ([decode_packet(ACCEPT)] * 10, [])


def test_skip_partial_releases_a_packet_held_by_a_stray_start() -> None:
    """A stray 0x7E with a plausible header holds a packet until the I/O loop skips it."""
    decoder = HrnpDecoder()
    decoder.feed(bytes.fromhex("7e040000201000010101") + ACCEPT)  # a DATA of 257 bytes
    assert decoder.next_packet() is NEED_DATA
    assert decoder.skip_partial()
    assert drain(decoder) == ([decode_packet(ACCEPT)], [])
    assert not decoder.skip_partial() and decoder.errors == 1

