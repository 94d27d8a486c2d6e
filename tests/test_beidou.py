"""BeiDou RDSS codec: published byte vectors, round trips, bad input, and the stream decoder."""

from __future__ import annotations

import datetime as dt
import operator
from functools import reduce

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols import beidou as bd
from protocols.errors import ProtocolError
from tests.helpers import frames_and_errors, frames_from_chunks

T = dt.time
GB_TEXT = "广州海聊科技有限公司".encode("gb2312")


def xor(body: bytes) -> int:
    """The checksum, written independently of the codec."""
    return reduce(operator.xor, body, 0)


def framed(body: bytes) -> bytes:
    """A sentence around `body` with the right checksum, to reach the field parsers."""
    return b"$%s*%02X\r\n" % (body, xor(body))


def drain(decoder: bd.BeidouDecoder) -> tuple[list[bd.Sentence], list[bd.BeidouError]]:
    """Every sentence and every error the decoder has in it now."""
    return frames_and_errors(decoder.next_sentence, bd.BeidouError)


# ---------------------------------------------------------------------------- byte vectors

# DOMAIN.md's examples, then sentences published in the comments and tests of public BeiDou
# terminal parsers (their checksums were made by other code), then a few built from the spec.
VECTORS: list[tuple[bytes, bd.Sentence]] = [
    (b"$CCICA,0,00*7B\r\n", bd.Bd2CardQuery(0, 0)),
    (b"$CCRMO,BSI,2,0*26\r\n", bd.UnknownSentence("CCRMO", ("BSI", "2", "0"))),
    (b"$BDFKI,082920,TCQ,Y,0,0*70\r\n", bd.Bd3Feedback(T(8, 29, 20), "TCQ", True, 0, 0)),
    (b"$BDICI,4207733,0,0,3,60,2,N,22*3A\r\n",
     bd.Bd2CardInfo("4207733", "0", "0", 3, 60, 2, False, 22)),
    (b"$BDTXR,1,4207733,1,2337,90000000000065C1FAF4B2E2CAD4*3F\r\n",
     bd.Bd2Message("4207733", bytes.fromhex("90000000000065C1FAF4B2E2CAD4"), bd.Bd2Mode.CODE, 1,
                   T(23, 37))),
    (b"$CCTXA,0247718,1,1,3132333435*70\r\n", bd.Bd2Send("0247718", b"12345", bd.Bd2Mode.CODE)),
    (b"$CCTXA,0242407,1,2,A4B9E3D6DDBAA3C1C4BFC6BCBCD3D0CFDEB9ABCBBE*0F\r\n",
     bd.Bd2Send("0242407", GB_TEXT, bd.Bd2Mode.MIXED)),
    (b"$BDICP,4238473,0,0,3,0,N,2,N,1,0,0,3,1,60,2,0,0,0,0,21,0,0,0*48\r\n",
     bd.Bd3CardInfo("4238473", 60, 2)),
    (b"$BDICP,15240507,2032472,1,3,0,N,1,Y,1,0,0,3,1,1,5,1,1,2,2,500,100,10,10*65\r\n",
     bd.Bd3CardInfo("15240507", 1, 5, ("2032472", "1", "3", "0", "N", "1", "Y", "1", "0", "0",
                                       "3", "1", "1", "1", "2", "2", "500", "100", "10", "10"))),
    (b"$BDPWI,000000.00,00,01,51,40,33,0*7B\r\n",
     bd.BeamReport(T(0), (), (bd.Beam(51, (40, 33, 0)),))),
    (b"$BDPWI,023628.00,00,04,2,51,44,0,4,50,43,0,11,43,36,0,16,51,44,0*42\r\n",
     bd.BeamReport(T(2, 36, 28), (), (bd.Beam(2, (51, 44, 0)), bd.Beam(4, (50, 43, 0)),
                                      bd.Beam(11, (43, 36, 0)), bd.Beam(16, (51, 44, 0))))),
    (b"$BDTCI,04207733,4207733,2,023242,2,0,90000000000065BEF749B2E2CAD4*75\r\n",
     bd.Bd3Message("04207733", "4207733", bytes.fromhex("90000000000065BEF749B2E2CAD4"),
                   bd.Bd3Encoding.CODE, 2, T(2, 32, 42), 0)),
    (framed(b"CCICR,0,00"), bd.Bd3CardQuery()),
    (framed(b"CCTCQ,4238473,2,1,3,A1B2C3,0"),
     bd.Bd3Send("4238473", b"\xa1\xb2\xc3", bd.Bd3Encoding.MIXED, 2, False, 0)),
    (framed(b"BDFKI,101500,TCQ,N,1,58"),
     bd.Bd3Feedback(T(10, 15), "TCQ", False, bd.Bd3Reason.INTERVAL, 58)),
    (framed(b"BDFKI,TXA,N,Y,4,0000"), bd.Bd2Feedback("TXA", False, True, 4, 0)),
    (framed(b"BDFKI,TXA,N,N,0,0125"), bd.Bd2Feedback("TXA", False, False, 0, 85)),
    (framed(b"CCTXA,0242407,0,0," + GB_TEXT), bd.Bd2Send("0242407", GB_TEXT, bd.Bd2Mode.CHINESE,
                                                         express=True)),
]


