"""叫应 (call and respond) between central and a gateway (DESIGN.md §7, ../shared/DOMAIN.md).

Two things cross: the arguments of the signed `play_warning` command (central → gateway, inside
`protocols.commands`), and the event records the gateway sends up through its outbox for each
terminal (gateway → central): `delivered` (the terminal took the warning and played it) and
`ack` (a person pressed the terminal's acknowledge button).

`play_warning` args, version 1::

    {"warning_id": "w-5f0c1a", "level": "red", "text": "暴雨红色预警……", "repeat": 3,
     "terminals": ["t-101", "t-102"]}

An event is an outbox record of kind EVENT with no point and no value; its attrs::

    {"event": "callresp", "v": 1, "type": "ack", "warning_id": "w-5f0c1a",
     "terminal": "t-101", "at_ms": 1718000012345, "cmd_id": "9a1e…", "by": "button-1"}

`at_ms` is the terminal's (or gateway's) time of the step; `cmd_id` names the command that
carried the warning when the gateway knows it; `by` says who or which button answered (ack
only). The record's own `ts_ms` is the same time. Everything here is pure.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from protocols.errors import FieldError

VERSION = 1
EVENT_NAME = "callresp"
MAX_TEXT_CHARS = 500
MAX_REPEAT = 10
MAX_TERMINALS = 64  # per command: one command per gateway, within its body limit
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_BY_MAX = 64
_MAX_TIME_MS = 2**53
_ARG_KEYS = frozenset({"warning_id", "level", "text", "repeat", "terminals"})
_EVENT_REQUIRED = frozenset({"event", "v", "type", "warning_id", "terminal", "at_ms"})
_EVENT_OPTIONAL = frozenset({"cmd_id", "by"})


class CallRespError(FieldError):
    """Base of the 叫应 contract's errors: a field with the wrong shape or value."""


class UnsupportedCallRespVersionError(CallRespError):
    def __init__(self, version: object) -> None:
        super().__init__(
            "v", f"unsupported 叫应 event version {version!r} (this side speaks {VERSION})")
        self.version = version


class Level(enum.StrEnum):
    """Warning levels, highest first (GB/T 35965.1: red, orange, yellow, blue)."""

    RED = "red"
    ORANGE = "orange"
    YELLOW = "yellow"
    BLUE = "blue"


class EventType(enum.StrEnum):
    DELIVERED = "delivered"
    ACK = "ack"


def check_id(value: object, where: str) -> str:
    """An id of 1-64 [A-Za-z0-9_.-] starting alphanumeric (warning and terminal ids)."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise CallRespError(where, "expected 1-64 of [A-Za-z0-9_.-], starting alphanumeric")
    return value


def _text(value: object, where: str, limit: int, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise CallRespError(where, "expected a string")
    if not empty and not value.strip():
        raise CallRespError(where, "must not be empty")
    if len(value) > limit:
        raise CallRespError(where, f"longer than {limit} characters")
    return value


def _time(value: object, where: str) -> int:
    if type(value) is not int or not 0 <= value < _MAX_TIME_MS:
        raise CallRespError(where, f"expected epoch ms in 0..{_MAX_TIME_MS - 1}")
    return value


def _level(value: object, where: str) -> Level:
    try:
        return Level(value)  # type: ignore[arg-type]  # untrusted input: Level() is the check
    except ValueError:
        raise CallRespError(where, f"expected one of {[str(x) for x in Level]}") from None


def _exact(obj: Mapping[str, Any], required: frozenset[str], optional: frozenset[str],
           where: str) -> None:
    missing = required - set(obj)
    if missing:
        raise CallRespError(f"{where}.{min(missing)}", "missing")
    extra = set(obj) - required - optional
    if extra:
        raise CallRespError(f"{where}.{min(map(str, extra))}", "unknown field")


# --- the command's arguments -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlayWarning:
    """Play warning `warning_id` on these terminals of the gateway, `repeat` times each.

    `protocols.commands` carries it as the args of kind `play_warning`; its target is
    `warning/{warning_id}`.
    """

    warning_id: str
    level: Level
    text: str
    repeat: int
    terminals: tuple[str, ...]

    kind = "play_warning"  # protocols.commands.CommandKind.PLAY_WARNING

    @property
    def target(self) -> str:
        return f"warning/{self.warning_id}"

    def to_wire(self) -> dict[str, Any]:
        return {"warning_id": self.warning_id, "level": str(self.level), "text": self.text,
                "repeat": self.repeat, "terminals": list(self.terminals)}


def play_warning(warning_id: str, level: Level | str, text: str, repeat: int,
                 terminals: Sequence[str]) -> PlayWarning:
    """Checked arguments; raises `CallRespError`."""
    return play_warning_from_mapping({"warning_id": warning_id, "level": str(level),
                                      "text": text, "repeat": repeat,
                                      "terminals": list(terminals)})


def play_warning_from_mapping(args: Mapping[str, Any], where: str = "args") -> PlayWarning:
    """The typed arguments from their wire (or API) form; raises `CallRespError`."""
    if not isinstance(args, Mapping) or not all(isinstance(k, str) for k in args):
        raise CallRespError(where, "expected a map with string keys")
    _exact(args, _ARG_KEYS, frozenset(), where)
    repeat = args["repeat"]
    if type(repeat) is not int or not 1 <= repeat <= MAX_REPEAT:
        raise CallRespError(f"{where}.repeat", f"expected an integer 1..{MAX_REPEAT}")
    terminals = args["terminals"]
    if not isinstance(terminals, list | tuple) or not 1 <= len(terminals) <= MAX_TERMINALS:
        raise CallRespError(f"{where}.terminals", f"expected a list of 1..{MAX_TERMINALS} ids")
    ids = tuple(check_id(t, f"{where}.terminals[{i}]") for i, t in enumerate(terminals))
    if len(set(ids)) != len(ids):
        raise CallRespError(f"{where}.terminals", "a terminal is listed twice")
    return PlayWarning(warning_id=check_id(args["warning_id"], f"{where}.warning_id"),
                       level=_level(args["level"], f"{where}.level"),
                       text=_text(args["text"], f"{where}.text", MAX_TEXT_CHARS),
                       repeat=repeat, terminals=ids)


# --- the events the gateway reports ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallRespEvent:
    """A terminal's `delivered` receipt or `ack` (button press) for one warning."""

    type: EventType
    warning_id: str
    terminal: str
    at_ms: int
    cmd_id: str | None = None
    by: str | None = None  # ack: the person or button that answered


