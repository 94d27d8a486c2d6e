"""What a message on a `fieldlink/v1/...` topic may hold: the one validation layer of the
uplink envelope (DESIGN.md §4, §8 "bad input gets a typed error and a count").

`protocols.envelope.decode` checks every field against the limits here before anything else
sees it, so storage, the alarm engine and the console only ever meet values they can hold:

- integers: `seq` in 1..`SEQ_MAX` (2**63-2: both databases keep BIGINT, and delivery
  arithmetic looks at `seq + 1`), times in 0..`TS_MAX_MS` (the end of year 9999, what a
  datetime and a JavaScript number can show), other counters in 0..2**63-1, point ordinals
  in 0..2**31-1 (PostgreSQL keeps them as `int4`), every integer in attrs and values within
  64 bits;
- strings: no NUL (PostgreSQL `text` and `jsonb` refuse U+0000) and at most so many
  characters per kind (`MAX_ID_CHARS`, `MAX_POINT_KEY_CHARS`, ...);
- sizes: the payload (`MAX_PAYLOAD_BYTES`), records and point keys per batch, devices and
  points per birth;
- attrs: a tree of maps with string keys, lists, strings, finite floats, 64-bit integers,
  booleans and null, at most `MAX_ATTRS_DEPTH` deep with at most `MAX_ATTRS_NODES` values.
  A value reached twice is refused (`SharedReferenceError`): CBOR tags 28/29 (shareable,
  sharedref) can make attrs cyclic, or a DAG that a few bytes expand into 2**64 values.
  Anything else a CBOR tag can make (datetimes, decimals, sets, regexes, byte strings,
  undefined) is refused too (`UnsupportedValueError`).

Each refusal is an `EnvelopeError` subclass with a `reason` (a `Reason`, the metrics label)
and the `field` it is about; messages never quote a large value.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Final

from protocols.errors import DetailedError, ProtocolError

INT64_MAX: Final = 2**63 - 1
INT64_MIN: Final = -(2**63)
SEQ_MAX: Final = 2**63 - 2  # room for `seq + 1` in BIGINT arithmetic (gaps, ranges)
TS_MAX_MS: Final = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
ORDINAL_MAX: Final = 2**31 - 1

MAX_PAYLOAD_BYTES: Final = 16 * 1024 * 1024
# The edge's `[mqtt] backlog_batch_size` is at most 50,000 (edge_agent.config.site).
MAX_RECORDS_PER_BATCH: Final = 50_000
MAX_POINTS_PER_BATCH: Final = MAX_RECORDS_PER_BATCH
MAX_DEVICES_PER_BIRTH: Final = 4_096
MAX_POINTS_PER_BIRTH: Final = 50_000

MAX_ID_CHARS: Final = 64  # gateway, stream, boot id, version, bearer, device id
MAX_POINT_KEY_CHARS: Final = 256  # "device/point"
MAX_NAME_CHARS: Final = 256  # name_zh, unit, profile id, profile hash
MAX_TEXT_CHARS: Final = 4_096  # a text value

MAX_ATTRS_DEPTH: Final = 12  # the attrs map itself is depth 1
MAX_ATTRS_NODES: Final = 10_000  # every key and value counts
MAX_ATTRS_KEY_CHARS: Final = 128
MAX_ATTRS_STR_CHARS: Final = 16_384
MAX_ATTRS_TOTAL_CHARS: Final = 262_144  # keys and strings together


class Reason(enum.StrEnum):
    """Why a message or a record was refused; the `reason` label of central's counters."""

    PAYLOAD_TOO_LARGE = "payload_too_large"
    NOT_CBOR = "not_cbor"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_TYPE = "unknown_type"
    MALFORMED = "malformed"  # a field is missing or has the wrong type or shape
    INT_RANGE = "int_range"
    STRING_TOO_LONG = "string_too_long"
    BAD_STRING = "bad_string"  # NUL inside
    NOT_FINITE = "not_finite"
    # records or point keys per batch, devices or points per birth
    TOO_MANY_ITEMS = "too_many_items"
    ATTRS_TOO_DEEP = "attrs_too_deep"
    ATTRS_TOO_LARGE = "attrs_too_large"
    SHARED_REFERENCE = "shared_reference"  # CBOR tags 28/29: a cycle or a shared value
    UNSUPPORTED_VALUE = "unsupported_value"  # a type JSON cannot hold (what other tags make)
    BAD_POINT_KEY = "bad_point_key"  # not `device/point`
    UNSTORABLE = "unstorable"  # passed every rule here, yet the database refused it


