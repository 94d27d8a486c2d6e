"""What every record-attrs contract shares: its error and the checks of single fields.

A record's `attrs` (the optional map of an outbox record, `protocols.envelope.Record.attrs`)
carry structures that cross from the edge to central: alarm transitions
(`protocols.alarm_attrs`), the outbox's loss and full-disk reports (`protocols.outbox_events`),
command results (`protocols.command_results`), 叫应 events (`protocols.callresp`). Each
contract is a frozen dataclass with `to_attrs()` and a `from_attrs()` that checks every field
and raises an `AttrsError` subclass, never anything else; the envelope has already bounded the
attrs' size and depth (`protocols.limits.check_attrs`).

Versions: an attrs map may carry `v`, the version of its contract. Version 1 is the format
every agent so far writes, without `v`; so `v` absent means 1, and a version a contract does
not know is an `UnsupportedAttrsVersionError`. A contract that changes its format writes `v`
from then on and keeps reading the versions before it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Final, TypeVar

from protocols.errors import DetailedError, ProtocolError

VERSION_KEY: Final = "v"
E = TypeVar("E", bound=enum.StrEnum)


class AttrsError(ProtocolError, DetailedError):
    """A record's attrs do not fit their contract; `reason` is central's counter label."""

    reason: ClassVar[str] = "bad_attrs"

    template = "{contract} attrs, {field}: {detail}"
    contract: str
    field: str
    detail: str


class UnsupportedAttrsVersionError(AttrsError):
    reason = "attrs_version"

    def __init__(self, contract: str, version: object, known: int) -> None:
        super().__init__(contract, VERSION_KEY,
                         f"version {version!r}, this side reads up to {known}")
        self.version = version
        self.known = known


class FieldReader:
    """Reads the fields of one attrs map for one contract; every failure is an `AttrsError`
    naming the contract and the field."""

    __slots__ = ("attrs", "contract")

    def __init__(self, contract: str, attrs: object, version: int) -> None:
        if not isinstance(attrs, Mapping):
            raise AttrsError(contract, "attrs", "expected a map")
        self.contract = contract
        self.attrs: Mapping[str, Any] = attrs
        v = attrs.get(VERSION_KEY, 1)
        if type(v) is not int or not 1 <= v <= version:
            raise UnsupportedAttrsVersionError(contract, v, version)

    def error(self, field: str, detail: str) -> AttrsError:
        return AttrsError(self.contract, field, detail)

    def req_str(self, key: str) -> str:
        value = self.opt_str(key)
        if not value:
            raise self.error(key, "missing or empty")
        return value

    def opt_str(self, key: str) -> str | None:
        value = self.attrs.get(key)
        if value is not None and type(value) is not str:
            raise self.error(key, f"expected a string, got {type(value).__name__}")
        return value

    def req_int(self, key: str, lo: int, hi: int) -> int:
        value = self.opt_int(key, lo, hi)
        if value is None:
            raise self.error(key, "missing")
        return value

    def opt_int(self, key: str, lo: int, hi: int) -> int | None:
        value = self.attrs.get(key)
        if value is None:
            return None
        if type(value) is not int:
            raise self.error(key, f"expected an integer, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise self.error(key, f"{value} outside {lo}..{hi}")
        return value

    def opt_number(self, key: str) -> float | None:
        """An int or a finite float (never a bool), as a float."""
        value = self.attrs.get(key)
        if value is None:
            return None
        if type(value) not in (int, float) or not math.isfinite(value):
            raise self.error(key, f"expected a finite number, got {value!r}"[:120])
        return float(value)

    def opt_choice(self, key: str, kind: type[E]) -> E | None:
        """One of the string enum `kind`'s values, as its member."""
        raw = self.attrs.get(key)
        if raw is None:
            return None
        if type(raw) is str and raw in kind.__members__.values():
            return kind(raw)
        raise self.error(key, f"unknown {key} {raw!r}"[:120])

    def str_list(self, key: str) -> tuple[str, ...]:
        value = self.attrs.get(key, ())
        if not isinstance(value, (list, tuple)) or not all(type(x) is str for x in value):
            raise self.error(key, "expected a list of strings")
        return tuple(value)

    def rest(self, known: frozenset[str]) -> dict[str, Any]:
        """The keys the contract does not name (kept: a newer agent may add some)."""
        return {k: v for k, v in self.attrs.items() if k not in known and k != VERSION_KEY}


__all__ = ["VERSION_KEY", "AttrsError", "FieldReader", "UnsupportedAttrsVersionError"]
