"""Narrowband frames (DESIGN §5): exact bytes, round trips, the limit, the MAC, garbage."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.narrowband import (
    AlarmEntry,
    AlarmRule,
    AlarmsFrame,
    AlarmTransition,
    FrameCapacityError,
    FrameTextError,
    FrameTooShortError,
    HeartbeatFrame,
    MacMismatchError,
    MalformedFrameError,
    NarrowbandError,
    NarrowbandVersionError,
    NotFrameTextError,
    PowerState,
    UnknownFrameKindError,
    decode_frame,
    encode_alarms,
    encode_heartbeat,
    from_text,
    text_frame_bytes,
    to_text,
)

KEY = bytes(range(32))
STREAM = "5f0c2a9e4b7d4e1f9a3c6b8d2e4f6a1b"
BD2_LEVEL3 = 77  # (628 - 8) / 8 bytes in mixed mode
TS = 1_795_000_000  # 2026-11-18 07:06:40 UTC


def mac(signed: bytes, stream: str = STREAM, key: bytes = KEY, n: int = 4) -> bytes:
    """HMAC-SHA256 over domain + stream + frame, truncated: written here apart from the codec."""
    return hmac.new(key, b"fieldlink-nb1" + stream.encode() + signed, hashlib.sha256).digest()[:n]


GAS_L2 = AlarmEntry(seq=1000, point=3, rule=AlarmRule.HIGH, state=AlarmTransition.RAISED,
                    level=2, ts=TS - 5, value=60.0)
GAS_CLEAR = AlarmEntry(seq=998, point=3, rule=AlarmRule.HIGH, state=AlarmTransition.CLEARED,
                       level=0, ts=TS - 300, value=None)


def test_alarms_frame_bytes() -> None:
    """Two entries: zigzag seq deltas (1000, then -2), ordinal, code byte, age, float32; MAC."""
    frame, count = encode_alarms(TS, [GAS_L2, GAS_CLEAR], key=KEY, stream=STREAM,
                                 limit=BD2_LEVEL3)
    header = bytes([0x11]) + TS.to_bytes(4, "big")
    first = (bytes([0xD0, 0x0F])  # zigzag(1000) = 2000 = 0b1111_1010000 -> D0 0F
             + bytes([3])  # point ordinal
             + bytes([0 << 4 | 2 << 2 | 0])  # rule high, level 2, raised
             + bytes([10])  # zigzag(5 s ago)
             + struct.pack(">f", 60.0))
    second = (bytes([3])  # zigzag(998 - 1000 = -2) = 3
              + bytes([3]) + bytes([0 << 4 | 0 << 2 | 2])  # cleared, level 0
              + bytes([0xD8, 0x04])  # zigzag(300) = 600 -> D8 04
              + bytes([0x7F, 0xC0, 0x00, 0x00]))  # NaN: no value
    signed = header + first + second
    assert count == 2
    assert frame == signed + mac(signed)
    assert decode_frame(frame, key=KEY, stream=STREAM) == AlarmsFrame(TS, (GAS_L2, GAS_CLEAR))


def test_heartbeat_frame_bytes() -> None:
    """A heartbeat is header, four varints, power and battery bytes, MAC: 19 bytes here."""
    hb = HeartbeatFrame(ts=TS, last_seq=300, backlog=129_600, active_alarms=2, ip_down_s=3600,
                        power=PowerState.BATTERY, battery_pct=64)
    frame = encode_heartbeat(hb, key=KEY, stream=STREAM)
    signed = (bytes([0x12]) + TS.to_bytes(4, "big") + bytes([0xAC, 0x02])  # 300
              + bytes([0xC0, 0xF4, 0x07])  # 129600
              + bytes([2]) + bytes([0x90, 0x1C])  # 2 alarms, 3600 s
              + bytes([2, 64]))
    assert frame == signed + mac(signed)
    assert decode_frame(frame, key=KEY, stream=STREAM) == hb
    unknown = HeartbeatFrame(ts=TS, last_seq=1, backlog=0, active_alarms=0, ip_down_s=0)
    assert encode_heartbeat(unknown, key=KEY, stream=STREAM)[-6:-4] == bytes([0, 255])
    assert decode_frame(encode_heartbeat(unknown, key=KEY, stream=STREAM), key=KEY,
                        stream=STREAM) == unknown


def test_longer_mac_is_the_longer_prefix() -> None:
    """`mac_len` trades payload for security; 8 bytes is the same HMAC cut later."""
    hb = HeartbeatFrame(ts=TS, last_seq=1, backlog=0, active_alarms=0, ip_down_s=0)
    short = encode_heartbeat(hb, key=KEY, stream=STREAM)
    long = encode_heartbeat(hb, key=KEY, stream=STREAM, mac_len=8)
    assert long[:-8] == short[:-4] and long[-8:-4] == short[-4:]
    assert decode_frame(long, key=KEY, stream=STREAM, mac_len=8) == hb
    with pytest.raises(MacMismatchError):
        decode_frame(long, key=KEY, stream=STREAM)


def entry(seq: int, point: int = 7, value: float | None = 61.5) -> AlarmEntry:
    return AlarmEntry(seq=seq, point=point, rule=AlarmRule.HIGH, state=AlarmTransition.RAISED,
                      level=1, ts=TS - 60, value=value)


def test_alarms_fill_the_terminal_limit_and_the_rest_waits() -> None:
    """As many alarms as fit 77 bytes go, in the order given; the count says where to resume."""
    pending = [entry(seq) for seq in range(10_000, 10_020)]
    sent: list[AlarmEntry] = []
    while pending:
        frame, count = encode_alarms(TS, pending, key=KEY, stream=STREAM, limit=BD2_LEVEL3)
        assert len(frame) <= BD2_LEVEL3 and count >= 1
        decoded = decode_frame(frame, key=KEY, stream=STREAM)
        assert isinstance(decoded, AlarmsFrame)
        sent += decoded.entries
        pending = pending[count:]
    assert sent == [entry(seq) for seq in range(10_000, 10_020)]
    frame, count = encode_alarms(TS, [entry(s) for s in range(1, 100)], key=KEY, stream=STREAM,
                                 limit=BD2_LEVEL3)
    # 5 header + 4 MAC leave 68 bytes; an entry with a 1-byte delta, ordinal and age is 8 bytes
    assert count == 8 and len(frame) == 5 + 8 * 8 + 4


def test_a_limit_smaller_than_one_entry_is_a_typed_error() -> None:
    """A terminal whose card level cannot carry one alarm says so, with the bytes needed."""
    with pytest.raises(FrameCapacityError) as err:
        encode_alarms(TS, [GAS_L2], key=KEY, stream=STREAM, limit=15)
    assert (err.value.limit, err.value.needed) == (15, 5 + 9 + 4)


@pytest.mark.parametrize("kwargs", [{"key": b"other key"}, {"stream": "an-earlier-stream"}])
def test_a_frame_for_another_key_or_stream_does_not_verify(kwargs: dict[str, object]) -> None:
    """The key and the stream are both in the MAC; neither is on the air."""
    frame, _ = encode_alarms(TS, [GAS_L2], key=KEY, stream=STREAM, limit=BD2_LEVEL3)
    args: dict[str, object] = {"key": KEY, "stream": STREAM} | kwargs
    with pytest.raises(MacMismatchError):
        decode_frame(frame, **args)  # type: ignore[arg-type]


@given(st.data())
def test_any_changed_bit_is_caught_by_the_mac(data: st.DataObject) -> None:
    """One flipped bit anywhere in a frame: it does not verify, and it is not parsed."""
    frame, _ = encode_alarms(TS, [GAS_L2, GAS_CLEAR], key=KEY, stream=STREAM, limit=BD2_LEVEL3)
    bit = data.draw(st.integers(0, len(frame) * 8 - 1))
    broken = bytearray(frame)
    broken[bit // 8] ^= 1 << bit % 8
    with pytest.raises(MacMismatchError):
        decode_frame(bytes(broken), key=KEY, stream=STREAM)


def test_short_frames_and_unknown_versions_and_kinds() -> None:
    """Each way a verified frame can still be wrong has its own error."""
    with pytest.raises(FrameTooShortError):
        decode_frame(b"\x11\x00\x00\x00", key=KEY, stream=STREAM)
    for head, error in ((b"\x21", NarrowbandVersionError), (b"\x14", UnknownFrameKindError),
                        (b"\x15", UnknownFrameKindError), (b"\x1f", UnknownFrameKindError)):
        signed = head + TS.to_bytes(4, "big") + b"\x00"
        with pytest.raises(error):
            decode_frame(signed + mac(signed), key=KEY, stream=STREAM)
    empty = b"\x11" + TS.to_bytes(4, "big")
    with pytest.raises(MalformedFrameError, match="without entries"):
        decode_frame(empty + mac(empty), key=KEY, stream=STREAM)
    bad_level = b"\x11" + TS.to_bytes(4, "big") + bytes([2, 0, 3 << 2, 0]) + bytes(4)
    with pytest.raises(MalformedFrameError, match="level"):
        decode_frame(bad_level + mac(bad_level), key=KEY, stream=STREAM)


float32 = st.floats(width=32, allow_nan=False)
entries = st.builds(
    AlarmEntry, seq=st.integers(1, 2**53), point=st.integers(0, 2**20),
    rule=st.sampled_from(AlarmRule), state=st.sampled_from(AlarmTransition),
    level=st.integers(0, 2), ts=st.integers(0, 2**32 - 1), value=st.none() | float32)


@given(st.integers(0, 2**32 - 1), st.lists(entries, min_size=1, max_size=30),
       st.integers(4, 32))
def test_alarms_round_trip(ts: int, items: list[AlarmEntry], mac_len: int) -> None:
    """decode(encode(x)) gives back the entries that fit, exactly (float32 values)."""
    try:
        frame, count = encode_alarms(ts, items, key=KEY, stream=STREAM, limit=200,
                                     mac_len=mac_len)
    except FrameCapacityError:
        return
    assert len(frame) <= 200
    assert decode_frame(frame, key=KEY, stream=STREAM, mac_len=mac_len) == AlarmsFrame(
        ts, tuple(items[:count]))


@given(st.builds(HeartbeatFrame, ts=st.integers(0, 2**32 - 1), last_seq=st.integers(0, 2**63 - 1),
                 backlog=st.integers(0, 2**40), active_alarms=st.integers(0, 10_000),
                 ip_down_s=st.integers(0, 10**8), power=st.sampled_from(PowerState),
                 battery_pct=st.none() | st.integers(0, 100)))
def test_heartbeat_round_trip(hb: HeartbeatFrame) -> None:
    """decode(encode(x)) == x for every heartbeat."""
    assert decode_frame(encode_heartbeat(hb, key=KEY, stream=STREAM), key=KEY,
                        stream=STREAM) == hb


@given(st.binary(max_size=120))
def test_garbage_raises_only_narrowband_errors(data: bytes) -> None:
    """Random bytes on the air: a NarrowbandError (almost always the MAC), nothing else."""
    with pytest.raises(NarrowbandError):
        decode_frame(data, key=KEY, stream=STREAM)


@given(st.binary(min_size=1, max_size=80))
def test_verified_garbage_raises_only_narrowband_errors(signed: bytes) -> None:
    """Garbage that a sender with the key signed (a bug there) still parses to a typed error
    or a frame, never to another exception."""
    try:
        frame = decode_frame(signed + mac(signed), key=KEY, stream=STREAM)
    except NarrowbandError:
        return
    assert isinstance(frame, AlarmsFrame | HeartbeatFrame)


# --- text form (PDT) ----------------------------------------------------------------------------


@pytest.mark.parametrize(("frame", "text"), [
    (b"", "FL1:"),
    (b"\x11", "FL1:EQ=="),
    (b"\x11\x6a\xfd", "FL1:EWr9"),
    (b"\xfb\xff", "FL1:+/8="),  # the standard alphabet, not the URL-safe one
])
def test_text_form_vectors(frame: bytes, text: str) -> None:
    """A frame's text form is "FL1:" and its padded standard base64, both ways."""
    assert to_text(frame) == text
    assert from_text(text) == frame


