"""HJ 212-2017 codec: published byte vectors, round trips, bad input, and the stream decoder."""

from __future__ import annotations

import string
from datetime import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import ProtocolError
from protocols.hj212 import (
    CN_REALTIME,
    CN_SET_RTD_INTERVAL,
    FACTORS,
    HUMIDITY,
    NEED_DATA,
    TEMPERATURE,
    WIND_DIRECTION,
    WIND_SPEED,
    Hj212CrcError,
    Hj212Data,
    Hj212Decoder,
    Hj212Error,
    Hj212Factor,
    Hj212FormatError,
    Hj212Frame,
    Hj212LengthError,
    decode_frame,
    encode_frame,
    hj212_crc,
    make_qn,
)
from tests.helpers import frames_and_errors, frames_from_chunks

# The sample of HJ 212-2017 Appendix A: data segment, length 0101, CRC 1C80. The CRC is
# confirmed by several independent public implementations (C, C#, Java, JavaScript, Go) that
# all test against this segment.
SAMPLE_SEGMENT = (b"QN=20160801085857223;ST=32;CN=1062;PW=100000;MN=010000A8900016F000169DC0;"
                  b"Flag=5;CP=&&RtdInterval=30&&")
SAMPLE_FRAME = b"##0101" + SAMPLE_SEGMENT + b"1C80\r\n"
SAMPLE = Hj212Frame("20160801085857223", "32", CN_SET_RTD_INTERVAL, "100000",
                    "010000A8900016F000169DC0", 5, Hj212Data(params=(("RtdInterval", "30"),)))

# A real-time upload from a water-pollution-source station, published as the input of a public
# HJ 212 parser example (tracy4262/hptpd App.java); its length and CRC were made by other code.
STATION_FRAME = (
    b"##0354QN=20230803171130538;ST=31;CN=2011;PW=123456;MN=88888880000001234567;Flag=5;CP=&&"
    b"DataTime=20230803165500;w01001-Rtd=0.000,w01001-Flag=N;w21003-Rtd=0.000,w21003-Flag=N;"
    b"w01018-Rtd=0.000,w01018-Flag=N;e01002-Rtd=0.000,e01002-Flag=N;w01010-Rtd=0.000,"
    b"w01010-Flag=N;e01001-Rtd=0.000,e01001-Flag=N;w01003-Rtd=0.000,w01003-Flag=N;"
    b"w21011-Rtd=0.000,w21011-Flag=N&&A141\r\n"
)


def modbus_crc(data: bytes) -> int:
    """CRC-16/MODBUS, written independently of the codec, to show the two differ."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def wrap(segment: bytes) -> bytes:
    """A frame around `segment` with the right length and CRC, to reach the segment parser."""
    return b"##%04d%s%04X\r\n" % (len(segment), segment, hj212_crc(segment))


def drain(decoder: Hj212Decoder) -> tuple[list[Hj212Frame], list[Hj212Error]]:
    """Every frame and every error the decoder has in it now."""
    return frames_and_errors(decoder.next_frame, Hj212Error)


# ---------------------------------------------------------------------------- byte vectors


def test_crc_of_standard_sample_and_not_modbus():
    """The HJ 212 CRC of the Appendix A sample is 1C80; a Modbus CRC of it is not."""
    assert modbus_crc(b"123456789") == 0x4B37  # the catalogue check value of CRC-16/MODBUS
    assert hj212_crc(SAMPLE_SEGMENT) == 0x1C80
    assert modbus_crc(SAMPLE_SEGMENT) == 0x0759
    assert hj212_crc(b"") == 0xFFFF


def test_standard_sample_both_ways():
    """The Appendix A sample frame decodes to its fields and encodes back byte for byte."""
    frame = decode_frame(SAMPLE_FRAME)
    assert frame == SAMPLE
    assert frame.needs_ack and frame.version == 1  # Flag=5: A bit and version 1 (HJ 212-2017)
    assert encode_frame(SAMPLE) == SAMPLE_FRAME


def test_published_station_frame_decodes():
    """A station's real-time upload with eight factors decodes, and survives a round trip."""
    frame = decode_frame(STATION_FRAME)
    assert (frame.st, frame.cn, frame.mn) == ("31", CN_REALTIME, "88888880000001234567")
    assert frame.cp.data_time == datetime(2023, 8, 3, 16, 55)
    assert [f.code for f in frame.cp.factors][:3] == ["w01001", "w21003", "w01018"]
    assert frame.cp.factor("w21011") == Hj212Factor("w21011", rtd=0.0, flag="N")
    # values are numbers, so "0.000" comes back as "0.0": equal frames, shorter bytes
    assert decode_frame(encode_frame(frame)) == frame


