"""叫应 terminal protocol (FLT/1): the documented examples both ways, round trips, garbage, stream."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import terminal as tm
from protocols.errors import ProtocolError
from tests.helpers import frames_and_errors, frames_from_chunks, garbage_between, mutate

relaxed = settings(deadline=None)  # CI is a loaded 2-core box: behaviour, not speed
DOC = Path(__file__).resolve().parent.parent / "docs" / "terminal-protocol.md"
T0 = 1765000000  # 2025-12-06T05:46:40Z

# What each example of docs/terminal-protocol.md §6 says in words.
DOCUMENTED = {
    "play": tm.TerminalFrame(1, tm.Play(1001, tm.WarningLevel.RED, 3, "暴雨红色预警")),
    "receipt": tm.TerminalFrame(7, tm.Receipt(1, tm.MessageType.PLAY, 1001, T0)),
    "ack": tm.TerminalFrame(8, tm.Ack(1001, T0 + 42, 1, "JY-0001")),
    "ack_receipt": tm.TerminalFrame(3, tm.Receipt(8, tm.MessageType.ACK, 1001, T0 + 43)),
    "heartbeat": tm.TerminalFrame(6, tm.Heartbeat("JY-0001", T0, 30, 87, mains=True)),
    "heartbeat_video": tm.TerminalFrame(9, tm.Heartbeat("VJY-0002", 0, 30, None, mains=False,
                                                        speaker_fault=True, tamper=True,
                                                        camera=tm.CameraState.OBSTRUCTED)),
    "error": tm.TerminalFrame(10, tm.ErrorReport(2, tm.MessageType.PLAY, tm.ErrorCode.SPEAKER_FAULT,
                                                 "speaker open circuit")),
    "display": tm.TerminalFrame(2, tm.Display(42, 600, "请转移到安全地带")),
}


def documented_examples() -> dict[str, bytes]:
    """The hex blocks of the page, by the name in the `<!-- example: NAME -->` before each."""
    text = DOC.read_text(encoding="utf-8")
    found = re.findall(r"<!-- example: (\w+) -->\s*```hex\n(.*?)```", text, re.DOTALL)
    return {name: bytes.fromhex(block) for name, block in found}


def drain(decoder: tm.TerminalDecoder) -> tuple[list[tm.TerminalFrame], list[tm.TerminalError]]:
    """Every frame and every error the decoder has in it now."""
    return frames_and_errors(decoder.next_frame, tm.TerminalError)


# ---------------------------------------------------------------------------- byte vectors


def test_doc_has_every_example() -> None:
    """The page carries exactly the worked examples this test knows, one per message kind."""
    assert set(documented_examples()) == set(DOCUMENTED)
    kinds = {type(f.message) for f in DOCUMENTED.values()}
    assert kinds == {tm.Play, tm.Display, tm.Receipt, tm.Ack, tm.Heartbeat, tm.ErrorReport}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_documented_example_both_ways(name: str) -> None:
    """Each documented frame decodes to what the page says and the message encodes to it."""
    wire = documented_examples()[name]
    assert tm.decode_frame(wire) == DOCUMENTED[name]
    assert tm.encode_frame(DOCUMENTED[name]) == wire


def test_crc_is_ibm_3740() -> None:
    """The CRC is CRC-16/IBM-3740: check value 0x29B1, and the play example's two CRCs."""
    assert tm.crc16(b"123456789") == 0x29B1
    wire = documented_examples()["play"]
    assert tm.crc16(bytes.fromhex("010100010018")) == 0x45E8 == int.from_bytes(wire[8:10])
    assert tm.crc16(wire[10:-2]) == 0x553A and tm.crc16(b"") == 0xFFFF


def _crc16_as_the_page_writes_it(data: bytes) -> int:
    """The C function of docs/terminal-protocol.md §3.2, line for line."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


@relaxed
@given(st.binary(max_size=200))
def test_documented_crc_code_matches(data: bytes) -> None:
    """The bitwise C code the page gives vendors computes the codec's CRC."""
    assert _crc16_as_the_page_writes_it(data) == tm.crc16(data)


def test_crc_mismatch_names_both_values() -> None:
    """A wrong CRC, header or body, is a TerminalCrcError with the part, expected and got."""
    wire = documented_examples()["receipt"]
    with pytest.raises(tm.TerminalCrcError) as info:
        tm.decode_frame(wire[:8] + b"\x12\x34" + wire[10:])
    assert (info.value.part, info.value.expected, info.value.got) == ("header", 0x9199, 0x1234)
    with pytest.raises(tm.TerminalCrcError) as info:
        tm.decode_frame(wire[:-2] + b"\x00\x00")
    assert (info.value.part, info.value.expected, info.value.got) == ("body", 0x306A, 0)
    assert issubclass(tm.TerminalError, ProtocolError)


