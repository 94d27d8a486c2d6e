"""Tiantong codecs: SMS PDUs in UCS2 (TS 23.040) and the AT subset (TS 27.005 / 27.007)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import at_commands as atc
from protocols import at_responses as atr
from protocols.errors import ProtocolError
from protocols.sms_pdu import (
    Concat,
    Reassembler,
    SmsDeliver,
    SmsError,
    SmsFormatError,
    SmsSubmit,
    decode_deliver,
    decode_submit,
    decode_timestamp,
    encode_address,
    encode_deliver,
    encode_submit,
    encode_timestamp,
    split_text,
    submits_for,
    ucs2_units,
)

BEIJING = timezone(timedelta(hours=8))

# Vectors made by this codec and decoded to the same fields by an independent implementation,
# python-gsmmodem-new 0.13.0 (gsmmodem/pdu.py `decodeSmsPdu`); its own encoder gives the same
# bytes but for the first octet (it sets TP-SRR: 0x31 / 0x71 where these have 0x11 / 0x51).
#
# SMS-SUBMIT "燃气泄漏二级报警" to +8617400001234, TP-MR 0, TP-VP 167 (24 h), no SCA:
#   00 | 11 (SUBMIT, VPF relative) | 00 (MR) | 0D 91 68 71 04 00 10 32 F4 (13 digits,
#   international, 86 17 40 00 01 23 4 swapped and F-padded) | 00 (PID) | 08 (UCS2) | A7 (VP)
#   | 10 (16 octets) | 71C3 6C14 6CC4 6F0F 4E8C 7EA7 62A5 8B66
SUBMIT_HEX = "0011000D91687104001032F40008A71071C36C146CC46F0F4E8C7EA762A58B66"
SUBMIT = SmsSubmit("+8617400001234", "燃气泄漏二级报警", 0, validity=167)
# SMS-DELIVER "收到" from +8617400005678 via centre +8613800270500, stamped
# 2025-12-06 13:46:40 +08:00: 08 91 683108200705F0 (SCA) | 04 (DELIVER, no more messages) |
#   0D 91 687104005076F8 | 00 | 08 | 52 21 60 31 64 04 23 (SCTS; 23 = +32 quarter hours) |
#   04 | 6536 5230
DELIVER_HEX = "0891683108200705F0040D91687104005076F80008522160316404230465365230"
DELIVER = SmsDeliver("+8617400005678", "收到", datetime(2025, 12, 6, 13, 46, 40,
                                                         tzinfo=BEIJING))
# The first part of a 100-character text: UDHI set (first octet 0x51), UDL 0x8C = 140 =
# 6 (UDH 05 00 03 2A 02 01: concatenation, ref 42, 2 parts, part 1) + 67 × 2.
PART1_HEX = "0051000D91687104001032F40008A78C0500032A0201" + "6C34" * 67


# ---------------------------------------------------------------------------- SMS vectors


def test_submit_vector_both_ways() -> None:
    """The worked SMS-SUBMIT encodes to its bytes (TPDU 31 octets) and decodes back."""
    pdu, tpdu_length = encode_submit(SUBMIT)
    assert pdu.hex().upper() == SUBMIT_HEX and tpdu_length == 31
    assert decode_submit(bytes.fromhex(SUBMIT_HEX)) == (None, SUBMIT)


def test_deliver_vector_both_ways() -> None:
    """The worked SMS-DELIVER with a centre address and a +08:00 time stamp, both ways."""
    assert encode_deliver(DELIVER, "+8613800270500").hex().upper() == DELIVER_HEX
    sca, message = decode_deliver(bytes.fromhex(DELIVER_HEX))
    assert (sca, message) == ("+8613800270500", DELIVER)
    assert message.timestamp.utcoffset() == timedelta(hours=8)


def test_long_text_is_concatenated() -> None:
    """100 characters go as 67 + 33 with an 8-bit-reference UDH; the first part is exact."""
    parts = submits_for("+8617400001234", "水" * 100, ref=42)
    assert [ucs2_units(p.text) for p in parts] == [67, 33]
    assert [p.concat for p in parts] == [Concat(42, 2, 1), Concat(42, 2, 2)]
    assert [p.reference for p in parts] == [0, 1]
    assert encode_submit(parts[0])[0].hex().upper() == PART1_HEX
    assert decode_submit(bytes.fromhex(PART1_HEX))[1] == parts[0]


def test_seventy_characters_fit_one_message() -> None:
    """70 UCS2 characters are one message without a header; 71 are two parts."""
    assert split_text("警" * 70) == ["警" * 70]
    assert [len(p) for p in split_text("警" * 71)] == [67, 4]
    with pytest.raises(SmsFormatError):
        SmsSubmit("+861", "警" * 71)
    with pytest.raises(SmsFormatError):
        SmsSubmit("+861", "警" * 68, concat=Concat(1, 2, 1))


def test_surrogate_pairs_are_not_split() -> None:
    """A character beyond the BMP counts two units and never straddles two parts."""
    text = "a" * 66 + "😀" + "b"
    assert ucs2_units(text) == 69 and split_text(text) == [text]
    long = "a" * 66 + "😀" * 3
    parts = split_text(long)
    assert parts == ["a" * 66, "😀" * 3] and "".join(parts) == long


def test_timestamp_sign_and_quarters() -> None:
    """§9.2.3.11: +08:00 is 23 (32 quarters), −05:00 is 0A (20 quarters, sign bit 3)."""
    east = datetime(2026, 1, 2, 3, 4, 5, tzinfo=BEIJING)
    west = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(-timedelta(hours=5)))
    assert encode_timestamp(east).hex() == "62102030405023"
    assert encode_timestamp(west)[-1] == 0x0A
    assert decode_timestamp(encode_timestamp(west)) == west
    assert decode_timestamp(bytes.fromhex("62102030405000")).tzinfo is UTC


def test_addresses() -> None:
    """§9.1.2.5: international 0x91 with swapped, F-padded BCD; national 0x81."""
    assert encode_address("+8613800270500").hex().upper() == "0D91683108200705F0"
    assert encode_address("10086").hex() == "05810180f6"  # 10 08 6F swapped
    for bad in ("", "+", "12a", "+" + "1" * 21):
        with pytest.raises(SmsFormatError):
            encode_address(bad)


@pytest.mark.parametrize("pdu", [
    SUBMIT_HEX.replace("0008A7", "0000A7"),  # GSM 7-bit: not supported, typed error
    "00" + "13" + SUBMIT_HEX[4:],  # VPF absolute
    SUBMIT_HEX[:-2],  # UDL says more than there is
    SUBMIT_HEX + "00",  # an extra octet
    DELIVER_HEX,  # a DELIVER is not a SUBMIT
    "001100" + "0DD0" + SUBMIT_HEX[10:],  # alphanumeric destination
    SUBMIT_HEX[:-4] + "D800",  # a lone surrogate
])
def test_bad_submits_raise_sms_errors(pdu: str) -> None:
    """Unsupported or malformed PDUs raise SmsFormatError naming the field."""
    with pytest.raises(SmsFormatError) as info:
        decode_submit(bytes.fromhex(pdu))
    assert info.value.field and issubclass(SmsError, ProtocolError)


def test_reassembler() -> None:
    """Parts in any order, with a repeat, come back as the whole text once."""
    ts = DELIVER.timestamp
    parts = [SmsDeliver("+86174", s.text, ts, s.concat)
             for s in submits_for("+86174", "甲" * 150, ref=9)]
    r = Reassembler()
    assert r.add(parts[2]) is None and r.add(parts[0]) is None and r.add(parts[0]) is None
    assert r.add(parts[1]) == "甲" * 150
    assert r.add(DELIVER) == "收到"


# ---------------------------------------------------------------------------- AT vectors


def test_commands_both_ways() -> None:
    """Command lines parse to their parts and encode back with CR (V.250 §5.2.1)."""
    table = {
        b"AT\r": atc.Command(""),
        b"ATE0\r": atc.Command("E0"),
        b"AT+CREG?\r": atc.Command("+CREG", "?"),
        b"AT+CSQ\r": atc.Command("+CSQ"),
        b"AT+CMGF=0\r": atc.Command("+CMGF", "=", ("0",)),
        b"AT+CMGS=31\r": atc.cmgs(31),
        b'AT+CPMS="SM","SM"\r': atc.Command("+CPMS", "=", ('"SM"', '"SM"')),
        b"AT+CMGF=?\r": atc.Command("+CMGF", "=?"),
    }
    for wire, command in table.items():
        assert atc.parse_command(wire[:-1].decode()) == command
        assert atc.encode_command(command) == wire
    assert atc.parse_command("at+csq") == atc.Command("+CSQ")
    for bad in ("+CSQ", "AT+CSQ?x", "hello"):
        with pytest.raises(atc.AtFormatError):
            atc.parse_command(bad)


def test_responses_both_ways() -> None:
    """A module's session (echo, answers, prompt, URCs, a read) decodes to events and back."""
    session = [
        (b"AT+CSQ\r", None),
        (b"\r\n+CSQ: 20,99\r\n", atr.Csq(20, 99)),
        (b"\r\nOK\r\n", atr.Result(True)),
        (b"\r\n> ", atr.Prompt()),
        (b"\r\n+CMGS: 12\r\n", atr.Cmgs(12)),
        (b"\r\n+CMS ERROR: 331\r\n", atr.CmsErrorResult(331)),
        (b"\r\n+CME ERROR: 10\r\n", atr.CmeErrorResult(10)),
        (b"\r\n+CREG: 0,1\r\n", atr.Creg(atr.RegStatus.HOME, 0)),
        (b"\r\n+CREG: 2\r\n", atr.Creg(atr.RegStatus.SEARCHING)),
        (b'\r\n+CMTI: "SM",3\r\n', atr.Cmti("SM", 3)),
        (b'\r\n+CMGR: 0,"",24\r\n' + DELIVER_HEX.encode() + b"\r\n",
         atr.Cmgr(0, 24, bytes.fromhex(DELIVER_HEX))),
        (b'\r\n+CMT: "",24\r\n' + DELIVER_HEX.encode() + b"\r\n",
         atr.Cmt(24, bytes.fromhex(DELIVER_HEX))),
        (b"\r\nERROR\r\n", atr.Result(False)),
    ]
    decoder = atr.ResponseDecoder()
    decoder.feed(b"".join(wire for wire, _ in session))
    events = []
    while (event := decoder.next_event()) is not atc.NEED_DATA:
        events.append(event)
    assert events == [atr.InfoLine("AT+CSQ")] + [e for _, e in session if e is not None]
    for wire, expected in session[1:]:
        assert expected is not None and atr.encode_response(expected) == wire
    decoder.feed(b"\r\n+CMGR: 1,,24\r\n")  # alpha left out, PDU line still to come
    assert decoder.next_event() is atc.NEED_DATA
    decoder.feed(DELIVER_HEX.encode() + b"\r\n")
    assert decoder.next_event() == atr.Cmgr(1, 24, bytes.fromhex(DELIVER_HEX))


