"""The envelope's validation layer (protocols.limits): one typed error with a reason per broken
rule; in a data batch a bad record is refused alone."""

from __future__ import annotations

import datetime

import cbor2
import pytest

from protocols import envelope as env
from protocols import limits
from protocols.narrowband import MalformedFrameError, _Reader
from tests.hostile import BIG, birth, cyclic_attrs, data, laughs, row, state, wire


def refused(payload: bytes) -> env.EnvelopeError:
    with pytest.raises(env.EnvelopeError) as info:
        env.decode(payload)
    return info.value


def only_rejection(payload: bytes) -> env.RejectedRecord:
    batch = env.decode(payload)
    assert isinstance(batch, env.DataBatch)
    (rj,) = batch.rejected
    return rj


@pytest.mark.parametrize(("payload", "cls", "field"), [
    (wire(state(backlog=BIG)), limits.IntRangeError, "backlog"),
    (wire(state(backlog=-1)), limits.IntRangeError, "backlog"),
    (wire(state(ts=BIG)), limits.IntRangeError, "ts"),
    (wire(state(stream="s\x00")), limits.BadStringError, "stream"),
    (wire(birth("g", ordinal=2**63)), limits.IntRangeError, "devs[0].pts[0].ordinal"),
    (wire(birth("g", key="k" * 300)), limits.StringTooLongError, "devs[0].pts[0].key"),
    (wire(data("g", "s" * 65, [row(1)])), limits.StringTooLongError, "stream"),
    (wire(data("g" * 65, "s", [row(1)])), limits.StringTooLongError, "gw"),
    (wire(data("g", "s", [row(1)], sent=BIG)), limits.IntRangeError, "sent"),
    (wire(data("g", "s", [row(1)] * (limits.MAX_RECORDS_PER_BATCH + 1))),
     limits.TooManyItemsError, "r"),
    (b"\xff\x00", limits.NotCborError, "payload"),
])
def test_message_level_rules_raise_their_own_error(payload: bytes, cls: type, field: str) -> None:
    """A bad field of a state, birth or batch refuses the message with its class and field."""
    exc = refused(payload)
    assert type(exc) is cls and exc.field == field  # type: ignore[attr-defined]
    assert exc.reason is cls.reason


def test_payload_over_the_limit_is_refused_before_decoding() -> None:
    """A payload past MAX_PAYLOAD_BYTES is refused by its size alone."""
    exc = refused(b"\xa0" + b"\x00" * limits.MAX_PAYLOAD_BYTES)
    assert exc.reason is limits.Reason.PAYLOAD_TOO_LARGE


@pytest.mark.parametrize(("bad", "reason", "seq"), [
    (row(2**63 - 1), limits.Reason.INT_RANGE, None),  # one past SEQ_MAX: storage needs seq+1
    (row(0), limits.Reason.INT_RANGE, None),
    (row(5, ts=BIG), limits.Reason.INT_RANGE, 5),
    (row(5, ts=limits.TS_MAX_MS + 1), limits.Reason.INT_RANGE, 5),
    (row(5, value=float("nan")), limits.Reason.NOT_FINITE, 5),
    (row(5, value=2**64), limits.Reason.INT_RANGE, 5),
    (row(5, value="x" * 5000), limits.Reason.STRING_TOO_LONG, 5),
    (row(5, value="a\x00b"), limits.Reason.BAD_STRING, 5),
    (row(5, value=b"raw"), limits.Reason.MALFORMED, 5),
    (row(5, kind=1, attrs=cyclic_attrs()), limits.Reason.SHARED_REFERENCE, 5),
    (row(5, kind=1, attrs={"x": laughs(10)}), limits.Reason.SHARED_REFERENCE, 5),
    (row(5, kind=1, attrs={"x": laughs(30)}), limits.Reason.ATTRS_TOO_DEEP, 5),
    (row(5, kind=1, attrs={"n": list(range(limits.MAX_ATTRS_NODES))}),
     limits.Reason.ATTRS_TOO_LARGE, 5),
    (row(5, kind=1, attrs={"k": 2**64}), limits.Reason.INT_RANGE, 5),
    (row(5, kind=1, attrs={"k": float("inf")}), limits.Reason.NOT_FINITE, 5),
    (row(5, kind=1, attrs={"k": datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)}),
     limits.Reason.UNSUPPORTED_VALUE, 5),
    (row(5, kind=1, attrs={"k": {1: "int key"}}), limits.Reason.UNSUPPORTED_VALUE, 5),
    (row(5, kind=1, attrs={"k": "a\x00"}), limits.Reason.BAD_STRING, 5),
    (row(5, point=1), limits.Reason.STRING_TOO_LONG, 5),  # names the 10 MB key
    (row(5, point=2), limits.Reason.BAD_POINT_KEY, 5),  # names a key without a device
])
def test_a_bad_record_is_refused_alone(bad: list[object], reason: limits.Reason,
                                       seq: int | None) -> None:
    """The records beside a bad one decode; the bad one is refused with its reason, and with
    its seq only when that seq is one an edge could have made."""
    pts = ["d1/gas", "d9/" + "k" * 10_000_000, "nodevice"]
    batch = env.decode(wire(data("g", "s", [row(1), bad, row(2)], pts=pts), sharing=True))
    assert isinstance(batch, env.DataBatch)
    assert [r.seq for r in batch.records] == [1, 2]
    (rj,) = batch.rejected
    assert (rj.index, rj.seq, rj.error.reason) == (1, seq, reason)


def test_string_references_cannot_amplify_a_batch() -> None:
    """Text repeated by CBOR string references beyond the payload's own size is refused."""
    text = "z" * 4000
    raw = cbor2.dumps(data("g", "s", [row(i, value=text) for i in range(1, 200)]),
                      string_referencing=True)
    batch = env.decode(raw)
    assert isinstance(batch, env.DataBatch) and len(raw) < 100_000
    assert sum(len(r.value) for r in batch.records) <= len(raw)  # type: ignore[arg-type]
    assert {rj.error.reason for rj in batch.rejected} == {limits.Reason.SHARED_REFERENCE}


def test_errors_never_print_a_huge_integer() -> None:
    """An integer of 100,000 digits is described by its size (str() of it would raise)."""
    exc = refused(wire(state(backlog=10**100_000)))
    assert "bit" in str(exc) and len(str(exc)) < 200


def test_narrowband_varints_stay_within_bigint() -> None:
    """A narrowband varint above 2**63-1 is a malformed frame, not a number storage refuses."""
    assert _Reader(bytes([0xFF] * 8 + [0x7F])).varint() == 2**63 - 1
    with pytest.raises(MalformedFrameError):
        _Reader(bytes([0xFF] * 9 + [0x01])).varint()
