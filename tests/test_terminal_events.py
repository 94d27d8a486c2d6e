"""The terminal driver's EVENT contracts (`protocols.terminal_events`): round trips, the
documented examples, and malformed attrs → only `AttrsError`."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.callresp import Level
from protocols.record_attrs import AttrsError, UnsupportedAttrsVersionError
from protocols.terminal_events import (
    FaultState,
    LocalWarningEvent,
    TerminalFault,
    TerminalFaultEvent,
)

FAULT = {"event": "terminal_fault", "v": 1, "terminal": "t-101", "fault": "speaker_fault",
         "state": "raised", "at_ms": 1718000012345, "battery": 87}
LOCAL = {"event": "callresp_local", "v": 1, "warning_id": "local-1718000012345-3f2a9c1b",
         "level": "red", "text": "…", "alarm_id": "gas-1/gas_lel/high", "at_ms": 1718000012345,
         "played": {"t-101": "delivered", "t-102": "refused"}}


def test_documented_examples_read_and_write_back() -> None:
    """The module doc's two examples parse and render to the same maps."""
    assert TerminalFaultEvent.from_attrs(FAULT).to_attrs() == FAULT
    assert LocalWarningEvent.from_attrs(LOCAL).to_attrs() == LOCAL


_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)


@given(_ids, st.sampled_from(TerminalFault), st.sampled_from(FaultState),
       st.integers(0, 2**53 - 1), st.none() | st.integers(0, 100))
def test_fault_round_trip(t: str, f: TerminalFault, s: FaultState, at: int,
                          b: int | None) -> None:
    ev = TerminalFaultEvent(t, f, s, at, b)
    assert TerminalFaultEvent.from_attrs(ev.to_attrs()) == ev


@given(_ids, st.sampled_from(Level), st.text(min_size=1).filter(str.strip), _ids,
       st.integers(0, 2**53 - 1), st.dictionaries(_ids, st.sampled_from(["sent", "refused"])))
def test_local_round_trip(w: str, lv: Level, text: str, alarm: str, at: int,
                          played: dict[str, str]) -> None:
    ev = LocalWarningEvent(w, lv, text, alarm, at, played)
    assert LocalWarningEvent.from_attrs(ev.to_attrs()) == ev


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                     lambda c: st.lists(c) | st.dictionaries(st.text(), c), max_leaves=10)


@given(st.dictionaries(st.sampled_from([*FAULT, *LOCAL, "x"]), _json))
def test_garbage_raises_only_attrs_error(attrs: dict[str, Any]) -> None:
    for kind in (TerminalFaultEvent, LocalWarningEvent):
        try:
            kind.from_attrs(attrs)
        except AttrsError:
            pass


def test_unknown_version_and_wrong_event() -> None:
    with pytest.raises(UnsupportedAttrsVersionError):
        TerminalFaultEvent.from_attrs(FAULT | {"v": 2})
    with pytest.raises(AttrsError):
        LocalWarningEvent.from_attrs(FAULT)