def test_forest_station_frame_layout():
    """A weather-station frame puts DataTime first, `;` between factors, `,` inside one."""
    frame = Hj212Frame(
        make_qn(datetime(2024, 6, 1, 12, 0, 5, 123000)), "22", CN_REALTIME, "123456", "FS0001",
        4, Hj212Data(datetime(2024, 6, 1, 12, 0), (
            Hj212Factor(TEMPERATURE.code, rtd=12.3, flag="N"),
            Hj212Factor(HUMIDITY.code, rtd=65.0, flag="N"),
            Hj212Factor(WIND_SPEED.code, avg=3.5, min=0.2, max=7.25, flag="N"),
            Hj212Factor(WIND_DIRECTION.code, rtd=270, flag="M"),
        )))
    wire = encode_frame(frame)
    segment = (b"QN=20240601120005123;ST=22;CN=2011;PW=123456;MN=FS0001;Flag=4;CP=&&"
               b"DataTime=20240601120000;a01001-Rtd=12.3,a01001-Flag=N;"
               b"a01002-Rtd=65.0,a01002-Flag=N;"
               b"a01007-Avg=3.5,a01007-Min=0.2,a01007-Max=7.25,a01007-Flag=N;"
               b"a01008-Rtd=270,a01008-Flag=M&&")
    assert wire == wrap(segment)
    assert decode_frame(wire) == frame and not frame.needs_ack
    assert FACTORS["a01008"].name_zh == "风向"


def test_tiny_values_have_no_exponent():
    """Numbers go out as plain decimals, never `1e-07`, and come back equal."""
    frame = Hj212Frame(None, "22", "2011", "p", "m", None,
                       Hj212Data(factors=(Hj212Factor("a01001", rtd=1e-7, max=-2.5e15),)))
    wire = encode_frame(frame)
    assert b"a01001-Rtd=0.0000001,a01001-Max=-2500000000000000.0" in wire
    assert b"e" not in wire.split(b"CP=")[1]
    assert decode_frame(wire) == frame


def test_lean_frame_without_qn_and_flag():
    """A 2005-style frame with neither QN nor Flag decodes with both None."""
    segment = (b"ST=32;CN=2011;PW=123456;MN=LD130133000015;CP=&&DataTime=20160824003817;"
               b"B01-Rtd=36.91&&")
    frame = decode_frame(wrap(segment))
    assert frame.qn is None and frame.flag is None and frame.version is None
    assert frame.cp.factor("B01") == Hj212Factor("B01", rtd=36.91)
    assert encode_frame(frame) == wrap(segment)


def test_lower_case_crc_accepted():
    """Lower-case CRC hex digits from a sloppy station still check."""
    assert decode_frame(SAMPLE_FRAME.replace(b"1C80", b"1c80")) == SAMPLE


# ---------------------------------------------------------------------------- errors


def test_wrong_crc_rejected():
    """A frame whose CRC does not match its data raises Hj212CrcError with both values."""
    with pytest.raises(Hj212CrcError) as info:
        decode_frame(SAMPLE_FRAME.replace(b"1C80", b"1C81"))
    assert (info.value.expected, info.value.got) == (0x1C80, 0x1C81)
    flipped = SAMPLE_FRAME.replace(b"PW=100000", b"PW=100001")
    with pytest.raises(Hj212CrcError):
        decode_frame(flipped)
    assert isinstance(info.value, ProtocolError)


@pytest.mark.parametrize("frame", [
    b"##0100" + SAMPLE_SEGMENT + b"1C80\r\n",  # declared one byte short
    b"##0102" + SAMPLE_SEGMENT + b"1C80\r\n",  # declared one byte long
    b"##01a1" + SAMPLE_SEGMENT + b"1C80\r\n",  # not digits
    b"##1025" + b"x" * 1025 + b"0000\r\n",  # over the standard's 1024 bytes
    b"##01",
])
def test_bad_length_rejected(frame: bytes):
    """A length field that is not four digits, too large, or wrong raises Hj212LengthError."""
    with pytest.raises(Hj212LengthError):
        decode_frame(frame)


