"""The 叫应 contract (protocols/callresp.py): play_warning args inside signed commands, and the
delivered/ack event attrs: exact forms, round trips, and garbage that raises only our errors."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from protocols import callresp as cr
from protocols import commands as c

T0 = 1_718_000_000_000
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
ARGS = {"warning_id": "w-1", "level": "red", "text": "暴雨红色预警", "repeat": 3,
        "terminals": ["t-1", "t-2"]}


def test_play_warning_is_a_signed_command_kind() -> None:
    """play_warning args travel in a signed, canonical command whose target names the warning."""
    args = c.args_from_mapping("play_warning", ARGS)
    assert args == cr.PlayWarning("w-1", cr.Level.RED, "暴雨红色预警", 3, ("t-1", "t-2"))
    cmd = c.make_command("c1", gw="gw-1", args=args, issued_at_ms=T0, ttl_ms=300_000)
    assert (cmd.kind, cmd.target) == (c.CommandKind.PLAY_WARNING, "warning/w-1")
    body = c.encode_body(cmd)
    wire = cbor2.loads(body)
    assert wire["kind"] == "play_warning" and wire["args"] == ARGS
    assert c.open_command(KEY.public_key(), c.sign_command(KEY, cmd)) == cmd


@pytest.mark.parametrize(("patch", "field"), [
    ({"level": "purple"}, "args.level"),
    ({"repeat": 0}, "args.repeat"),
    ({"repeat": True}, "args.repeat"),
    ({"text": " "}, "args.text"),
    ({"text": "x" * 501}, "args.text"),
    ({"terminals": []}, "args.terminals"),
    ({"terminals": ["t-1", "t-1"]}, "args.terminals"),
    ({"terminals": ["bad id"]}, "args.terminals[0]"),
    ({"warning_id": ""}, "args.warning_id"),
    ({"extra": 1}, "args.extra"),
])
def test_bad_play_warning_args_are_malformed_commands(patch: dict[str, Any], field: str) -> None:
    """Each bad argument is a MalformedCommandError naming its field."""
    with pytest.raises(c.MalformedCommandError) as err:
        c.args_from_mapping("play_warning", {**ARGS, **patch})
    assert err.value.field == field


def test_event_attrs_exact_form() -> None:
    """An ack's attrs are exactly the documented map, and parse back to the same event."""
    ev = cr.CallRespEvent(cr.EventType.ACK, "w-1", "t-1", T0, cmd_id="abc", by="button-1")
    attrs = cr.event_attrs(ev)
    assert attrs == {"event": "callresp", "v": 1, "type": "ack", "warning_id": "w-1",
                     "terminal": "t-1", "at_ms": T0, "cmd_id": "abc", "by": "button-1"}
    assert cr.is_callresp(attrs) and cr.parse_event_attrs(attrs) == ev
    delivered = cr.CallRespEvent(cr.EventType.DELIVERED, "w-1", "t-2", T0)
    assert cr.event_attrs(delivered) == {"event": "callresp", "v": 1, "type": "delivered",
                                         "warning_id": "w-1", "terminal": "t-2", "at_ms": T0}


def test_event_versions_and_fields_are_checked() -> None:
    """Another version, a missing or unknown field, or `by` on a receipt are typed errors."""
    good = cr.event_attrs(cr.CallRespEvent(cr.EventType.DELIVERED, "w-1", "t-1", T0))
    with pytest.raises(cr.UnsupportedCallRespVersionError):
        cr.parse_event_attrs({**good, "v": 2})
    for bad in ({k: v for k, v in good.items() if k != "terminal"}, {**good, "x": 1},
                {**good, "by": "someone"}, {**good, "at_ms": -1}, {**good, "type": "nack"}):
        with pytest.raises(cr.CallRespError):
            cr.parse_event_attrs(bad)


ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,20}\Z")


@given(st.builds(cr.CallRespEvent, st.sampled_from(list(cr.EventType)), ids, ids,
                 st.integers(0, 2**53 - 1), st.none() | ids, st.none()))
def test_event_round_trip(ev: cr.CallRespEvent) -> None:
    """parse(attrs(x)) == x."""
    assert cr.parse_event_attrs(cr.event_attrs(ev)) == ev


@given(ids, st.sampled_from(list(cr.Level)), st.text(min_size=1, max_size=50).filter(str.strip),
       st.integers(1, cr.MAX_REPEAT), st.lists(ids, min_size=1, max_size=5, unique=True))
def test_play_warning_round_trip(wid: str, level: cr.Level, text: str, repeat: int,
                                 terminals: list[str]) -> None:
    """from_mapping(to_wire(x)) == x."""
    pw = cr.play_warning(wid, level, text, repeat, terminals)
    assert cr.play_warning_from_mapping(pw.to_wire()) == pw


@given(st.dictionaries(st.text(max_size=12), st.none() | st.integers() | st.text(max_size=8)
                       | st.booleans() | st.lists(st.integers(), max_size=3), max_size=8))
def test_garbage_raises_only_our_errors(obj: dict[str, Any]) -> None:
    """Arbitrary maps raise only CallRespError (events) or CommandError (args)."""
    for attrs in (obj, {**obj, "event": "callresp", "v": 1}):
        try:
            cr.parse_event_attrs(attrs)
        except cr.CallRespError:
            pass
    try:
        c.args_from_mapping("play_warning", obj)
    except c.CommandError:
        pass
