"""The uplink envelope codec: exact bytes, round trips, garbage."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols import envelope as env
from protocols.errors import ProtocolError


def test_ack_bytes_are_the_documented_cbor_map() -> None:
    """An ack encodes to the CBOR map of DESIGN.md §4 and back."""
    ack = env.Ack(stream="s1", ranges=((1, 3), (7, 7)))
    raw = env.encode(ack)
    assert cbor2.loads(raw) == {"v": 1, "t": "ack", "stream": "s1", "ranges": [[1, 3], [7, 7]]}
    assert env.decode(raw) == ack


def test_data_batch_shares_point_keys() -> None:
    """Records of one point share one entry in the batch's point table."""
    recs = tuple(env.Record(seq=i, kind=env.RecordKind.TELEMETRY, ts_ms=1000 + i, point="d1/gas",
                            value=float(i)) for i in range(1, 4))
    raw = env.encode(env.DataBatch(gw="gw-1", stream="abc", records=recs, sent_ms=9))
    wire = cbor2.loads(raw)
    assert wire["pts"] == ["d1/gas"]
    assert [r[3] for r in wire["r"]] == [0, 0, 0]
    assert env.decode(raw).records == recs


def test_unknown_version_and_type_are_typed_errors() -> None:
    """A future version or unknown type raises its own error class."""
    with pytest.raises(env.UnsupportedVersionError):
        env.decode(cbor2.dumps({"v": 3, "t": "ack"}))
    with pytest.raises(env.UnknownMessageTypeError):
        env.decode(cbor2.dumps({"v": 1, "t": "nope"}))
    with pytest.raises(env.MalformedEnvelopeError) as info:
        env.decode(cbor2.dumps({"v": 1, "t": "ack", "stream": "s", "ranges": [[3, 1]]}))
    assert info.value.field == "ranges[0]"


def test_ranges_collapse_and_expand() -> None:
    """Seqs collapse to sorted inclusive ranges and expand back."""
    assert env.ranges_from_seqs([5, 1, 2, 3, 9, 10]) == ((1, 3), (5, 5), (9, 10))
    assert list(env.seqs_in_ranges(((1, 3), (5, 5)))) == [1, 2, 3, 5]


# Text as the limits allow it (protocols.limits): no NUL, which PostgreSQL cannot store.
texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)
values = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1),
                   st.floats(allow_nan=False, allow_infinity=False), texts)
records = st.builds(
    env.Record,
    seq=st.integers(1, 2**63 - 2), kind=st.sampled_from(env.RecordKind),
    ts_ms=st.integers(0, 2**45),
    point=st.one_of(st.none(), st.builds(lambda d, p: f"{d}/{p}", texts, texts)),
    value=values, flags=st.sampled_from([env.Flag.NONE, env.Flag.HISTORICAL,
                                         env.Flag.HISTORICAL | env.Flag.CLOCK_SUSPECT]),
    attrs=st.one_of(st.none(), st.dictionaries(texts.filter(bool), st.integers(-2**63, 2**63 - 1),
                                               min_size=1, max_size=3)),
)


@given(st.lists(records, max_size=20), texts)
def test_data_round_trip(recs: list[env.Record], stream: str) -> None:
    """decode(encode(batch)) == batch for any records."""
    batch = env.DataBatch(gw="gw", stream=stream, records=tuple(recs), sent_ms=1)
    assert env.decode(env.encode(batch)) == batch


@given(st.builds(env.State, online=st.booleans(), boot_id=texts, version=texts,
                 bearer=texts, backlog=st.integers(0, 2**40), ts_ms=st.integers(0, 2**45),
                 stream=texts))
def test_state_round_trip(state: env.State) -> None:
    """decode(encode(state)) == state."""
    assert env.decode(env.encode(state)) == state


@given(st.binary(max_size=200))
def test_garbage_raises_only_envelope_errors(raw: bytes) -> None:
    """Arbitrary bytes either decode or raise an EnvelopeError, nothing else."""
    try:
        env.decode(raw)
    except env.EnvelopeError:
        pass


@given(st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5)),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c, max_size=4),
                    max_leaves=20))
def test_wellformed_cbor_of_wrong_shape_raises_envelope_errors(obj: object) -> None:
    """Valid CBOR with a wrong shape is a typed error, also inside a data message."""
    for wrapped in (obj, {"v": 1, "t": "data", "gw": "g", "stream": "s", "sent": 0, "pts": [], "r": [obj]},
                    {"v": 1, "t": "birth", "gw": "g", "stream": "s", "boot": "b", "ver": "1", "devs": [obj]}):
        try:
            env.decode(cbor2.dumps(wrapped))
        except ProtocolError as exc:
            assert isinstance(exc, env.EnvelopeError)


seq_sets = st.sets(st.integers(1, 60), max_size=40)


@given(seq_sets, seq_sets)
def test_range_arithmetic_matches_set_arithmetic(a: set[int], b: set[int]) -> None:
    """merge/subtract/count on ranges agree with the same operations on the seq sets (the
    uplink tracks in-flight batches as ranges)."""
    ra, rb = env.ranges_from_seqs(a), env.ranges_from_seqs(b)
    assert env.subtract_ranges(ra, rb) == env.ranges_from_seqs(a - b)
    assert env.merge_ranges([*ra, *rb]) == env.ranges_from_seqs(a | b)
    assert env.count_in_ranges(ra) == len(a)
    assert set(env.seqs_in_ranges(ra)) == a
