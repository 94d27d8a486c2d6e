"""What a gateway reports about a command, and the states a command goes through (DESIGN.md §6).

The gateway reports each step as a `CMD_RESULT` outbox record whose attrs are
`{"cmd_id", "state", "reason"?, "detail"?, "kind"?, "verified"?, ...data}` with state
`received → executing → succeeded | failed | rejected | expired` (`result_attrs`,
`parse_result_attrs`); kind-specific results (`readback`, `offset_ms`, `diagnostics`) are
further flat keys. Central adds `pending` and `sent` for the commands it holds. States only
move to a higher `rank`; every terminal state has the same, highest rank.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from protocols.commands import MalformedCommandError, check_cmd_id

_MAX_STR = 256


class CommandState(enum.StrEnum):
    PENDING = "pending"  # central holds it, not yet published (central only)
    SENT = "sent"  # central published it, the gateway has not said `received` (central only)
    RECEIVED = "received"
    EXECUTING = "executing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"

    @property
    def rank(self) -> int:
        """States only move to a higher rank; every terminal state has the same, highest."""
        return _RANK[self]

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({CommandState.SUCCEEDED, CommandState.FAILED, CommandState.REJECTED,
                      CommandState.EXPIRED})
_RANK = {CommandState.PENDING: 0, CommandState.SENT: 1, CommandState.RECEIVED: 2,
         CommandState.EXECUTING: 3, **{s: 4 for s in TERMINAL}}
# States a gateway may report (the first two are central's own).
REPORTED_STATES = frozenset(CommandState) - {CommandState.PENDING, CommandState.SENT}


class Reason(enum.StrEnum):
    """Why a command was rejected, expired or failed."""

    BAD_SIGNATURE = "bad_signature"
    NO_PUBLIC_KEY = "no_public_key"  # the gateway has no pinned key: it verifies nothing
    MALFORMED = "malformed"
    UNSUPPORTED_KIND = "unsupported_kind"
    WRONG_GATEWAY = "wrong_gateway"
    EXPIRED = "expired"
    # issued_at lies ahead of the gateway's trusted clock by more than the allowed skew (§8)
    ISSUED_IN_FUTURE = "issued_in_future"
    REPLAY = "replay"  # cmd_id already seen: never executed twice (history only at central)
    UNKNOWN_DEVICE = "unknown_device"
    UNKNOWN_POINT = "unknown_point"
    NOT_WRITABLE = "not_writable"
    BAD_VALUE = "bad_value"
    TRANSPORT_ERROR = "transport_error"
    READBACK_MISMATCH = "readback_mismatch"
    INTERRUPTED = "interrupted"  # the agent stopped mid-execution; not re-run
    INTERNAL_ERROR = "internal_error"
    # apply_config (protocols.remote_config): the new config failed the start-up checks, or
    # another config trial is in progress; or it did not come back healthy and was undone
    CONFIG_INVALID = "config_invalid"
    ROLLED_BACK = "rolled_back"
    NOT_DELIVERED = "not_delivered"  # central: the gateway did not take it before expiry


@dataclass(frozen=True, slots=True)
class CommandResult:
    """One state a gateway reports for a command, carried in a CMD_RESULT record's attrs.

    `verified` is False when the gateway could not authenticate the command (bad signature,
    no key): its `cmd_id` is only what the bytes claimed. `data` holds kind-specific results
    (`readback`, `offset_ms`, `diagnostics`, ...) as flat attrs.
    """

    cmd_id: str
    state: CommandState
    reason: Reason | None = None
    detail: str | None = None
    kind: str | None = None
    verified: bool = True
    data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def affects_state(self) -> bool:
        """Whether central may move the command's state on this report (vs history only)."""
        return self.verified and self.reason is not Reason.REPLAY


_RESULT_FIXED = frozenset({"cmd_id", "state", "reason", "detail", "kind", "verified"})


def result_attrs(result: CommandResult) -> dict[str, Any]:
    """The attrs of the CMD_RESULT record for `result`."""
    if result.state not in REPORTED_STATES:
        raise MalformedCommandError("state", f"a gateway does not report {result.state!r}")
    clash = _RESULT_FIXED.intersection(result.data)
    if clash:
        raise MalformedCommandError("data", f"reserved keys {sorted(clash)}")
    out: dict[str, Any] = {"cmd_id": result.cmd_id, "state": str(result.state)}
    if result.reason is not None:
        out["reason"] = str(result.reason)
    if result.detail:
        out["detail"] = result.detail[:_MAX_STR]
    if result.kind:
        out["kind"] = result.kind
    if not result.verified:
        out["verified"] = False
    out.update(result.data)
    return out


def parse_result_attrs(attrs: Mapping[str, Any]) -> CommandResult:
    """The `CommandResult` in a CMD_RESULT record's attrs; raises `MalformedCommandError`."""
    if not isinstance(attrs, Mapping):
        raise MalformedCommandError("attrs", "expected a map")
    cmd_id = check_cmd_id(attrs.get("cmd_id"), "attrs.cmd_id")
    raw_state = attrs.get("state")
    unknown = MalformedCommandError("attrs.state", f"unknown state {raw_state!r}")
    if not isinstance(raw_state, str):
        raise unknown
    try:
        state = CommandState(raw_state)
    except ValueError:
        raise unknown from None
    if state not in REPORTED_STATES:
        raise MalformedCommandError("attrs.state", f"a gateway does not report {state!r}")
    reason: Reason | None = None
    if attrs.get("reason") is not None:
        try:
            reason = Reason(attrs["reason"])
        except ValueError:
            raise MalformedCommandError(
                "attrs.reason", f"unknown reason {attrs['reason']!r}") from None
    detail = attrs.get("detail")
    kind = attrs.get("kind")
    verified = attrs.get("verified", True)
    if detail is not None and not isinstance(detail, str):
        raise MalformedCommandError("attrs.detail", "expected a string")
    if kind is not None and not isinstance(kind, str):
        raise MalformedCommandError("attrs.kind", "expected a string")
    if not isinstance(verified, bool):
        raise MalformedCommandError("attrs.verified", "expected a bool")
    data = {k: v for k, v in attrs.items() if k not in _RESULT_FIXED}
    # An empty detail or kind says nothing: None, as `result_attrs` leaves it out.
    return CommandResult(cmd_id=cmd_id, state=state, reason=reason, detail=detail or None,
                         kind=kind or None, verified=verified, data=data)