def test_checksum_of_domain_examples() -> None:
    """The XOR of the bytes between `$` and `*` gives DOMAIN.md's 7B, 26 and 70."""
    assert bd.checksum(b"CCICA,0,00") == 0x7B
    assert bd.checksum(b"CCRMO,BSI,2,0") == 0x26
    assert bd.checksum(b"BDFKI,082920,TCQ,Y,0,0") == 0x70
    assert bd.checksum(b"") == 0


@pytest.mark.parametrize(("line", "sentence"), VECTORS)
def test_vectors_both_ways(line: bytes, sentence: bd.Sentence) -> None:
    """Each published or spec-built line decodes to its dataclass and encodes back exactly."""
    assert bd.decode_sentence(line) == sentence
    assert bd.encode(sentence) == line


def test_lenient_input_forms() -> None:
    """Lower-case checksum digits, a missing CR LF and lower-case hex payloads are accepted."""
    assert bd.decode_sentence(b"$CCICA,0,00*7b\r\n") == bd.Bd2CardQuery()
    assert bd.decode_sentence(b"$CCICA,0,00*7B") == bd.Bd2CardQuery()
    assert bd.decode_sentence(b"$CCICA,0,000*" + b"%02X" % xor(b"CCICA,0,000")) == bd.Bd2CardQuery()
    lower = framed(b"CCTCQ,4238473,2,1,3,a1b2c3,0")
    assert bd.decode_sentence(lower).payload == b"\xa1\xb2\xc3"
    assert bd.decode_sentence(framed(b"BDFKI,082920.50,TCQ,Y,0,0")).time == T(8, 29, 20)


def test_fki_dialects_told_apart_by_time() -> None:
    """`$BDFKI` with a hhmmss field 1 is the BD-3 form; with a command name, the BD-2 form."""
    bd3 = bd.decode_sentence(b"$BDFKI,082920,TCQ,Y,0,0*70\r\n")
    bd2 = bd.decode_sentence(framed(b"BDFKI,TXA,Y,Y,0,0000"))
    assert isinstance(bd3, bd.Bd3Feedback) and isinstance(bd2, bd.Bd2Feedback)
    assert bd2 == bd.Bd2Feedback() and bd2.suppression == bd.Bd2Suppression.NONE


def test_card_levels_and_capacity() -> None:
    """BD-2 capacity follows the level table; mixed mode gives 77 bytes at level 3; ICP 0 is 5."""
    assert [bd.bd2_capacity_bits(n) for n in (1, 2, 3, 4)] == [110, 408, 628, 848]
    assert [bd.bd2_capacity_bits(n, encrypted=True) for n in (1, 2, 3, 4)] == [140, 360, 580, 1680]
    assert bd.mixed_mode_payload_bytes(628) == 77
    assert bd.mixed_mode_payload_bytes(bd.bd2_capacity_bits(3)) * 8 + 8 <= 628
    assert bd.bd2_message_bits(bd.Bd2Mode.MIXED, bytes(77)) == 624
    assert bd.bd2_message_bits(bd.Bd2Mode.CHINESE, GB_TEXT) == 14 * 10
    assert bd.bd2_message_bits(bd.Bd2Mode.CODE, b"12345") == 40
    assert bd.Bd3CardInfo("4238473", 60, 0).level == 5
    assert bd.Bd3CardInfo("4238473", 60, 2).level == 2
    with pytest.raises(bd.FieldError):
        bd.bd2_capacity_bits(5)


