"""What a gateway reports about its 叫应 terminals besides receipts and acks (those are
`protocols.callresp`): EVENT records the edge's terminal driver writes, central stores.

- `TerminalFaultEvent`, event `terminal_fault`, version 1: a fault of one terminal appeared
  (`state` "raised") or went (`state` "cleared"), from its heartbeats (mains lost, speaker,
  display, tamper, camera, battery low) or from the driver (`lost`: no frame for three
  heartbeat intervals, or the line is down)::

      {"event": "terminal_fault", "v": 1, "terminal": "t-101", "fault": "speaker_fault",
       "state": "raised", "at_ms": 1718000012345, "battery": 87}

- `LocalWarningEvent`, event `callresp_local`, version 1: the gateway played a warning by
  itself (its local rule, on a local level-2 alarm while cut off from central), with what
  each terminal answered (`sent` / `delivered` / `refused`)::

      {"event": "callresp_local", "v": 1, "warning_id": "local-1718000012345-3f2a9c1b",
       "level": "red", "text": "…", "alarm_id": "gas-1/gas_lel/high", "at_ms": 1718000012345,
       "played": {"t-101": "delivered", "t-102": "refused"}}

  Its receipts and acks then come as ordinary `callresp` events under the same warning_id.

Pure: frozen dataclasses, `to_attrs()`, `from_attrs()` raising only `AttrsError`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from protocols.callresp import Level
from protocols.record_attrs import FieldReader

VERSION: Final = 1
FAULT_EVENT: Final = "terminal_fault"
LOCAL_EVENT: Final = "callresp_local"
_MAX_MS: Final = 2**53 - 1


class TerminalFault(enum.StrEnum):
    MAINS_LOST = "mains_lost"
    SPEAKER_FAULT = "speaker_fault"
    DISPLAY_FAULT = "display_fault"
    TAMPER = "tamper"
    CAMERA_FAULT = "camera_fault"
    BATTERY_LOW = "battery_low"
    LOST = "lost"


class FaultState(enum.StrEnum):
    RAISED = "raised"
    CLEARED = "cleared"


class PlayResult(enum.StrEnum):
    """What playing a warning on one terminal came to (`LocalWarningEvent.played`, and the
    edge's answer to a `play_warning` command)."""

    DELIVERED = "delivered"
    SENT = "sent"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class TerminalFaultEvent:
    terminal: str
    fault: TerminalFault
    state: FaultState
    at_ms: int
    battery: int | None = None

    def to_attrs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": FAULT_EVENT, "v": VERSION, "terminal": self.terminal,
                               "fault": str(self.fault), "state": str(self.state),
                               "at_ms": self.at_ms}
        if self.battery is not None:
            out["battery"] = self.battery
        return out

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> TerminalFaultEvent:
        r = FieldReader(FAULT_EVENT, attrs, VERSION)
        if attrs.get("event") != FAULT_EVENT:
            raise r.error("event", f"expected {FAULT_EVENT!r}")
        fault, state = r.opt_choice("fault", TerminalFault), r.opt_choice("state", FaultState)
        if fault is None or state is None:
            raise r.error("fault" if fault is None else "state", "missing")
        return cls(terminal=r.req_str("terminal"), fault=fault, state=state,
                   at_ms=r.req_int("at_ms", 0, _MAX_MS), battery=r.opt_int("battery", 0, 100))


@dataclass(frozen=True, slots=True)
class LocalWarningEvent:
    warning_id: str
    level: Level
    text: str
    alarm_id: str
    at_ms: int
    played: Mapping[str, str] = field(default_factory=dict)  # terminal -> a PlayResult

    def to_attrs(self) -> dict[str, Any]:
        return {"event": LOCAL_EVENT, "v": VERSION, "warning_id": self.warning_id,
                "level": str(self.level), "text": self.text, "alarm_id": self.alarm_id,
                "at_ms": self.at_ms, "played": dict(self.played)}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> LocalWarningEvent:
        r = FieldReader(LOCAL_EVENT, attrs, VERSION)
        if attrs.get("event") != LOCAL_EVENT:
            raise r.error("event", f"expected {LOCAL_EVENT!r}")
        level = r.opt_choice("level", Level)
        if level is None:
            raise r.error("level", "missing")
        played = attrs.get("played", {})
        if not isinstance(played, Mapping) or not all(
                type(k) is str and type(v) is str for k, v in played.items()):
            raise r.error("played", "expected a map of terminal to result")
        return cls(warning_id=r.req_str("warning_id"), level=level, text=r.req_str("text"),
                   alarm_id=r.req_str("alarm_id"), at_ms=r.req_int("at_ms", 0, _MAX_MS),
                   played=dict(played))


__all__ = ["FAULT_EVENT", "LOCAL_EVENT", "FaultState", "LocalWarningEvent", "TerminalFault",
           "TerminalFaultEvent"]
