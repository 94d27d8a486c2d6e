"""The declarative form of a component's event counters (`service.counters.issued += 1`).

A subclass names its counters as annotated fields with their starting values; the base makes
it a dataclass (its constructor, `==` and `repr`) and gives it `as_dict()` for status JSON,
instead of each component writing the decorator and the listing by hand. Counters are plain
ints touched only on the event loop thread, so no lock is needed."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any


@typing.dataclass_transform()
class Counters:
    """Base of the counters classes: annotated fields become a dataclass's fields."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclasses.dataclass(cls)

    def as_dict(self) -> dict[str, Any]:
        """Every counter by its field name (a copy)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]


__all__ = ["Counters"]