def _reframe(kind: int, seq: int, body: bytes, version: int = 1) -> bytes:
    """A frame with good CRCs around any body (to test what is inside)."""
    header = bytes((version, kind)) + seq.to_bytes(2, "big") + len(body).to_bytes(2, "big")
    return b"\xfb\x4a" + header + tm.crc16(header).to_bytes(2, "big") + body \
        + tm.crc16(body).to_bytes(2, "big")


@pytest.mark.parametrize("wire, code", [
    (_reframe(0x01, 5, b"\x00\x00\x03\xe9\x01\x03", version=2), tm.ErrorCode.UNSUPPORTED_VERSION),
    (_reframe(0x42, 5, b""), tm.ErrorCode.UNKNOWN_TYPE),
    (_reframe(0x01, 5, b"\x00\x00\x03\xe9\x05\x03hi"), tm.ErrorCode.MALFORMED),  # level 5
    (_reframe(0x01, 5, b"\x00\x00\x00\x00\x01\x03hi"), tm.ErrorCode.MALFORMED),  # warning 0
    (_reframe(0x01, 5, b"\x00\x00\x03\xe9\x01\x03\xff"), tm.ErrorCode.MALFORMED),  # not UTF-8
    (_reframe(0x03, 5, b"\x00\x01\x01"), tm.ErrorCode.MALFORMED),  # short
    (_reframe(0x03, 5, bytes(11) + b"\x00"), tm.ErrorCode.MALFORMED),  # ref_type 0, and extra
    (_reframe(0x05, 5, b"\x01A" + bytes(6) + b"\x00\x10\x00"), tm.ErrorCode.MALFORMED),  # bit 4
    (_reframe(0x05, 5, b"\x01A" + b"\x00" * 4 + b"\x00\x1e\x65\x01\x00"),
     tm.ErrorCode.MALFORMED),  # battery 101 %
    (_reframe(0x04, 5, bytes(8) + b"\x01\x02A "), tm.ErrorCode.MALFORMED),  # space in the id
])
def test_refused_frames_carry_what_an_error_answer_needs(wire: bytes, code: tm.ErrorCode) -> None:
    """A whole frame with good CRCs that cannot be taken names its seq, type and error code."""
    with pytest.raises(tm.TerminalFrameRefused) as info:
        tm.decode_frame(wire)
    assert (info.value.seq, info.value.message_type, info.value.code) == (5, wire[3], code)


@pytest.mark.parametrize("build", [
    lambda: tm.Play(0, tm.WarningLevel.RED, 1, "x"),
    lambda: tm.Play(1, 5, 1, "x"),  # type: ignore[arg-type]
    lambda: tm.Play(1, tm.WarningLevel.RED, 0, "x"),
    lambda: tm.Play(1, tm.WarningLevel.RED, 1, "\ud800"),
    lambda: tm.Display(1, 0x10000, "x"),
    lambda: tm.Receipt(1, tm.MessageType.ERROR, 0, 0),
    lambda: tm.Ack(1, 0, 0, "JY-1"),
    lambda: tm.Ack(1, 0, 1, "J" * 33),
    lambda: tm.Ack(1, 0, 1, "终端"),
    lambda: tm.Heartbeat("JY-1", 0, 0, None, True),
    lambda: tm.Heartbeat("JY-1", 0, 30, 101, True),
    lambda: tm.Heartbeat("JY-1", 0, 30, None, 1),  # type: ignore[arg-type]
    lambda: tm.Heartbeat("JY-1", 0, 30, None, True, camera=9),  # type: ignore[arg-type]
    lambda: tm.ErrorReport(0x10000, 1, 1),
    lambda: tm.TerminalFrame(0x10000, tm.Display(1, 0, "")),
    lambda: tm.TerminalFrame(1, "play"),  # type: ignore[arg-type]
])
def test_values_checked_on_construction(build: object) -> None:
    """Out-of-range fields are refused when the dataclass is built, as TerminalFormatError."""
    with pytest.raises(tm.TerminalFormatError):
        build()  # type: ignore[operator]


