"""The command executor's counters (`edge_agent.commands.executor`), for status and metrics."""

from __future__ import annotations

from dataclasses import dataclass

from runtime.counters import Counters


@dataclass(slots=True)
class CommandCounters(Counters):
    received: int = 0  # payloads handed in by the uplink
    dropped: int = 0  # queue full
    malformed: int = 0  # not an envelope at all (not reportable)
    bad_signature: int = 0
    rejected: int = 0
    expired: int = 0
    replays: int = 0
    executed: int = 0
    succeeded: int = 0
    failed: int = 0
    reports_suppressed: int = 0  # unverified rejections not reported (rate limit)
    future_refused: int = 0  # issued_at ahead of a trusted clock: refused
    future_flagged: int = 0  # issued_at ahead of a suspect clock: run, flagged


__all__ = ["CommandCounters"]