class EnvelopeError(ProtocolError):
    """Base of every envelope decode or encode error; `reason` is its counter label."""

    reason: ClassVar[Reason] = Reason.MALFORMED


class InvalidFieldError(EnvelopeError, DetailedError):
    """A field breaks a rule of this module; `detail` says which, in a few words."""

    template = "{field}: {detail}"
    field: str
    detail: str


class MalformedEnvelopeError(InvalidFieldError):
    """The bytes are not CBOR, or a field is missing or has the wrong shape."""


class NotCborError(MalformedEnvelopeError):
    reason = Reason.NOT_CBOR


class PayloadTooLargeError(EnvelopeError):
    reason = Reason.PAYLOAD_TOO_LARGE

    def __init__(self, size: int, limit: int = MAX_PAYLOAD_BYTES) -> None:
        super().__init__(f"payload of {size} bytes, more than {limit}")
        self.field = "payload"
        self.size = size
        self.limit = limit


class IntRangeError(InvalidFieldError):
    reason = Reason.INT_RANGE


class StringTooLongError(InvalidFieldError):
    reason = Reason.STRING_TOO_LONG

    def __init__(self, field: str, length: int, limit: int) -> None:
        super().__init__(field, f"{length} characters, more than {limit}")
        self.length = length
        self.limit = limit


class BadStringError(InvalidFieldError):
    reason = Reason.BAD_STRING


class NotFiniteError(InvalidFieldError):
    reason = Reason.NOT_FINITE


class TooManyItemsError(InvalidFieldError):
    reason = Reason.TOO_MANY_ITEMS

    def __init__(self, field: str, count: int, limit: int) -> None:
        super().__init__(field, f"{count} items, more than {limit}")
        self.count = count
        self.limit = limit


class AttrsTooDeepError(InvalidFieldError):
    reason = Reason.ATTRS_TOO_DEEP


class AttrsTooLargeError(InvalidFieldError):
    reason = Reason.ATTRS_TOO_LARGE


class SharedReferenceError(InvalidFieldError):
    reason = Reason.SHARED_REFERENCE


class UnsupportedValueError(InvalidFieldError):
    reason = Reason.UNSUPPORTED_VALUE


class BadPointKeyError(InvalidFieldError):
    reason = Reason.BAD_POINT_KEY


class UnstorableRecordError(InvalidFieldError):
    """Central's verdict, not the decoder's: the database refused this record alone (a rule
    missing here); it is refused like any other bad record."""

    reason = Reason.UNSTORABLE


# --- checks ---------------------------------------------------------------------------------