def test_encode_refuses_oversized_segment():
    """Encoding a data segment over the limit raises Hj212LengthError unless allowed."""
    params = tuple((f"P{i}", "x" * 50) for i in range(25))
    frame = Hj212Frame(None, "22", "2011", "p", "m", None, Hj212Data(params=params))
    with pytest.raises(Hj212LengthError):
        encode_frame(frame)
    assert decode_frame(encode_frame(frame, max_data_len=2000), max_data_len=2000) == frame


@pytest.mark.parametrize(("segment", "field"), [
    (b"ST=32;CN=2011;PW=1;CP=&&&&", "MN"),
    (b"ST=32;ST=31;CN=2011;PW=1;MN=m;CP=&&&&", "ST"),
    (b"ST=32;XX=1;CN=2011;PW=1;MN=m;CP=&&&&", "XX"),
    (b"QN=2016080108585722x;ST=32;CN=2011;PW=1;MN=m;CP=&&&&", "QN"),
    (b"ST=32;CN=2011;PW=1;MN=m;Flag=256;CP=&&&&", "Flag"),
    (b"ST=32;CN=2011;PW=1;MN=m;CP=&&DataTime=20231301000000&&", "DataTime"),
    (b"ST=32;CN=2011;PW=1;MN=m;CP=&&a01001-Rtd=12,3&&", "CP"),
    (b"ST=32;CN=2011;PW=1;MN=m;CP=&&a01001-Rtd=abc&&", "a01001-Rtd"),
    (b"ST=32;CN=2011;PW=1;MN=m;CP=&&a01001-Rtd=1;a01001-Rtd=2&&", "a01001-Rtd"),
    (b"ST=32;CN=2011;PW=1;MN=m;CP=&&a01001-Rtd=1", "CP"),
    (b"ST=32;CN=2011;PW=1;MN=m;", "CP"),
    (b"ST=32;CN=2011;PW=1;MN=m\xff;CP=&&&&", "data"),
])
def test_malformed_segment_names_field(segment: bytes, field: str):
    """A well-framed segment with a bad field raises Hj212FormatError naming that field."""
    with pytest.raises(Hj212FormatError) as info:
        decode_frame(wrap(segment))
    assert info.value.field == field


def test_frame_fields_validated_on_construction():
    """A frame that could not be sent (separator in MN, factor without values) is refused."""
    with pytest.raises(Hj212FormatError, match="MN"):
        Hj212Frame(None, "22", "2011", "p", "a;b", None, Hj212Data())
    with pytest.raises(Hj212FormatError, match="a01001"):
        Hj212Factor("a01001")
    with pytest.raises(Hj212FormatError, match="DataTime"):
        Hj212Data(datetime(2024, 1, 1, 0, 0, 0, 500))
    with pytest.raises(Hj212FormatError):
        Hj212Factor("a01001", rtd=float("nan"))


@given(st.binary(max_size=300))
def test_garbage_raises_only_hj212_errors(data: bytes):
    """Random bytes, bare or behind a plausible header, raise nothing but Hj212Error."""
    for candidate in (data, b"##%04d" % len(data) + data, wrap(data)):
        try:
            decode_frame(candidate)
        except Hj212Error:
            pass
    decoder = Hj212Decoder()
    decoder.feed(data + b"##0012" + data)
    drain(decoder)


@given(st.integers(0, len(SAMPLE_FRAME) - 1), st.integers(0, 255))
def test_corrupted_sample_raises_only_hj212_errors(index: int, byte: int):
    """Any single corrupted byte of a good frame gives a frame or an Hj212Error, nothing else."""
    corrupted = bytearray(SAMPLE_FRAME)
    corrupted[index] = byte
    try:
        decode_frame(bytes(corrupted))
    except Hj212Error:
        pass


# ---------------------------------------------------------------------------- round trips

_TEXT = st.text(string.ascii_letters + string.digits + "-_.#@ 中文", min_size=1, max_size=12)
_NAMES = st.from_regex(r"[A-Za-z][A-Za-z0-9]{0,7}", fullmatch=True)
_NUMBERS = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False).filter(
    lambda x: x == 0 or abs(x) >= 1e-9)


@st.composite
def factors(draw: st.DrawFn) -> Hj212Factor:
    values = {name: draw(st.none() | _NUMBERS) for name in ("rtd", "avg", "min", "max", "cou")}
    flag = draw(st.none() | st.sampled_from("NFMSDCTB"))
    extra = draw(st.dictionaries(
        _NAMES.filter(lambda n: n not in {"Rtd", "Avg", "Min", "Max", "Cou", "Flag"}), _TEXT,
        max_size=2))
    if flag is None and not extra and all(v is None for v in values.values()):
        flag = "N"
    code = draw(st.from_regex(r"[a-z][0-9]{5}|[A-Z][0-9]{2}", fullmatch=True))
    return Hj212Factor(code, flag=flag, extra=tuple(extra.items()), **values)


