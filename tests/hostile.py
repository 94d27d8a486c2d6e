"""Hostile but decodable uplink payloads (issue 10), shared by the ingest tests and
`bench/fuzz_ingest.py`: the cases the issue names, and hypothesis strategies of envelopes that
mix good records with every kind of bad one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cbor2
from hypothesis import strategies as st

from protocols import envelope as env
from protocols.limits import MAX_RECORDS_PER_BATCH, SEQ_MAX, TS_MAX_MS

T0 = 1_700_000_000_000
BIG = 2**64 + 5  # above every 64-bit column


def wire(obj: Any, *, sharing: bool = False) -> bytes:
    """CBOR of a raw envelope map; `sharing` writes CBOR tags 28/29 for repeated containers."""
    return cbor2.dumps(obj, value_sharing=sharing)


def row(seq: int, point: int = 0, value: Any = 1.0, kind: int = 0, ts: int = T0,
        attrs: Any = None) -> list[Any]:
    r = [seq, kind, ts, point, value, 0]
    if attrs is not None:
        r.append(attrs)
    return r


def data(gw: str, stream: str, rows: Sequence[list[Any]], pts: Sequence[Any] = ("d1/gas",),
         sent: int = T0) -> dict[str, Any]:
    return {"v": 1, "t": "data", "gw": gw, "stream": stream, "sent": sent, "pts": list(pts),
            "r": list(rows)}


def state(backlog: int = 0, ts: int = T0, stream: str = "s1") -> dict[str, Any]:
    return {"v": 1, "t": "state", "online": True, "boot": "b1", "ver": "0.1", "bearer": "4g",
            "backlog": backlog, "ts": ts, "stream": stream}


def birth(gw: str, ordinal: int = 0, key: str = "d1/gas") -> dict[str, Any]:
    return {"v": 1, "t": "birth", "gw": gw, "stream": "s1", "boot": "b1", "ver": "0.1",
            "devs": [{"id": "d1", "profile": "gas", "hash": "h",
                      "pts": [[ordinal, key, "可燃气体", "%LEL"]]}]}


def cyclic_attrs() -> dict[str, Any]:
    """Attrs that contain themselves: with `wire(sharing=True)`, tags 28/29."""
    attrs: dict[str, Any] = {"alarm_id": "d1/gas/hi", "state": "raised", "level": 1}
    attrs["self"] = attrs
    return attrs


def laughs(depth: int = 60) -> list[Any]:
    """A list DAG whose tree has 2**depth leaves: a few hundred bytes with tags 28/29."""
    node: list[Any] = [0]
    for _ in range(depth):
        node = [node, node]
    return node


def oversized_batch(gw: str, n: int = MAX_RECORDS_PER_BATCH + 1) -> bytes:
    """One more record than a batch may hold (the issue's 400,000, cut to what is refused)."""
    return wire(data(gw, "s-flood", [row(s) for s in range(1, n + 1)]))


# --- generated envelopes (the fuzz) -----------------------------------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
# Boundaries first (hypothesis draws small integers from a wide range far more often).
_ints = st.one_of(st.sampled_from([0, 1, -1, SEQ_MAX, SEQ_MAX + 1, 2**63 - 1, 2**63, 2**64,
                                   -2**63 - 1, 2**100, TS_MAX_MS + 1]),
                  st.integers(-3, 3), st.integers(-2**70, 2**70))
_floats = st.one_of(st.floats(), st.sampled_from([float("nan"), float("inf"), -float("inf")]))
_scalars = st.one_of(st.none(), st.booleans(), _ints, _floats, _text, st.binary(max_size=4))
_attr_values = st.recursive(_scalars, lambda c: st.lists(c, max_size=3)
                            | st.dictionaries(st.one_of(_text, st.integers(0, 3)), c, max_size=3),
                            max_leaves=12)


@st.composite
def command_result(draw: st.DrawFn, seq: int) -> list[Any]:
    """A CMD_RESULT record whose attrs name a command and a state, with hostile extra data."""
    attrs = {"cmd_id": draw(st.sampled_from(["c1", "c2", "x" * 70, ""])),
             "state": draw(st.sampled_from(["received", "succeeded", "failed", "pending", "?"])),
             **draw(st.dictionaries(_text, _attr_values, max_size=3))}
    return row(seq, point=-1, value=None, kind=3, attrs=attrs)


@st.composite
def bad_record(draw: st.DrawFn, npts: int) -> list[Any]:
    """A record row with one field (or the row itself) wrong."""
    r = row(draw(st.integers(1, 10_000)), point=draw(st.integers(-1, max(npts - 1, -1))),
            kind=draw(st.integers(0, 3)))
    which = draw(st.integers(0, 8))
    if which == 0:
        r[0] = draw(_ints)
    elif which == 1:
        r[2] = draw(_ints)
    elif which == 2:
        r[3] = draw(_ints)
    elif which == 3:
        r[4] = draw(_scalars)
    elif which == 4:
        r[5] = draw(_ints)
    elif which == 5:
        r.append(draw(_attr_values))
    elif which == 6:
        r[1] = draw(_ints)
    elif which == 7:
        r.append({"deep": laughs(draw(st.integers(1, 13)))})  # 2**13 leaves unshared
    else:
        return draw(st.lists(_scalars, max_size=8))
    return r


@st.composite
def fuzz_batch(draw: st.DrawFn, gw: str, stream: str, first_seq: int
               ) -> tuple[bytes, list[int]]:
    """A data payload mixing good telemetry records (seqs from `first_seq`, returned) with
    bad ones (seqs below 10,000: they never collide with the good ones), sometimes with bad
    point keys or shared references; sometimes the batch itself is bad."""
    pts: list[Any] = ["d1/gas", "d1/o2"]
    if draw(st.booleans()):
        pts.append(draw(st.one_of(_text, _ints, st.just("x" * 300), st.just("a/\x00b"))))
    n_good = draw(st.integers(0, 5))
    good = list(range(first_seq, first_seq + n_good))
    rows: list[Any] = [row(s, point=s % 2, value=float(s)) for s in good]
    bad = draw(st.lists(st.one_of(bad_record(len(pts)),
                                  command_result(draw(st.integers(1, 10_000)))), max_size=4))
    for b in bad:
        rows.insert(draw(st.integers(0, len(rows))), b)
    obj = data(gw, stream, rows, pts)
    if draw(st.integers(0, 9)) == 0:  # the batch itself: its good records go with it
        name = draw(st.sampled_from(sorted(_SPOILED)))
        obj[name] = draw(_SPOILED[name])
        good = []
    return wire(obj, sharing=draw(st.booleans())), good


_not_str = st.one_of(st.none(), st.booleans(), _ints, st.floats(), st.binary(max_size=4))
_not_list = st.one_of(_not_str, _text)
# Values that certainly spoil each batch field (a spoiled batch's good records are not
# expected at central).
_SPOILED = {"gw": st.one_of(_not_str, _text.filter(lambda t: t != "gw-f")),
            "stream": st.one_of(_not_str, st.just("s" * 65), st.just("s\x001")),
            "sent": st.one_of(_not_str.filter(lambda v: type(v) is not int),
                              st.integers(max_value=-1), st.integers(min_value=TS_MAX_MS + 1)),
            "pts": _not_list, "r": _not_list}


def hostile_envelope() -> st.SearchStrategy[bytes]:
    """Garbage, or a map whose version or type is wrong."""
    return st.one_of(st.binary(max_size=64),
                     st.builds(lambda v, t: wire({"v": v, "t": t}), _scalars, _scalars),
                     st.builds(lambda t: wire({"v": 1, "t": t, "stream": "s", "ranges": []}),
                               st.sampled_from(["ack", "cmd", "data", "state", "birth"])))


def hostile_state() -> st.SearchStrategy[bytes]:
    return st.builds(lambda b, t, s: wire(state(b, t, s)), _ints, _ints, _text)


def hostile_birth(gw: str) -> st.SearchStrategy[bytes]:
    return st.builds(lambda o, k: wire(birth(gw, o, k)), _ints, _text)


__all__ = ["BIG", "T0", "birth", "bad_record", "command_result", "cyclic_attrs", "data", "env", "fuzz_batch",
           "hostile_birth", "hostile_envelope", "hostile_state", "laughs", "oversized_batch", "row", "state",
           "wire"]