def test_unknown_error_code_is_kept_as_a_number() -> None:
    """An error code this side does not know decodes as its number (§5.6)."""
    frame = tm.decode_frame(tm.encode(4, tm.ErrorReport(1, 0x77, 0x42, "vendor")))
    assert isinstance(frame.message, tm.ErrorReport)
    assert frame.message.code == 0x42 and frame.message.ref_type == 0x77
    known = tm.decode_frame(tm.encode(4, tm.ErrorReport(1, 1, 0x10))).message
    assert isinstance(known, tm.ErrorReport) and known.code is tm.ErrorCode.SPEAKER_FAULT


def test_long_body_limits() -> None:
    """A decoder takes 1024-byte bodies by default and refuses longer ones on the header."""
    fits = tm.encode(1, tm.Display(1, 0, "x" * (1024 - 6)))
    tm.decode_frame(fits)
    too_long = tm.encode(1, tm.Display(1, 0, "x" * (1025 - 6)))
    with pytest.raises(tm.TerminalLengthError) as info:
        tm.decode_frame(too_long)
    assert info.value.declared == 1025
    assert tm.decode_frame(too_long, max_body=2048).message == tm.Display(1, 0, "x" * 1019)
    with pytest.raises(tm.TerminalLengthError):
        tm.encode(1, tm.Display(1, 0, "x" * 100), max_body=50)


# ---------------------------------------------------------------------------- round trips

_TERMINAL_IDS = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1,
                        max_size=32)
_U32 = st.integers(0, 0xFFFFFFFF)
_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=60)

messages: st.SearchStrategy[tm.Message] = st.one_of(
    st.builds(tm.Play, st.integers(1, 0xFFFFFFFF), st.sampled_from(tm.WarningLevel),
              st.integers(1, 255), _TEXT),
    st.builds(tm.Display, st.integers(1, 0xFFFFFFFF), st.integers(0, 0xFFFF), _TEXT),
    st.builds(tm.Receipt, st.integers(0, 0xFFFF),
              st.sampled_from([tm.MessageType.PLAY, tm.MessageType.DISPLAY, tm.MessageType.ACK,
                               tm.MessageType.HEARTBEAT]), _U32, _U32),
    st.builds(tm.Ack, _U32, _U32, st.integers(1, 255), _TERMINAL_IDS),
    st.builds(tm.Heartbeat, _TERMINAL_IDS, _U32, st.integers(1, 0xFFFF),
              st.none() | st.integers(0, 100), st.booleans(), st.booleans(), st.booleans(),
              st.booleans(), st.sampled_from(tm.CameraState)),
    st.builds(tm.ErrorReport, st.integers(0, 0xFFFF), st.integers(0, 255), st.integers(0, 255),
              _TEXT),
)
frames = st.builds(tm.TerminalFrame, st.integers(0, 0xFFFF), messages)


@relaxed
@given(frames)
def test_frame_round_trip(frame: tm.TerminalFrame) -> None:
    """decode_frame(encode_frame(f)) == f for every message type."""
    wire = tm.encode_frame(frame)
    assert len(wire) == tm.OVERHEAD + int.from_bytes(wire[6:8])
    assert tm.decode_frame(wire) == frame


# ---------------------------------------------------------------------------- garbage


@relaxed
@given(st.binary(max_size=300))
def test_garbage_raises_only_terminal_errors(data: bytes) -> None:
    """Random bytes, bare, behind a good header or as any body, raise only TerminalError."""
    for kind in range(8):
        for candidate in (data, b"\xfb\x4a" + data, _reframe(kind, 1, data),
                          _reframe(kind, 1, data)[:-1] + data[:1]):
            try:
                tm.decode_frame(candidate)
            except tm.TerminalError:
                pass
    decoder = tm.TerminalDecoder()
    decoder.feed(data + documented_examples()["ack"] + data + b"\xfb\x4a" + data)
    frames_, _ = drain(decoder)
    assert DOCUMENTED["ack"] in frames_ or b"\xfb" in data  # garbage may swallow it


_VALID = list(documented_examples().values())


@relaxed
@given(st.sampled_from(_VALID), st.data())
def test_mutated_frames_raise_only_terminal_errors(wire: bytes, data: st.DataObject) -> None:
    """A documented frame with bytes changed, cut or added decodes or raises TerminalError."""
    try:
        tm.decode_frame(mutate(wire, data))
    except tm.TerminalError:
        pass


# ---------------------------------------------------------------------------- stream decoder