@st.composite
def frames(draw: st.DrawFn) -> Hj212Frame:
    data = Hj212Data(
        draw(st.none() | st.datetimes(datetime(1990, 1, 1), datetime(2099, 12, 31)).map(
            lambda d: d.replace(microsecond=0))),
        tuple(draw(st.lists(factors(), max_size=4, unique_by=lambda f: f.code))),
        tuple(draw(st.dictionaries(_NAMES.filter(lambda n: n != "DataTime"), _TEXT,
                                   max_size=3)).items()),
    )
    return Hj212Frame(
        draw(st.none() | st.from_regex(r"[0-9]{17}", fullmatch=True)),
        draw(st.from_regex(r"[0-9]{2}", fullmatch=True)),
        draw(st.from_regex(r"[0-9]{4}", fullmatch=True)),
        draw(_TEXT), draw(_TEXT),
        draw(st.none() | st.integers(0, 255)),
        data,
        pnum=draw(st.none() | st.integers(0, 9999)),
        pno=draw(st.none() | st.integers(0, 9999)),
    )


@given(frames())
def test_round_trip(frame: Hj212Frame):
    """decode_frame(encode_frame(f)) == f for any valid frame."""
    wire = encode_frame(frame, max_data_len=9999)
    assert wire.startswith(b"##") and wire.endswith(b"\r\n")
    assert decode_frame(wire, max_data_len=9999) == frame


# ---------------------------------------------------------------------------- stream decoder


@given(
    st.lists(frames(), min_size=1, max_size=4),
    st.lists(st.binary(max_size=20), min_size=5, max_size=5),
    st.lists(st.integers(1, 64), min_size=1, max_size=40),
)
def test_stream_decoder_over_random_chunks(frames_: list[Hj212Frame], garbage: list[bytes],
                                           sizes: list[int]):
    """Frames with garbage between them, fed in random chunks, come out whole and in order."""
    stream = garbage[0] + b"".join(
        encode_frame(f, max_data_len=9999) + garbage[i % 4 + 1] for i, f in enumerate(frames_))
    decoder = Hj212Decoder(max_data_len=9999)
    got = frames_from_chunks(decoder, decoder.next_frame, Hj212Error, stream, sizes)
    assert got == frames_


def test_stream_decoder_byte_by_byte():
    """One byte at a time, the decoder answers NEED_DATA until the last byte, then the frame."""
    decoder = Hj212Decoder()
    for byte in SAMPLE_FRAME[:-1]:
        decoder.feed(bytes([byte]))
        assert decoder.next_frame() is NEED_DATA
    decoder.feed(SAMPLE_FRAME[-1:])
    assert decoder.next_frame() == SAMPLE
    assert decoder.next_frame() is NEED_DATA and decoder.buffered == 0


def test_stream_decoder_resynchronises():
    """Garbage, a bad-CRC frame and a cut-off frame each cost one error; good frames survive."""
    decoder = Hj212Decoder()
    bad_crc = SAMPLE_FRAME.replace(b"1C80", b"0000")
    cut = SAMPLE_FRAME[:40]
    decoder.feed(b"\x00noise#" + SAMPLE_FRAME + bad_crc + cut + SAMPLE_FRAME + b"##09")
    frames_, errors = drain(decoder)
    assert frames_ == [SAMPLE, SAMPLE]
    assert [type(e) for e in errors] == [Hj212CrcError, Hj212LengthError]
    assert decoder.discarded > len(bad_crc)  # the noise and the bad frame's bytes
    # the trailing `##09` may start a frame: it waits, then fails as soon as a byte rules it out
    assert decoder.buffered == 4
    decoder.feed(b"x")
    with pytest.raises(Hj212LengthError):
        decoder.next_frame()
    assert decoder.next_frame() is NEED_DATA


def test_stream_decoder_does_not_wait_for_huge_length():
    """A declared length over the limit fails at once instead of waiting for 9999 bytes."""
    decoder = Hj212Decoder()
    decoder.feed(b"##9999QN=")
    with pytest.raises(Hj212LengthError) as info:
        decoder.next_frame()
    assert info.value.declared == 9999
