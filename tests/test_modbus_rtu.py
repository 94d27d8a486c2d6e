"""Modbus RTU codec: byte vectors both ways, the stream decoder, round-trips, garbage, timing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import ProtocolError
from protocols.modbus_pdu import (
    ReadRequest,
    WriteMultipleRequest,
    WriteSingleRequest,
    decode_read_response,
    decode_request,
    encode_exception,
    encode_read_response,
    encode_request,
    encode_write_response,
)
from protocols.modbus_rtu import (
    NEED_DATA,
    CrcMismatchError,
    Direction,
    FrameError,
    PduError,
    RtuDecoder,
    RtuEncodeError,
    RtuFrame,
    UnknownFunctionError,
    crc16,
    decode_frame,
    encode_frame,
    frame_length,
    inter_frame_gap_s,
)


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# (address, request, frame bytes): vectors from the Modbus over Serial Line spec's CRC example
# and from captures of real slaves.
REQUEST_VECTORS = [
    (1, ReadRequest(3, 0, 10), "01 03 00 00 00 0A C5 CD"),
    (17, ReadRequest(3, 0x006B, 3), "11 03 00 6B 00 03 76 87"),
    (1, ReadRequest(4, 0, 1), "01 04 00 00 00 01 31 CA"),
    (1, ReadRequest(1, 0, 8), "01 01 00 00 00 08 3D CC"),
    (1, WriteSingleRequest(5, 0, 1), "01 05 00 00 FF 00 8C 3A"),
    (1, WriteSingleRequest(6, 1, 3), "01 06 00 01 00 03 98 0B"),
    (1, WriteMultipleRequest(16, 1, (0x000A, 0x0102)), "01 10 00 01 00 02 04 00 0A 01 02 92 30"),
]


@pytest.mark.parametrize(("address", "request_", "wire"), REQUEST_VECTORS)
def test_request_vectors_both_ways(address: int, request_: ReadRequest, wire: str) -> None:
    """Known requests encode to the exact bytes and those bytes decode back to them."""
    assert encode_frame(address, encode_request(request_)) == h(wire)
    frame = decode_frame(h(wire))
    assert frame.address == address
    assert decode_request(frame.pdu) == request_


def test_crc_is_sent_low_byte_first() -> None:
    """CRC-16/MODBUS of `01 03 00 00 00 0A` is 0xCDC5, carried as C5 CD."""
    assert crc16(h("01 03 00 00 00 0A")) == 0xCDC5
    assert crc16(b"123456789") == 0x4B37  # the catalogue check value of CRC-16/MODBUS


def test_read_response_vectors() -> None:
    """Register and bit responses: byte count, big-endian registers, bits LSB first."""
    regs = encode_frame(1, encode_read_response(3, [0x022B, 0x0000, 0x0064]))
    assert regs == h("01 03 06 02 2B 00 00 00 64") + crc16(h("01 03 06 02 2B 00 00 00 64")).to_bytes(2, "little")
    assert decode_read_response(decode_frame(regs).pdu, 3, 3) == [0x022B, 0, 0x64]
    bits = [1, 0, 1, 1, 0, 0, 1, 1, 1, 1]  # §6.1 example shape: two bytes, second padded
    pdu = encode_read_response(1, bits)
    assert pdu == h("01 02 CD 03")
    assert decode_read_response(pdu, 1, 10) == bits


def test_exception_and_write_responses() -> None:
    """An exception sets bit 7 of the function; writes echo address and quantity."""
    frame = encode_frame(1, encode_exception(3, 2))
    assert frame == h("01 83 02 C0 F1")
    decoded = decode_frame(frame)
    assert decoded.is_exception and decoded.exception_code == 2 and decoded.function == 0x83
    assert encode_write_response(WriteMultipleRequest(16, 1, (1, 2))) == h("10 00 01 00 02")
    assert encode_write_response(WriteSingleRequest(6, 1, 3)) == h("06 00 01 00 03")


def test_decoder_splits_a_stream_across_reads() -> None:
    """Bytes arriving in pieces give NEED_DATA until a frame is whole, then the frames in order."""
    stream = h("01 03 06 02 2B 00 00 00 64") + b"\x00\x00"
    stream = stream[:-2] + crc16(stream[:-2]).to_bytes(2, "little") + encode_frame(2, encode_exception(4, 4))
    dec = RtuDecoder(Direction.RESPONSE)
    got: list[RtuFrame] = []
    for b in stream:
        dec.feed(bytes([b]))
        while (f := dec.next_frame()) is not NEED_DATA:
            assert isinstance(f, RtuFrame)
            got.append(f)
    assert [(f.address, f.function) for f in got] == [(1, 3), (2, 0x84)]
    assert dec.buffered == 0


def test_decoder_drops_a_bad_crc_frame_and_continues() -> None:
    """A corrupted frame raises CrcMismatchError once; the good frame after it still decodes."""
    bad = bytearray(h("01 03 00 00 00 0A C5 CD"))
    bad[-1] ^= 0xFF
    dec = RtuDecoder(Direction.REQUEST)
    dec.feed(bytes(bad) + h("11 03 00 6B 00 03 76 87"))
    with pytest.raises(CrcMismatchError) as info:
        dec.next_frame()
    assert (info.value.expected, info.value.got) == (0xCDC5, 0x32C5)
    frame = dec.next_frame()
    assert isinstance(frame, RtuFrame) and frame.address == 17
    assert dec.next_frame() is NEED_DATA


def test_decoder_hunts_past_garbage() -> None:
    """Bytes that cannot start a frame raise FrameError one byte at a time, then sync."""
    dec = RtuDecoder(Direction.REQUEST)
    dec.feed(h("00 FF") + h("01 03 00 00 00 0A C5 CD"))
    errors = 0
    while True:
        try:
            frame = dec.next_frame()
        except FrameError:
            errors += 1
            continue
        break
    assert errors >= 1 and isinstance(frame, RtuFrame) and frame.pdu == h("03 00 00 00 0A")


def test_unknown_function_alone_is_still_a_frame() -> None:
    """A CRC-valid frame with a function the codec cannot size is returned when alone."""
    wire = encode_frame(1, h("2B 0E 01 00"))  # read device identification (§6.21)
    dec = RtuDecoder(Direction.REQUEST)
    dec.feed(wire)
    frame = dec.next_frame()
    assert isinstance(frame, RtuFrame) and frame.function == 0x2B
    with pytest.raises(UnknownFunctionError):
        decode_request(frame.pdu)


def test_flush_drops_a_partial_frame() -> None:
    """After a silent interval the partial bytes are dropped and returned."""
    dec = RtuDecoder(Direction.REQUEST)
    dec.feed(h("01 03 00"))
    assert dec.next_frame() is NEED_DATA
    assert dec.flush() == h("01 03 00") and dec.buffered == 0


def test_frame_lengths() -> None:
    """Lengths come from the function code and byte counts, per direction."""
    assert frame_length(h("01 03"), Direction.REQUEST) == 8
    assert frame_length(h("01 03"), Direction.RESPONSE) is None
    assert frame_length(h("01 03 06"), Direction.RESPONSE) == 11
    assert frame_length(h("01 83"), Direction.RESPONSE) == 5
    assert frame_length(h("01 10 00 01 00 02 04"), Direction.REQUEST) == 13
    assert frame_length(h("01 10"), Direction.RESPONSE) == 8
    with pytest.raises(UnknownFunctionError):
        frame_length(h("01 63"), Direction.REQUEST)


def test_bad_requests_raise_pdu_errors() -> None:
    """Quantities past §6 limits and inconsistent byte counts are PduError (exception 3)."""
    with pytest.raises(PduError):
        decode_request(h("03 00 00 00 7E"))  # 126 registers
    with pytest.raises(PduError):
        decode_request(h("05 00 00 12 34"))  # coil value neither FF00 nor 0000
    with pytest.raises(PduError):
        decode_request(h("10 00 01 00 02 03 00 0A 01"))  # byte count 3 for 2 registers
    with pytest.raises(RtuEncodeError):
        encode_request(ReadRequest(3, 0, 0))
    with pytest.raises(RtuEncodeError):
        encode_frame(256, h("03"))


def test_inter_frame_gap_follows_the_baud_rate() -> None:
    """t3.5 is 3.5 character times up to 19200 baud and a fixed 1.75 ms above (§2.5.1.1)."""
    assert inter_frame_gap_s(9600) == pytest.approx(3.5 * 10 / 9600)  # 8N1: 10 bits a char
    assert inter_frame_gap_s(9600, 8, "E", 1) == pytest.approx(3.5 * 11 / 9600)
    assert inter_frame_gap_s(19200, 8, "N", 2) == pytest.approx(3.5 * 11 / 19200)
    assert inter_frame_gap_s(38400) == inter_frame_gap_s(115200) == 0.00175
    with pytest.raises(RtuEncodeError):
        inter_frame_gap_s(9600, 9, "N", 1)


addresses = st.integers(0, 247)
requests = st.one_of(
    st.builds(ReadRequest, st.sampled_from([1, 2]), st.integers(0, 60000), st.integers(1, 2000)),
    st.builds(ReadRequest, st.sampled_from([3, 4]), st.integers(0, 60000), st.integers(1, 125)),
    st.builds(WriteSingleRequest, st.just(5), st.integers(0, 65535), st.integers(0, 1)),
    st.builds(WriteSingleRequest, st.just(6), st.integers(0, 65535), st.integers(0, 65535)),
    st.builds(WriteMultipleRequest, st.just(15), st.integers(0, 60000),
              st.lists(st.integers(0, 1), min_size=1, max_size=1968).map(tuple)),
    st.builds(WriteMultipleRequest, st.just(16), st.integers(0, 60000),
              st.lists(st.integers(0, 65535), min_size=1, max_size=123).map(tuple)),
)


@given(addresses, requests)
def test_request_round_trip(address: int, request_: ReadRequest) -> None:
    """Any valid request survives encode → stream decoder → decode_request."""
    dec = RtuDecoder(Direction.REQUEST)
    dec.feed(encode_frame(address, encode_request(request_)))
    frame = dec.next_frame()
    assert isinstance(frame, RtuFrame) and frame.address == address
    assert decode_request(frame.pdu) == request_


@given(st.sampled_from([1, 2, 3, 4]), st.data())
def test_read_response_round_trip(function: int, data: st.DataObject) -> None:
    """Read responses decode back to the values (bits 0/1, registers 0..65535)."""
    top, size = (1, 2000) if function in (1, 2) else (65535, 125)
    values = data.draw(st.lists(st.integers(0, top), min_size=1, max_size=size))
    dec = RtuDecoder(Direction.RESPONSE)
    dec.feed(encode_frame(9, encode_read_response(function, values)))
    frame = dec.next_frame()
    assert isinstance(frame, RtuFrame)
    assert decode_read_response(frame.pdu, function, len(values)) == values


@given(st.binary(max_size=600), st.sampled_from(list(Direction)))
def test_garbage_raises_only_codec_errors(data: bytes, direction: Direction) -> None:
    """Random bytes make the decoder raise only ProtocolError subclasses, and it terminates."""
    dec = RtuDecoder(direction)
    dec.feed(data)
    for _ in range(len(data) + 1):
        try:
            frame = dec.next_frame()
        except ProtocolError:
            continue
        if frame is NEED_DATA:
            break
        assert isinstance(frame, RtuFrame)
        try:
            decode_request(frame.pdu)
        except ProtocolError:
            pass
    else:
        pytest.fail("decoder did not reach NEED_DATA")
