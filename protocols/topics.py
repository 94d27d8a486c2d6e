"""The MQTT topic contract (DESIGN.md §4).

`{gw}` is the gateway id, equal to its certificate CN. Gateways write only under their own
`up/` and read only their own `down/`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from protocols.errors import DetailedError, ProtocolError

PREFIX = "fieldlink/v1"
CENTRAL_STATE = f"{PREFIX}/_central/state"
UP_WILDCARD = f"{PREFIX}/+/up/#"
SHARED_UP = f"$share/central/{PREFIX}/+/up/#"

_GW_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
UP_NAMES = frozenset({"state", "birth", "data"})
DOWN_NAMES = frozenset({"ack", "cmd"})


class TopicError(ProtocolError, DetailedError):
    """A topic outside the contract."""

    template = "{topic!r}: {reason}"
    topic: str
    reason: str


def check_gateway_id(gw: str) -> str:
    """Return `gw` when it is a valid gateway id (also a valid topic level and CN)."""
    if not _GW_RE.match(gw) or gw.startswith("_"):
        raise TopicError(gw, "gateway id must be 1-64 of [A-Za-z0-9_.-], not starting with _")
    return gw


def up(gw: str, name: str) -> str:
    return f"{PREFIX}/{gw}/up/{name}"


def down(gw: str, name: str) -> str:
    return f"{PREFIX}/{gw}/down/{name}"


@dataclass(frozen=True, slots=True)
class Topic:
    gw: str
    direction: str  # "up" | "down"
    name: str


def parse(topic: str) -> Topic:
    """Split a contract topic into gateway, direction and name, or raise `TopicError`."""
    parts = topic.split("/")
    if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != PREFIX:
        raise TopicError(topic, f"expected {PREFIX}/{{gw}}/up|down/{{name}}")
    gw, direction, name = parts[2], parts[3], parts[4]
    check_gateway_id(gw)
    allowed = UP_NAMES if direction == "up" else DOWN_NAMES if direction == "down" else None
    if allowed is None or name not in allowed:
        raise TopicError(topic, f"unknown {direction}/{name}")
    return Topic(gw, direction, name)
