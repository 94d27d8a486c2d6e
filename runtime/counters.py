"""Counters: what a driver, link or service has seen, kept as plain dataclass fields.

Every component of both programs counts its events in a slotted dataclass of integers (and,
where a count is broken down by reason, a dict of them), bumped in place on the event loop and
read by status and metrics. `Counters` is their base: it gives them one `to_dict()`, a copy,
so a status reply or a scrape never shares a live dict with the component still counting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Counters:
    """Base of a component's counters; subclasses are `@dataclass(slots=True)` with fields."""

    def to_dict(self) -> dict[str, Any]:
        """Field name → value, dict values copied."""
        return {f.name: (dict(v) if isinstance(v := getattr(self, f.name), dict) else v)
                for f in dataclasses.fields(self)}


__all__ = ["Counters"]