def test_pdu_entry_and_cancel() -> None:
    """After the prompt the module reads hex up to Ctrl-Z; ESC cancels."""
    decoder = atc.CommandDecoder()
    decoder.feed(b"AT+CMGS=31\r")
    assert decoder.next_event() == atc.cmgs(31)
    decoder.expect_pdu()
    decoder.feed(SUBMIT_HEX.encode()[:20])
    assert decoder.next_event() is atc.NEED_DATA
    decoder.feed(SUBMIT_HEX.encode()[20:] + b"\x1aAT+CMGS=5\r")
    assert decoder.next_event() == atc.PduEntry(bytes.fromhex(SUBMIT_HEX))
    assert decoder.next_event() == atc.cmgs(5)
    decoder.expect_pdu()
    decoder.feed(b"0011\x1b")
    assert decoder.next_event() == atc.PduCancelled()


@pytest.mark.parametrize("line", [b"+CSQ: x,99", b"+CMS ERROR: ", b"+CREG: 0,9", b"+CMTI: 3",
                                  b'+CMGR: 0,""', b"\xff\xfe", b"+CSQ: 40,99"])
def test_malformed_response_lines(line: bytes) -> None:
    """A line that names a response but does not parse is an AtFormatError; the next line
    still comes through."""
    decoder = atr.ResponseDecoder()
    decoder.feed(line + b"\r\nOK\r\n")
    with pytest.raises(atc.AtFormatError):
        decoder.next_event()
    assert decoder.next_event() == atr.Result(True)


