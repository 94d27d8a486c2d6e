"""Values of central's alarm lifecycle (DESIGN.md §7), free of any storage import so that the
storage backends can name the policy they apply during ingest."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from protocols.alarm_attrs import AlarmState


class AlarmStatus(enum.StrEnum):
    ACTIVE = "active"
    CLEARED = "cleared"


class AckState(enum.StrEnum):
    UNACKNOWLEDGED = "unacknowledged"
    ACKNOWLEDGED = "acknowledged"


# What the edge's alarm records say (`attrs.state`): the contract's own enum.
EdgeState = AlarmState


class Action(enum.StrEnum):
    """One line of an alarm's history (`alarm_events.action`)."""

    RAISED = "raised"
    CHANGED = "changed"
    CLEARED = "cleared"
    ACK = "ack"
    MANUAL_CLEAR = "manual_clear"
    FLAP_SETTLED = "flap_settled"
    COMMENT = "comment"  # a user's note; changes nothing


class Outcome(enum.StrEnum):
    """What an incoming event did (`alarm_events.note`)."""

    OPENED = "opened"
    UPDATED = "updated"
    SEVERITY_ROSE = "severity_rose"
    CLOSED = "closed"
    FLAPPING = "flapping"  # became flapping: stays active, transitions only counted
    FLAP_COUNTED = "flap_counted"
    FLAP_ENDED = "flap_ended"
    STALE = "stale"  # older than the newest event known for the key: history only
    NO_ALARM = "no_alarm"  # a clear for an alarm already cleared (by hand)


CENTRAL_SOURCE = "central"
EDGE_SOURCE = "edge"
GATEWAY_OFFLINE = "gateway_offline"  # central's rule: alarm_key and type


@dataclass(frozen=True, slots=True)
class AlarmPolicy:
    """How central treats alarm transitions; from `Settings` (see `policy_from`)."""

    flap_max: int = 6  # more raise/clear transitions than this within the window: flapping
    flap_window_ms: int = 600_000
    incident_window_ms: int = 900_000  # an incident closes this long after its last alarm


@dataclass(frozen=True, slots=True)
class AlarmEvent:
    """One transition to apply: from an edge ALARM record, or from a central rule (stream and
    seq None, ts central's clock)."""

    gw: str
    alarm_key: str
    rule: str
    state: EdgeState
    level: int
    ts_ms: int
    stream: str | None = None
    seq: int | None = None
    point: str | None = None  # "device/point"
    value: float | None = None
    text: str | None = None
    threshold: float | None = None
    attrs_json: str | None = None

    bearer: str | None = None  # "beidou" / "pdt": the record came by narrowband (§5)

    @property
    def source(self) -> str:
        """Who said it, and for the edge how it came: over IP ("edge") or by radio."""
        if self.seq is None:
            return CENTRAL_SOURCE
        return self.bearer or EDGE_SOURCE


@dataclass(frozen=True, slots=True)
class KeyState:
    """The newest event seen for a (gw, alarm_key) and the condition it reported."""

    last_ts_ms: int | None = None
    last_stream: str | None = None
    last_seq: int | None = None
    edge_state: str | None = None
    edge_level: int | None = None


@dataclass(frozen=True, slots=True)
class AlarmChange:
    """What applying one event did, for logs and tests."""

    alarm_id: int | None
    gw: str
    alarm_key: str
    outcome: Outcome
    notify: bool
    severity: int | None = None


def is_newer(ev: AlarmEvent, key: KeyState) -> bool:
    """The ordering rule for replays and backlog.

    Within one outbox stream the edge's seq is authoritative: records get seqs in commit
    order, and unlike timestamps seqs do not go back when the wall clock is stepped (§4.7).
    Across streams (a replaced outbox) and for central's own events the timestamp decides.
    Equal is not newer, so a replay never applies twice.
    """
    if key.last_ts_ms is None:
        return True
    if (ev.stream is not None and ev.stream == key.last_stream and ev.seq is not None
            and key.last_seq is not None):
        return ev.seq > key.last_seq
    return ev.ts_ms > key.last_ts_ms