def test_text_form_of_a_real_frame_fits_128_bytes() -> None:
    """A 128-byte text (64 UTF-16 units) carries 45 frame bytes: four small alarms, and a
    45-byte frame's text is exactly 64 ASCII characters."""
    assert text_frame_bytes(128) == 45
    assert (text_frame_bytes(0), text_frame_bytes(9), text_frame_bytes(16)) == (0, 0, 3)
    frame, count = encode_alarms(TS, [entry(s) for s in range(1, 10)], key=KEY, stream=STREAM,
                                 limit=text_frame_bytes(128))
    text = to_text(frame)
    assert count == 4 and len(text.encode("utf-16-le")) <= 128
    assert decode_frame(from_text(text), key=KEY, stream=STREAM) == AlarmsFrame(
        TS, tuple(entry(s) for s in range(1, 5)))
    assert len(to_text(bytes(45)).encode("utf-16-le")) == 128


@pytest.mark.parametrize(("text", "error"), [
    ("燃气泄漏 二级报警", NotFrameTextError),
    ("fl1:EQ==", NotFrameTextError),
    ("EQ==", NotFrameTextError),
    ("FL1:EQ", FrameTextError),  # no padding
    ("FL1:EQ=", FrameTextError),
    ("FL1:ER==", FrameTextError),  # stray bits in the last character
    ("FL1:EQ==\n", FrameTextError),
    ("FL1: EQ==", FrameTextError),
    ("FL1:-_8=", FrameTextError),  # URL-safe alphabet
    ("FL1:報警==", FrameTextError),
])
def test_text_form_rejects_what_it_did_not_make(text: str, error: type[Exception]) -> None:
    """A person's text is NotFrameTextError; anything but canonical base64 after the prefix is
    FrameTextError; both are NarrowbandErrors."""
    with pytest.raises(error) as err:
        from_text(text)
    assert isinstance(err.value, NarrowbandError)


@given(st.binary(max_size=200))
def test_text_form_round_trip(frame: bytes) -> None:
    """from_text(to_text(x)) == x, and the text is ASCII (one UTF-16 unit a character)."""
    text = to_text(frame)
    assert from_text(text) == frame and text.isascii()
    assert len(frame) <= text_frame_bytes(2 * len(text))


@given(st.text(max_size=80) | st.text(max_size=80).map(lambda t: "FL1:" + t))
def test_text_form_garbage_raises_only_frame_text_errors(text: str) -> None:
    """Any text either is a frame's canonical text form or raises FrameTextError only."""
    try:
        frame = from_text(text)
    except FrameTextError:
        return
    assert to_text(frame) == text