def test_overlong_lines_are_bounded() -> None:
    """A line with no end past the limit raises AtLengthError and the buffer is emptied."""
    decoder = atr.ResponseDecoder(max_line=64)
    decoder.feed(b"x" * 100)
    with pytest.raises(atc.AtLengthError):
        decoder.next_event()
    assert decoder.buffered == 0


# ---------------------------------------------------------------------------- round trips

relaxed = settings(deadline=None)
_NUMBERS = st.from_regex(r"\+?[0-9]{1,20}", fullmatch=True)
_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=67).filter(
    lambda t: ucs2_units(t) <= 67)
_TIMES = st.builds(lambda dt, q: dt.replace(tzinfo=timezone(timedelta(minutes=15 * q))),
                   st.datetimes(datetime(2000, 1, 1), datetime(2099, 12, 31)).map(
                       lambda d: d.replace(microsecond=0)), st.integers(-79, 79))
_CONCAT = st.none() | st.integers(1, 255).flatmap(lambda total: st.builds(
    Concat, st.integers(0, 255), st.just(total), st.integers(1, total)))


@relaxed
@given(st.builds(SmsSubmit, _NUMBERS, _TEXT, st.integers(0, 255), _CONCAT,
                 st.none() | st.integers(0, 255), st.booleans(), st.booleans(),
                 st.integers(0, 255)), st.none() | _NUMBERS)
