"""Envelope v2: the columnar data batch (protocols.columnar) beside version 1."""

from __future__ import annotations

import math
import struct

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols import envelope as env
from protocols.columnar import columns_from, pack_ints, unpack
from protocols.errors import ProtocolError
from tests.test_envelope import records, texts

T = env.RecordKind.TELEMETRY
H = env.Flag.HISTORICAL


def _backlog(n: int, start: int = 101) -> tuple[env.Record, ...]:
    return tuple(env.Record(start + i, T, 1_700_000_000_000 + 259 * i, f"d{i % 10}/p{i % 7}",
                            float(i % 1000), H) for i in range(n))


def test_columnar_bytes_are_the_documented_map() -> None:
    """Three consecutive readings encode to the documented columns, exact bytes."""
    recs = (env.Record(7, T, 1000, "d/a", 1.5), env.Record(8, T, 1250, "d/b", 2.0),
            env.Record(9, T, 1000, "d/a", -0.25))
    raw = env.encode(env.DataBatch(gw="g", stream="s", records=recs, sent_ms=3), version=2)
    assert cbor2.loads(raw) == {
        "v": 2, "t": "data", "gw": "g", "stream": "s", "sent": 3, "pts": ["d/a", "d/b"],
        "n": 3, "s": 7, "t0": 1000, "td": b"h" + struct.pack("<2h", 250, -250),
        "p": b"B\x01\x02\x01", "f": 0, "vf": b"f" + struct.pack("<3f", 1.5, 2.0, -0.25)}
    assert env.decode(raw).records == recs


def test_a_version_1_batch_still_decodes_as_before() -> None:
    """The version 1 vector (one record array) decodes unchanged beside version 2."""
    raw = cbor2.dumps({"v": 1, "t": "data", "gw": "g", "stream": "s", "sent": 0,
                       "pts": ["d/a"], "r": [[5, 0, 1000, 0, 12.5, 1]]})
    assert env.decode(raw).records == (env.Record(5, T, 1000, "d/a", 12.5, H),)


def test_backlog_costs_under_12_bytes_a_reading() -> None:
    """A backlog batch of 5,000 readings: float32-exact values 7-8 bytes a reading, any
    float64 values under 12 (version 1: ~26)."""
    recs = _backlog(5000)
    v1 = len(env.encode(env.DataBatch(gw="g", stream="s" * 16, records=recs)))
    v2 = len(env.encode(env.DataBatch(gw="g", stream="s" * 16, records=recs), version=2))
    odd = tuple(r._replace(value=r.value + 0.1) for r in recs)
    v2_f64 = len(env.encode(env.DataBatch(gw="g", stream="s" * 16, records=odd), version=2))
    assert v2 / 5000 < 8 < 12 < v1 / 5000
    assert v2_f64 / 5000 < 12
    assert env.decode(env.encode(env.DataBatch(gw="g", stream="s", records=odd),
                                 version=2)).records == odd


@given(st.lists(records, max_size=20), texts)
def test_columnar_round_trip(recs: list[env.Record], stream: str) -> None:
    """decode(encode(batch, version=2)) == batch for any records (mixed kinds, gaps, attrs)."""
    batch = env.DataBatch(gw="gw", stream=stream, records=tuple(recs), sent_ms=1)
    got = env.decode(env.encode(batch, version=2))
    assert got == batch
    assert got.columns is not None and list(got.columns.seqs) == [r.seq for r in recs]


def test_columns_from_the_outbox_encode_as_their_records_do() -> None:
    """The edge drain encodes columns read straight from the outbox (`encode_columns`, seqs
    as a range when they run by one): the same bytes as the batch of those records."""
    for recs in (_backlog(300), _backlog(300)[:100] + _backlog(200, start=205)):
        seqs = [r.seq for r in recs]
        run = range(seqs[0], seqs[-1] + 1)
        cols = columns_from(run if list(run) == seqs else seqs, None, [r.ts_ms for r in recs],
                            [r.point for r in recs], [r.value for r in recs],
                            [int(r.flags) for r in recs], {})
        raw = env.encode_columns("g", "s", 3, cols)
        assert raw == env.encode(env.DataBatch(gw="g", stream="s", records=recs, sent_ms=3),
                                 version=2)
        assert env.decode(raw).records == recs