def event_attrs(ev: CallRespEvent) -> dict[str, Any]:
    """The attrs of the EVENT record that carries `ev`; raises `CallRespError`."""
    check = parse_event_attrs(_attrs(ev))  # the same rules both ways
    return _attrs(check)


def _attrs(ev: CallRespEvent) -> dict[str, Any]:
    out: dict[str, Any] = {"event": EVENT_NAME, "v": VERSION, "type": str(ev.type),
                           "warning_id": ev.warning_id, "terminal": ev.terminal,
                           "at_ms": ev.at_ms}
    if ev.cmd_id is not None:
        out["cmd_id"] = ev.cmd_id
    if ev.by is not None:
        out["by"] = ev.by
    return out


def is_callresp(attrs: Mapping[str, Any] | None) -> bool:
    """Whether an EVENT record's attrs claim to be a 叫应 event (then parse them)."""
    return isinstance(attrs, Mapping) and attrs.get("event") == EVENT_NAME


def parse_event_attrs(attrs: Mapping[str, Any]) -> CallRespEvent:
    """The event in a 叫应 EVENT record's attrs; raises only `CallRespError`."""
    if not isinstance(attrs, Mapping) or not all(isinstance(k, str) for k in attrs):
        raise CallRespError("attrs", "expected a map with string keys")
    if attrs.get("event") != EVENT_NAME:
        raise CallRespError("attrs.event", f"expected {EVENT_NAME!r}")
    v = attrs.get("v")
    if type(v) is not int or v != VERSION:
        raise UnsupportedCallRespVersionError(v)
    _exact(attrs, _EVENT_REQUIRED, _EVENT_OPTIONAL, "attrs")
    try:
        kind = EventType(attrs["type"])
    except (ValueError, TypeError):
        raise CallRespError(
            "attrs.type", f"expected one of {[str(x) for x in EventType]}") from None
    cmd_id = attrs.get("cmd_id")
    by = attrs.get("by")
    if by is not None and kind is not EventType.ACK:
        raise CallRespError("attrs.by", "only an ack says who answered")
    return CallRespEvent(type=kind, warning_id=check_id(attrs["warning_id"], "attrs.warning_id"),
                         terminal=check_id(attrs["terminal"], "attrs.terminal"),
                         at_ms=_time(attrs["at_ms"], "attrs.at_ms"),
                         cmd_id=None if cmd_id is None else check_id(cmd_id, "attrs.cmd_id"),
                         by=None if by is None else _text(by, "attrs.by", _BY_MAX))