def test_beam_report_readiness() -> None:
    """A PWI is ready with a valid time and a beam with signal; 000000.00 or no beams is not."""
    assert bd.BeamReport(T(2, 36, 28), (), (bd.Beam(2, (51, 44, 0)),)).ready
    assert not bd.BeamReport(T(0), (), (bd.Beam(51, (40, 33, 0)),)).ready
    assert not bd.BeamReport(T(2, 36, 28)).ready
    assert bd.encode(bd.BeamReport(T(0))) == framed(b"BDPWI,000000.00,00,00")
    odd = bd.BeamReport(T(1, 2, 3, 123456))
    assert bd.encode(odd) == framed(b"BDPWI,010203.123456,00,00")
    assert bd.decode_sentence(bd.encode(odd)) == odd


# ---------------------------------------------------------------------------- errors


def test_wrong_checksum_rejected() -> None:
    """A sentence whose checksum does not match raises ChecksumError with both values."""
    with pytest.raises(bd.ChecksumError) as info:
        bd.decode_sentence(b"$CCICA,0,00*7C\r\n")
    assert (info.value.expected, info.value.got) == (0x7B, 0x7C)
    assert isinstance(info.value, bd.BeidouError) and isinstance(info.value, ProtocolError)
    with pytest.raises(bd.ChecksumError):
        bd.decode_sentence(b"$CCICA,0,01*7B\r\n")


@pytest.mark.parametrize("line", [
    b"CCICA,0,00*7B\r\n",  # no $
    b"$CCICA,0,00\r\n",  # no checksum
    b"$CCICA,0,00*7\r\n",  # one digit
    b"$CCICA,0,00*7G\r\n",  # not hex
    b"$CCICA,0,00*7B7\r\n",  # three digits
    b"$CC$ICA,0,00*" + b"%02X" % xor(b"CC$ICA,0,00"),  # a $ inside
    b"$CCICA,0\r\n,00*" + b"%02X" % xor(b"CCICA,0\r\n,00"),  # CR LF inside
    b"$cc-ica,0*" + b"%02X" % xor(b"cc-ica,0"),  # not a talker and type
    b"$*00",  # empty
])
def test_bad_framing_rejected(line: bytes) -> None:
    """Bytes that are not one `$…*hh` sentence raise FramingError."""
    with pytest.raises(bd.FramingError):
        bd.decode_sentence(line)


@pytest.mark.parametrize(("body", "field"), [
    (b"CCICA,0", "fields"),
    (b"CCICA,x,00", "kind"),
    (b"BDICI,420773,0,0,3,60,2,N,22", "card_id"),
    (b"BDICI,4207733,0,0,3,60,2,X,22", "encrypted"),
    (b"CCTXA,0242407,1,2,B9E3", "content"),  # mixed mode without its A4 lead byte
    (b"CCTXA,0242407,1,1,ABC", "content"),  # odd number of hex digits
    (b"CCTXA,0242407,1,1,0x12", "content"),
    (b"CCTXA,0242407,1,7,3132", "mode"),
    (b"CCTXA,0242407,3,1,3132", "type"),
    (b"BDTXR,1,4207733,1,2460,3132", "time"),
    (b"BDFKI,TXA,N,Y,4,00", "wait"),
    (b"BDFKI,TXA,N,Y,4,0061", "wait"),
    (b"BDFKI,TX,N,Y,4,0000", "command"),
    (b"BDFKI,256099,TCQ,Y,0,0", "time"),
    (b"BDFKI,082920,TCQ,M,0,0", "executed"),
    (b"BDICP,4238473,0,0,3,0,N", "fields"),
    (b"BDPWI,023628.00,00,02,2,51,44,0", "bd3_beams"),
    (b"BDPWI,023628.00,00,01,2,51,44,0,9", "fields"),
    (b"BDPWI,023628.00,01,2,51", "bd2_beams"),
    (b"CCTCQ,4238473,6,1,3,A1,0", "freq_point"),
    (b"CCTCQ,4238473,2,1,3,A1", "fields"),
    (b"BDTCI,04207733,4207733,2,023242,9,0,A1", "encoding"),
    (b"BDTCI,04207733,4207733,2,0232,2,0,A1", "time"),
    (b"CCICA,0,1234567890", "frame"),
])
def test_malformed_fields_name_the_field(body: bytes, field: str) -> None:
    """A well-framed sentence with a bad field raises FieldError naming that field."""
    with pytest.raises(bd.FieldError) as info:
        bd.decode_sentence(framed(body))
    assert info.value.field == field


