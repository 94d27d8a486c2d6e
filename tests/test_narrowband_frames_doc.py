"""The 叫应 narrowband frames (issue 11): kind 3 (acks up) and kind 4 (signed warnings down),
checked against the examples of docs/narrowband-frames.md, round-tripped and fuzzed (typed
errors only)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.callresp import Level, play_warning
from protocols.command_keys import public_key_b64
from protocols.commands import make_command
from protocols.narrowband import (
    CallAckEntry,
    CallAcksFrame,
    CallAckType,
    FrameCapacityError,
    MacMismatchError,
    NarrowbandError,
    decode_frame,
    encode_call_acks,
    pack_id,
)
from protocols.narrowband_down import (
    ELLIPSIS,
    Assembler,
    BadWarningSignatureError,
    open_warning,
    parse_segment,
    segments,
    sign_warning,
)
from protocols.narrowband_wire import Reader

DOC = (Path(__file__).parent.parent / "docs" / "narrowband-frames.md").read_text()
KEY = bytes(range(32))
STREAM = "3f6c1a"
SK = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
WID = "w-5f0c1a2b3c4d5e6f"
ACKS = [CallAckEntry(1042, CallAckType.DELIVERED, WID, "t-101", 1718000012345),
        CallAckEntry(1043, CallAckType.ACK, WID, "t-101", 1718000030000, by="button-1")]


def _flat(text: str) -> str:
    return text.replace(" ", "").replace("\n", "")


def _warning_cmd(text: str = "暴雨红色预警，请立即转移") -> object:
    return make_command("9a1e" * 8, gw="gw-1", args=play_warning(WID, "red", text, 3, ["t-101"]),
                        issued_at_ms=1718000000000, ttl_ms=300000)


def test_packed_id_examples() -> None:
    """The packed-id table of the doc."""
    assert pack_id(WID).hex() == "05772d085f0c1a2b3c4d5e6f"
    assert pack_id("t-101").hex() == "0a742d313031"
    for value in (WID, "t-101", "9a1e" * 8, "ab", "a-b-cd", "X-" + "f" * 62):
        assert Reader(pack_id(value)).packed_id() == value


def test_call_acks_example_matches_the_doc() -> None:
    """The 65-byte kind-3 example, both ways."""
    frame, count = encode_call_acks(1718000040, ACKS, key=KEY, stream=STREAM, limit=77)
    assert count == 2 and len(frame) == 65
    assert frame.hex() in _flat(DOC)
    decoded = decode_frame(frame, key=KEY, stream=STREAM)
    assert decoded == CallAcksFrame(1718000040, tuple(ACKS))
    with pytest.raises(MacMismatchError):
        decode_frame(frame, key=KEY, stream="other")


def test_warning_example_matches_the_doc() -> None:
    """The signed warning and its two 77-byte segments of the doc; the public key too."""
    assert public_key_b64(SK.public_key()) in DOC
    signed = sign_warning(SK, _warning_cmd(), limit=77)  # type: ignore[arg-type]
    assert len(signed) == 135
    flat = _flat(DOC)
    for seg in segments(signed, 77):
        assert seg.hex() in flat
    w = open_warning(SK.public_key(), "gw-1", signed)
    assert (w.args.text, w.truncated, w.command.cmd_id) == ("暴雨红色预警，请立即转移", False,
                                                            "9a1e" * 8)
    assert w.command.expires_at_ms == 1718000300000
    cut = open_warning(SK.public_key(), "gw-1", sign_warning(
        SK, _warning_cmd(), limit=45, max_segments=3))  # type: ignore[arg-type]
    assert (cut.args.text, cut.truncated) == ("暴雨红色预" + ELLIPSIS, True)
    assert "`暴雨红色预…`" in DOC


def test_a_warning_for_another_gateway_or_key_does_not_verify() -> None:
    """The gateway id is signed: gw-2 cannot take gw-1's warning; nor another key's."""
    signed = sign_warning(SK, _warning_cmd(), limit=77)  # type: ignore[arg-type]
    with pytest.raises(BadWarningSignatureError):
        open_warning(SK.public_key(), "gw-2", signed)
    with pytest.raises(BadWarningSignatureError):
        open_warning(Ed25519PrivateKey.generate().public_key(), "gw-1", signed)


def test_segments_assemble_in_any_order_and_resent_ones_replace() -> None:
    """Segments complete a warning in any order; a repeat replaces its copy."""
    signed = sign_warning(SK, _warning_cmd("很长的预警" * 20), limit=45,  # type: ignore[arg-type]
                          max_segments=8)
    parts = segments(signed, 45)
    assert len(parts) == 8 and all(len(p) <= 45 for p in parts)
    a = Assembler()
    out = [a.feed(parse_segment(p)) for p in [*reversed(parts[1:]), parts[3], parts[0]]]
    assert out[:-1] == [None] * 8 and out[-1] == signed and a.partial == 0


def test_no_room_for_text_is_a_typed_error() -> None:
    with pytest.raises(FrameCapacityError):
        sign_warning(SK, _warning_cmd(), limit=45, max_segments=2)  # type: ignore[arg-type]


ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,40}\Z") | st.from_regex(
    r"\A(?:[a-z]{1,3}-)?([0-9a-f]{2}){1,16}\Z")
ack_entries = st.builds(
    CallAckEntry, seq=st.integers(1, 2**40), type=st.sampled_from(CallAckType),
    warning_id=ids, terminal=ids, at_ms=st.integers(0, 2**42),
    by=st.none() | st.text(max_size=20))


@given(st.lists(ack_entries, min_size=1, max_size=5, unique_by=lambda e: e.seq),
       st.integers(0, 2**32 - 1))
def test_call_acks_round_trip(items: list[CallAckEntry], ts: int) -> None:
    items.sort(key=lambda e: e.seq)
    frame, count = encode_call_acks(ts, items, key=KEY, stream=STREAM, limit=4096)
    assert count == len(items)
    assert decode_frame(frame, key=KEY, stream=STREAM) == CallAcksFrame(ts, tuple(items))


@settings(max_examples=60)
@given(text=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1,
                    max_size=200).filter(str.strip),
       level=st.sampled_from(Level), repeat=st.integers(1, 10),
       terminals=st.lists(ids, min_size=1, max_size=4, unique=True),
       limit=st.integers(45, 300), segs=st.integers(3, 16))
def test_warning_round_trip(text: str, level: Level, repeat: int, terminals: list[str],
                            limit: int, segs: int) -> None:
    """A warning survives signing, segmenting and assembly; only its text may be cut."""
    cmd = make_command("c-" + "ab" * 16, gw="gw-x", args=play_warning(
        WID, level, text, repeat, terminals), issued_at_ms=1_718_000_000_000, ttl_ms=60_000)
    try:
        signed = sign_warning(SK, cmd, limit=limit, max_segments=segs)
    except FrameCapacityError:
        return  # many long terminal ids and a small limit: nothing of the text fits
    a = Assembler()
    out = [a.feed(parse_segment(p)) for p in segments(signed, limit)]
    w = open_warning(SK.public_key(), "gw-x", out[-1] or b"")
    assert w.command.args == cmd.args if not w.truncated else (
        w.args.text.endswith(ELLIPSIS) and text.startswith(w.args.text[:-1]))
    assert (w.command.cmd_id, w.args.terminals, w.args.level) == (
        cmd.cmd_id, tuple(terminals), level)


@given(st.binary(max_size=200))
def test_segment_and_warning_garbage_raise_only_narrowband_errors(data: bytes) -> None:
    for step in (lambda: parse_segment(data),
                 lambda: open_warning(SK.public_key(), "gw-1", data),
                 lambda: Assembler().feed(parse_segment(data))):
        try:
            step()
        except NarrowbandError:
            pass


@given(st.binary(max_size=120))
def test_signed_garbage_raises_only_narrowband_errors(body: bytes) -> None:
    """Correctly signed bytes that are not a warning: a typed error, never a crash."""
    from protocols.narrowband_down import _signed_prefix
    signed = b"\x14" + body
    signed += SK.sign(_signed_prefix("gw-1") + signed)
    try:
        open_warning(SK.public_key(), "gw-1", signed)
    except NarrowbandError:
        pass


@given(st.binary(max_size=120))
def test_verified_call_ack_garbage_raises_only_narrowband_errors(body: bytes) -> None:
    import hashlib
    import hmac
    signed = b"\x13" + bytes(4) + body
    frame = signed + hmac.new(KEY, b"fieldlink-nb1" + STREAM.encode() + signed,
                              hashlib.sha256).digest()[:4]
    try:
        decode_frame(frame, key=KEY, stream=STREAM)
    except NarrowbandError:
        pass