@relaxed
@given(
    st.lists(frames, min_size=1, max_size=5),
    st.lists(st.binary(max_size=20).map(lambda b: b.replace(b"\xfb", b"")), min_size=6,
             max_size=6),
    st.lists(st.integers(1, 40), min_size=1, max_size=30),
)
def test_stream_decoder_over_random_chunks(frames_: list[tm.TerminalFrame], garbage: list[bytes],
                                           sizes: list[int]) -> None:
    """Frames with garbage between them, fed in random chunks, come out whole and in order."""
    stream, junk = garbage_between([tm.encode_frame(x) for x in frames_], garbage)
    decoder = tm.TerminalDecoder()
    got = frames_from_chunks(decoder, decoder.next_frame, tm.TerminalError, stream, sizes)
    assert got == frames_
    assert decoder.discarded == junk and decoder.errors == 0


def test_stream_decoder_byte_by_byte() -> None:
    """One byte at a time, the decoder answers NEED_DATA until the last byte, then the frame."""
    wire = documented_examples()["play"]
    decoder = tm.TerminalDecoder()
    for byte in wire[:-1]:
        decoder.feed(bytes([byte]))
        assert decoder.next_frame() is tm.NEED_DATA
    decoder.feed(wire[-1:])
    assert decoder.next_frame() == DOCUMENTED["play"]
    assert decoder.next_frame() is tm.NEED_DATA and decoder.buffered == 0


def test_stream_decoder_resynchronises() -> None:
    """Noise, false syncs, a damaged and a cut-off frame cost errors; good frames survive."""
    ex = documented_examples()
    damaged = bytearray(ex["heartbeat"])
    damaged[15] ^= 0x01
    cut = ex["display"][:25]  # the sender lost power halfway
    refused = _reframe(0x42, 77, b"new")
    decoder = tm.TerminalDecoder()
    decoder.feed(b"\x00\xffAT\r\n\xfb\x4a\xfb\x4a\x01" + ex["play"] + bytes(damaged) + cut
                 + ex["ack"] + refused + ex["receipt"])
    frames_, errors = drain(decoder)
    assert frames_ == [DOCUMENTED["play"], DOCUMENTED["ack"], DOCUMENTED["receipt"]]
    assert [type(e) for e in errors] == [tm.TerminalCrcError, tm.TerminalCrcError,
                                         tm.TerminalCrcError, tm.TerminalCrcError,
                                         tm.TerminalFrameRefused]
    refusal = errors[-1]
    assert isinstance(refusal, tm.TerminalFrameRefused) and refusal.seq == 77
    assert decoder.refused == 1 and decoder.errors == 4 and decoder.buffered == 0


def test_quiet_line_gives_up_a_cut_frame() -> None:
    """A frame cut off as the line goes quiet waits; skip_partial() lets the next one through."""
    ex = documented_examples()
    decoder = tm.TerminalDecoder()
    decoder.feed(ex["play"][:20])
    assert decoder.next_frame() is tm.NEED_DATA
    assert decoder.skip_partial()
    decoder.feed(ex["heartbeat"])
    assert drain(decoder)[0] == [DOCUMENTED["heartbeat"]]
    assert decoder.errors == 1 and not decoder.skip_partial()


def test_stream_decoder_refuses_huge_length_on_the_header() -> None:
    """A header with a good CRC but a body over the limit fails at once, not after 64 KiB."""
    header = bytes((1, 1, 0, 1, 0xFF, 0xFF))
    decoder = tm.TerminalDecoder()
    decoder.feed(b"\xfb\x4a" + header + tm.crc16(header).to_bytes(2, "big"))
    with pytest.raises(tm.TerminalLengthError) as info:
        decoder.next_frame()
    assert info.value.declared == 0xFFFF


def test_buffer_is_bounded_and_big_feeds_are_whole() -> None:
    """Once drained, the buffer holds less than a frame; a feed of many frames loses none."""
    decoder = tm.TerminalDecoder(max_body=100)
    decoder.feed(b"\xfb\x4a" + bytes(8) + bytes(10_000) + b"\xfb")
    drain(decoder)
    assert decoder.buffered == 1  # the last FB may start a sync
    many = documented_examples()["play"] * 5000
    big = tm.TerminalDecoder()
    big.feed(many)
    assert len(drain(big)[0]) == 5000 and big.buffered == 0
    big.feed(many[:-1])
    assert len(drain(big)[0]) == 4999 and 0 < big.buffered < tm.OVERHEAD + 1024