def test_dataclasses_validated_on_construction() -> None:
    """A sentence that could not be sent (bad card, separator in text, known tag) is refused."""
    with pytest.raises(bd.FieldError, match="recipient"):
        bd.Bd2Send("123", b"x")
    with pytest.raises(bd.FieldError, match="payload"):
        bd.Bd2Send("0242407", b"a,b", bd.Bd2Mode.CHINESE)
    with pytest.raises(bd.FieldError, match="mode"):
        bd.Bd2Send("0242407", b"x", 5)  # type: ignore[arg-type]
    with pytest.raises(bd.FieldError, match="freq_point"):
        bd.Bd3Send("4238473", b"x", freq_point=0)
    with pytest.raises(bd.FieldError, match="talker_type"):
        bd.UnknownSentence("CCICA", ("0", "00"))
    with pytest.raises(bd.FieldError, match="fields"):
        bd.UnknownSentence("GNRMC", ("a*b",))
    with pytest.raises(bd.FieldError, match="bd3_beams"):
        bd.BeamReport(T(1), (), (bd.Beam(2, (1, 2)),))
    with pytest.raises(bd.FieldError, match="time"):
        bd.Bd3Feedback(T(1, 2, 3, 500))
    assert bd.Bd3Send("4238473", b"", 2).encoding is bd.Bd3Encoding.CODE  # an int becomes the enum


# ---------------------------------------------------------------------------- round trips

_SEP = frozenset(b"$*,\r\n")
_TEXT = st.text(st.characters(min_codepoint=0, max_codepoint=255, exclude_characters="$*,\r\n"),
                max_size=8)
_RAW = st.binary(max_size=60).map(lambda b: bytes(c for c in b if c not in _SEP))
_NUM = st.integers(0, 999_999_999)
_SECONDS = st.times().map(lambda t: t.replace(microsecond=0))


def _digits(lo: int, hi: int) -> st.SearchStrategy[str]:
    return st.from_regex(rf"[0-9]{{{lo},{hi}}}", fullmatch=True)


def _beams(width: int) -> st.SearchStrategy[tuple[bd.Beam, ...]]:
    beam = st.builds(bd.Beam, st.integers(0, 999), st.tuples(*[st.integers(0, 999)] * width))
    return st.lists(beam, max_size=6).map(tuple)


@st.composite
def _bd2_send(draw: st.DrawFn) -> bd.Bd2Send:
    mode = draw(st.sampled_from(bd.Bd2Mode))
    payload = draw(_RAW if mode is bd.Bd2Mode.CHINESE else st.binary(max_size=120))
    return bd.Bd2Send(draw(_digits(7, 7)), payload, mode, draw(st.booleans()))


@st.composite
def _bd2_message(draw: st.DrawFn) -> bd.Bd2Message:
    mode = draw(st.sampled_from(bd.Bd2Mode))
    payload = draw(_RAW if mode is bd.Bd2Mode.CHINESE else st.binary(max_size=120))
    when = draw(st.none() | st.times().map(lambda t: t.replace(second=0, microsecond=0)))
    return bd.Bd2Message(draw(_digits(7, 7)), payload, mode, draw(st.integers(0, 9)), when)