def check_int(field: str, value: object, lo: int, hi: int) -> int:
    """`value` when it is an int (not a bool) in lo..hi; the error never prints a huge one."""
    if type(value) is not int:
        raise MalformedEnvelopeError(field, f"expected int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise IntRangeError(field, f"outside {lo}..{hi}" + _magnitude(value))
    return value


def _magnitude(value: int) -> str:
    # str() of an int past 4,300 digits raises ValueError; the bit length says enough.
    return f" (a {value.bit_length()}-bit {'negative ' if value < 0 else ''}integer)"


def check_str(field: str, value: object, limit: int) -> str:
    """`value` when it is a str of at most `limit` characters without NUL."""
    if type(value) is not str:
        raise MalformedEnvelopeError(field, f"expected str, got {type(value).__name__}")
    if len(value) > limit:
        raise StringTooLongError(field, len(value), limit)
    if "\x00" in value:
        raise BadStringError(field, "contains NUL")
    return value


def check_point_key(field: str, value: object) -> str:
    """`value` when it is a `device/point` key within the string rules."""
    key = check_str(field, value, MAX_POINT_KEY_CHARS)
    if "/" not in key:
        raise BadPointKeyError(field, "expected device/point")
    return key


def check_count(field: str, items: object, limit: int) -> list[Any]:
    """`items` when it is a list of at most `limit` items."""
    if type(items) is not list:
        raise MalformedEnvelopeError(field, f"expected list, got {type(items).__name__}")
    if len(items) > limit:
        raise TooManyItemsError(field, len(items), limit)
    return items


class Budget:
    """What one message may expand to: CBOR shared references (tags 28/29) and string
    references let a few bytes name the same map, list or string many times. Each text
    character takes at least one payload byte and each map or list is met once, unless
    shared; so decoded text beyond the payload's size, or a container met twice anywhere in
    the message, is refused (`SharedReferenceError`)."""

    __slots__ = ("chars", "limit", "seen")

    def __init__(self, payload_bytes: int) -> None:
        self.chars = 0
        self.limit = payload_bytes
        self.seen: set[int] = set()

    def spend(self, field: str, chars: int) -> None:
        self.chars += chars
        if self.chars > self.limit:
            raise SharedReferenceError(field, "decoded text larger than the payload"
                                       " (CBOR shared or string references)")

    def visit(self, field: str, container: object) -> None:
        if id(container) in self.seen:
            raise SharedReferenceError(field, "a map or list is reached twice"
                                       " (CBOR shared reference)")
        self.seen.add(id(container))


def check_attrs(field: str, attrs: object, budget: Budget) -> dict[str, Any]:
    """`attrs` when it is a map within the attrs rules (module docstring)."""
    if type(attrs) is not dict:
        raise MalformedEnvelopeError(field, "expected a map with string keys")
    _AttrsWalk(field, budget).walk(attrs)
    return attrs


class _AttrsWalk:
    """One pass over an attrs tree, iterative (no recursion for a hostile depth), stopping
    at the first broken rule; every container is visited once, so a shared one is seen."""

    __slots__ = ("field", "nodes", "chars", "budget")

    def __init__(self, field: str, budget: Budget) -> None:
        self.field = field
        self.nodes = 0
        self.chars = 0
        self.budget = budget

    def walk(self, root: dict[str, Any]) -> None:
        stack: list[tuple[object, int]] = [(root, 1)]
        while stack:
            value, depth = stack.pop()
            if type(value) is dict:
                self._enter(value, depth)
                for key, item in value.items():
                    self._key(key)
                    stack.append((item, depth + 1))
                self._count(len(value))
            elif type(value) is list:
                self._enter(value, depth)
                stack.extend((item, depth + 1) for item in value)
                self._count(len(value))
            else:
                self._scalar(value)

    def _enter(self, container: dict[Any, Any] | list[Any], depth: int) -> None:
        if depth > MAX_ATTRS_DEPTH:
            raise AttrsTooDeepError(self.field, f"nested deeper than {MAX_ATTRS_DEPTH}")
        self.budget.visit(self.field, container)

    def _count(self, n: int) -> None:
        self.nodes += n
        if self.nodes > MAX_ATTRS_NODES:
            raise AttrsTooLargeError(self.field, f"more than {MAX_ATTRS_NODES} values")

    def _chars(self, n: int) -> None:
        self.chars += n
        if self.chars > MAX_ATTRS_TOTAL_CHARS:
            raise AttrsTooLargeError(self.field, f"more than {MAX_ATTRS_TOTAL_CHARS} characters")
        self.budget.spend(self.field, n)

    def _key(self, key: object) -> None:
        if type(key) is not str:
            raise UnsupportedValueError(self.field, f"a {type(key).__name__} map key")
        check_str(f"{self.field} key", key, MAX_ATTRS_KEY_CHARS)
        self._chars(len(key))

    def _scalar(self, value: object) -> None:
        if type(value) is str:
            check_str(self.field, value, MAX_ATTRS_STR_CHARS)
            self._chars(len(value))
        elif type(value) is int:
            if not INT64_MIN <= value <= INT64_MAX:
                raise IntRangeError(self.field, "an integer outside 64 bits")
        elif type(value) is float:
            if not math.isfinite(value):
                raise NotFiniteError(self.field, "a NaN or infinite number")
        elif value is not None and type(value) is not bool:
            raise UnsupportedValueError(self.field, f"a {type(value).__name__} value")


def error_fields(exc: EnvelopeError) -> Mapping[str, object]:
    """Log fields of a refusal: reason, field and message, never the value itself."""
    return {"reason": str(exc.reason), "field": getattr(exc, "field", None), "error": str(exc)}