def test_submit_round_trip(message: SmsSubmit, sca: str | None) -> None:
    """decode_submit(encode_submit(m)) == m, and the length names the TPDU."""
    pdu, length = encode_submit(message, sca)
    assert len(pdu) == pdu[0] + 1 + length
    assert decode_submit(pdu) == (sca, message)


@relaxed
@given(st.builds(SmsDeliver, _NUMBERS, _TEXT, _TIMES, _CONCAT, st.booleans(), st.booleans(),
                 st.integers(0, 255)), st.none() | _NUMBERS)
def test_deliver_round_trip(message: SmsDeliver, sca: str | None) -> None:
    """decode_deliver(encode_deliver(m)) == m, time zone included."""
    _, decoded = decode_deliver(encode_deliver(message, sca))
    assert decoded == message
    assert decoded.timestamp.utcoffset() == message.timestamp.utcoffset()


@relaxed
@given(st.text(st.characters(exclude_categories=["Cs"]), max_size=600), st.integers(0, 255))
def test_split_round_trip(text: str, ref: int) -> None:
    """Any text splits into parts that each fit and join back to it."""
    parts = submits_for("+8610", text, ref=ref)
    assert "".join(p.text for p in parts) == text
    r = Reassembler()
    wholes = [r.add(SmsDeliver("+8610", p.text, DELIVER.timestamp, p.concat)) for p in parts]
    assert wholes[-1] == text and all(w is None for w in wholes[:-1])


_RESPONSES: st.SearchStrategy[atr.Response] = st.one_of(
    st.builds(atr.Result, st.booleans()),
    st.builds(atr.CmsErrorResult, st.integers(0, 999)),
    st.builds(atr.CmeErrorResult, st.integers(0, 999)),
    st.just(atr.Prompt()),
    st.builds(atr.Creg, st.sampled_from(atr.RegStatus), st.none() | st.integers(0, 2)),
    st.builds(atr.Csq, st.integers(0, 31) | st.just(99), st.integers(0, 7) | st.just(99)),
    st.builds(atr.Cmgs, st.integers(0, 255)),
    st.builds(atr.Cmti, st.sampled_from(["SM", "ME", "MT"]), st.integers(0, 999)),
    st.builds(atr.Cmgr, st.integers(0, 3), st.integers(0, 255),
              st.binary(min_size=1, max_size=176)),
    st.builds(atr.Cmt, st.integers(0, 255), st.binary(min_size=1, max_size=176)),
    st.builds(atr.InfoLine, st.from_regex(r"[A-Za-z][ -~]{0,40}", fullmatch=True).filter(
        lambda t: t.strip() not in ("OK", "ERROR") and t == t.strip())),
)


@relaxed
@given(st.lists(_RESPONSES, max_size=8), st.integers(1, 30))
def test_response_stream_round_trip(responses: list[atr.Response], chunk: int) -> None:
    """Any run of responses, fed in chunks, decodes to the same events in order."""
    wire = b"".join(atr.encode_response(r) for r in responses)
    decoder = atr.ResponseDecoder()
    got: list[atr.Response] = []
    for at in range(0, len(wire), chunk):
        decoder.feed(wire[at : at + chunk])
        while (event := decoder.next_event()) is not atc.NEED_DATA:
            got.append(event)
    assert got == responses


# ---------------------------------------------------------------------------- garbage


@relaxed
@given(st.binary(max_size=300))
def test_sms_garbage_raises_only_sms_errors(data: bytes) -> None:
    """Random PDUs, bare or behind real headers, raise nothing but SmsError."""
    for candidate in (data, bytes.fromhex(SUBMIT_HEX)[:12] + data,
                      bytes.fromhex(DELIVER_HEX)[:20] + data, b"\x00\x51" + data):
        for decode in (decode_submit, decode_deliver):
            try:
                decode(candidate)
            except SmsError:
                pass


@relaxed
@given(st.binary(max_size=300))
def test_at_garbage_raises_only_at_errors(data: bytes) -> None:
    """Random bytes on either side of the AT line raise nothing but AtError."""
    for decoder in (atr.ResponseDecoder(max_line=128), atc.CommandDecoder(max_line=128)):
        decoder.feed(data + b"\r\n+CMGR: 0,,3\r\n" + data + b"\r\n" + data)
        if isinstance(decoder, atc.CommandDecoder):
            decoder.expect_pdu()
        for _ in range(200):
            try:
                if decoder.next_event() is atc.NEED_DATA:
                    break
            except atc.AtError:
                pass