STRATEGIES: dict[str, st.SearchStrategy[bd.Sentence]] = {
    "CCICA": st.builds(bd.Bd2CardQuery, st.integers(0, 9), st.integers(0, 999)),
    "BDICI": st.builds(bd.Bd2CardInfo, _digits(7, 7), _digits(1, 9), _digits(1, 9), _NUM, _NUM,
                       _NUM, st.booleans(), _NUM),
    "CCTXA": _bd2_send(),
    "BDTXR": _bd2_message(),
    "BDFKI/2": st.builds(bd.Bd2Feedback, st.from_regex(r"[A-Z]{3}", fullmatch=True),
                         st.booleans(), st.booleans(), st.integers(0, 9),
                         st.integers(0, 99 * 60 + 59)),
    "CCICR": st.builds(bd.Bd3CardQuery, st.integers(0, 9), st.integers(0, 999)),
    "BDICP": st.builds(bd.Bd3CardInfo, _digits(7, 10), _NUM, st.integers(0, 9),
                       st.lists(_TEXT, min_size=12, max_size=24).map(tuple)),
    "BDPWI": st.builds(bd.BeamReport, st.times(), _beams(2), _beams(3)),
    "CCTCQ": st.builds(bd.Bd3Send, _digits(7, 10), st.binary(max_size=200),
                       st.sampled_from(bd.Bd3Encoding), st.integers(1, 5), st.booleans(), _NUM),
    "BDTCI": st.builds(bd.Bd3Message, _digits(7, 10), _digits(7, 10), st.binary(max_size=200),
                       st.sampled_from(bd.Bd3Encoding), st.integers(0, 9), st.none() | _SECONDS,
                       st.integers(0, 9)),
    "BDFKI/3": st.builds(bd.Bd3Feedback, _SECONDS, st.from_regex(r"[A-Z]{3}", fullmatch=True),
                         st.booleans(), st.integers(0, 99), _NUM),
    "unknown": st.builds(bd.UnknownSentence,
                         st.from_regex(r"[A-Z][A-Z0-9]{1,9}", fullmatch=True).filter(
                             lambda tag: tag not in {"CCICA", "BDICI", "CCTXA", "BDTXR",
                                                     "BDFKI", "CCICR", "BDICP", "BDPWI",
                                                     "CCTCQ", "BDTCI"}),
                         st.lists(_TEXT, max_size=8).map(tuple)),
}


@pytest.mark.parametrize("kind", sorted(STRATEGIES))
@given(data=st.data())
def test_round_trip(kind: str, data: st.DataObject) -> None:
    """decode_sentence(encode(x)) == x for every sentence kind."""
    sentence = data.draw(STRATEGIES[kind])
    wire = bd.encode(sentence)
    assert wire.startswith(b"$") and wire.endswith(b"\r\n")
    assert xor(wire[1:-5]) == int(wire[-4:-2], 16)
    assert bd.decode_sentence(wire) == sentence


# ---------------------------------------------------------------------------- garbage

VALID_LINES = [line for line, _ in VECTORS]
_FIELD_BITS = [b"", b"0", b"1", b"2", b"3", b"9", b"00", b"01", b"Y", b"N", b"E", b"A4", b"A4FF",
               b"a1", b"TXA", b"TCQ", b"082920", b"000000.00", b"023628.5", b"0000", b"2337",
               b"4238473", b"04207733", b"9" * 12, b"zz", b"\xb2\xe2", b" 1", b"-1", b"\xd9\xa1"]
_TAGS = [b"CCICA", b"BDICI", b"CCTXA", b"BDTXR", b"BDFKI", b"CCICR", b"BDICP", b"BDPWI",
         b"CCTCQ", b"BDTCI", b"GNRMC"]


def _only_beidou_errors(line: bytes) -> None:
    try:
        bd.decode_sentence(line)
    except bd.BeidouError:
        pass


@given(st.binary(max_size=300))
def test_garbage_raises_only_beidou_errors(data: bytes) -> None:
    """Random bytes, bare or framed with a right checksum, raise nothing but BeidouError."""
    for candidate in (data, b"$" + data, framed(data), framed(b"BDPWI," + data)):
        _only_beidou_errors(candidate)
    decoder = bd.BeidouDecoder(max_line=128)
    decoder.feed(data + b"$" + data + b"\r\n" + data)
    drain(decoder)
    assert decoder.buffered <= max(len(data), 128)


@given(st.sampled_from(_TAGS), st.lists(st.sampled_from(_FIELD_BITS), max_size=26))
def test_plausible_fields_raise_only_beidou_errors(tag: bytes, fields: list[bytes]) -> None:
    """Well-framed sentences of every known type with odd fields decode or raise BeidouError."""
    _only_beidou_errors(framed(b",".join([tag, *fields])))


@given(st.sampled_from(VALID_LINES), st.integers(0, 10_000), st.integers(0, 255),
       st.sampled_from(["replace", "delete", "insert"]))
def test_mutated_sentences_raise_only_beidou_errors(line: bytes, at: int, byte: int, how: str) -> None:
    """A good sentence with one byte changed, lost or added decodes or raises BeidouError."""
    at %= len(line)
    mutated = bytearray(line)
    if how == "replace":
        mutated[at] = byte
    elif how == "delete":
        del mutated[at]
    else:
        mutated.insert(at, byte)
    _only_beidou_errors(bytes(mutated))
    decoder = bd.BeidouDecoder()
    decoder.feed(bytes(mutated) + line)
    sentences, _ = drain(decoder)
    assert sentences[-1] == bd.decode_sentence(line)  # the good one behind it survives