def test_a_bad_record_is_refused_alone_in_version_2() -> None:
    """A non-finite value, a time out of range and a bad point key refuse their own records;
    the rest of the batch is kept, and the refused seqs are reported."""
    recs = _backlog(6)
    wire = cbor2.loads(env.encode(env.DataBatch(gw="g", stream="s", records=recs), version=2))
    wire["vl"] = [*map(float, range(6))]
    del wire["vf"]
    wire["vl"][1] = math.inf
    wire["td"] = pack_ints([1, -2**45, 2**45, 1, 1])  # record 2's time is negative
    wire["pts"][recs[4].point is not None and 4] = "no-slash"
    got = env.decode(cbor2.dumps(wire))
    assert isinstance(got, env.DataBatch)
    refused = {rj.seq: rj.error.reason for rj in got.rejected}
    assert refused[102] == env.Reason.NOT_FINITE
    assert refused[103] == env.Reason.INT_RANGE
    assert refused[105] == env.Reason.BAD_POINT_KEY
    assert [r.seq for r in got.records] == [101, 104, 106]


@pytest.mark.parametrize("field, raw", [("td", b"h\x00"), ("p", b"z\x00\x00"),
                                         ("vf", b"q" + bytes(8 * 3)), ("s", "1"),
                                         ("n", 10**6)])
def test_a_column_of_the_wrong_shape_refuses_the_batch(field: str, raw: object) -> None:
    """A packed column of the wrong length or type is a typed error for the whole batch."""
    wire = cbor2.loads(env.encode(env.DataBatch(gw="g", stream="s", records=_backlog(3)),
                                  version=2))
    wire[field] = raw
    with pytest.raises(env.EnvelopeError):
        env.decode(cbor2.dumps(wire))


@given(st.dictionaries(st.sampled_from(["n", "s", "sd", "k", "t0", "td", "p", "f", "vf", "vl",
                                        "a", "pts"]),
                       st.one_of(st.integers(), st.binary(max_size=24),
                                 st.lists(st.integers(), max_size=3), st.text(max_size=4),
                                 st.dictionaries(st.integers(-2, 4), st.none(), max_size=2)),
                       max_size=4))
def test_garbage_columns_raise_only_envelope_errors(fields: dict[str, object]) -> None:
    """Any mangling of a version 2 batch either decodes or raises an EnvelopeError."""
    wire = cbor2.loads(env.encode(env.DataBatch(gw="g", stream="s", records=_backlog(3)),
                                  version=2))
    try:
        env.decode(cbor2.dumps(wire | fields))
    except ProtocolError as exc:
        assert isinstance(exc, env.EnvelopeError)


def test_central_state_announces_version_2_and_old_states_read_as_1() -> None:
    """`env` travels in the state only when above 1; a state without it reads as 1."""
    new = env.State(online=True, boot_id="b", version="x", bearer="central", backlog=0,
                    envelope=2)
    assert cbor2.loads(env.encode(new))["env"] == 2
    assert env.decode(env.encode(new)) == new
    old = env.State(online=True, boot_id="b", version="x", bearer="central", backlog=0)
    assert "env" not in cbor2.loads(env.encode(old))
    assert env.decode(env.encode(old)).envelope == 1


def test_packed_ints_take_the_smallest_type() -> None:
    """Int columns pick the smallest array type that holds them, and unpack back."""
    assert pack_ints([0, 255], unsigned=True)[:1] == b"B"
    assert pack_ints([-1, 300])[:1] == b"h"
    assert pack_ints([2**40])[:1] == b"q"
    assert unpack("x", pack_ints([-5, 2**33]), 2) == [-5, 2**33]