# ---------------------------------------------------------------------------- stream decoder

_NOISE = st.binary(max_size=30).map(lambda b: b.replace(b"$", b""))


@given(st.lists(st.sampled_from(VECTORS), min_size=1, max_size=5),
       st.lists(_NOISE, min_size=6, max_size=6), st.lists(st.integers(1, 64), min_size=1))
def test_stream_decoder_over_random_chunks(picked: list[tuple[bytes, bd.Sentence]],
                                           noise: list[bytes], sizes: list[int]) -> None:
    """Sentences with noise between them, fed in random chunks, come out whole and in order."""
    stream = noise[0] + b"".join(line + noise[i % 5 + 1] for i, (line, _) in enumerate(picked))
    decoder = bd.BeidouDecoder()
    got = frames_from_chunks(decoder, decoder.next_sentence, bd.BeidouError, stream, sizes)
    assert got == [sentence for _, sentence in picked]


@given(st.lists(st.sampled_from(VALID_LINES), min_size=1, max_size=4),
       st.lists(st.binary(max_size=40), min_size=5, max_size=5))
def test_stream_decoder_keeps_good_sentences_after_any_garbage(lines: list[bytes],
                                                               garbage: list[bytes]) -> None:
    """Garbage holding `$` costs errors, never a good sentence that follows it."""
    decoder = bd.BeidouDecoder()
    decoder.feed(b"".join(garbage[i % 5] + line for i, line in enumerate(lines)))
    got, _ = drain(decoder)
    wanted = iter(got)
    assert all(any(item == bd.decode_sentence(line) for item in wanted) for line in lines)


def test_stream_decoder_byte_by_byte() -> None:
    """One byte at a time, the decoder answers NEED_DATA until the LF, then the sentence."""
    line = b"$BDFKI,082920,TCQ,Y,0,0*70\r\n"
    decoder = bd.BeidouDecoder()
    for byte in line[:-1]:
        decoder.feed(bytes([byte]))
        assert decoder.next_sentence() is bd.NEED_DATA
    decoder.feed(line[-1:])
    assert decoder.next_sentence() == bd.Bd3Feedback(T(8, 29, 20))
    assert decoder.next_sentence() is bd.NEED_DATA and decoder.buffered == 0


def test_stream_decoder_resynchronises() -> None:
    """Noise, a bad checksum and a cut-off sentence each cost one error; good ones survive."""
    good = b"$CCICA,0,00*7B\r\n"
    decoder = bd.BeidouDecoder()
    decoder.feed(b"\x00noise\r\n" + good + b"$CCICA,0,00*7C\r\n" + b"$BDFKI,0829" + good
                 + b"$CCICA,0,00*7B$CCICA,0,00*7B\r\n" + b"$BDT")
    sentences, errors = drain(decoder)
    assert sentences == [bd.Bd2CardQuery()] * 4
    assert [type(e) for e in errors] == [bd.ChecksumError, bd.FramingError]
    assert decoder.rejected == 2
    assert decoder.discarded == len(b"\x00noise\r\n$CCICA,0,00*7C\r\n$BDFKI,0829")
    assert decoder.buffered == 4  # `$BDT` may still become a sentence


def test_stream_decoder_drops_overlong_line() -> None:
    """A line with no end within max_line is dropped with one LineTooLongError; then it goes on."""
    decoder = bd.BeidouDecoder(max_line=64)
    decoder.feed(b"$BDTCI," + b"A" * 200)
    with pytest.raises(bd.LineTooLongError) as info:
        decoder.next_sentence()
    assert info.value.limit == 64
    assert decoder.next_sentence() is bd.NEED_DATA and decoder.buffered == 0
    for _ in range(100):  # the rest of the long line, trickling in, is noise
        decoder.feed(b"B" * 50)
        assert decoder.next_sentence() is bd.NEED_DATA and decoder.buffered == 0
    decoder.feed(b"\r\n$CCICA,0,00*7B\r\n")
    assert drain(decoder) == ([bd.Bd2CardQuery()], [])
    assert bd.MAX_LINE >= 3500 + 64  # a full BD-3 regional message (14,000 bits) fits a line
