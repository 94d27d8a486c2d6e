"""`protocols.errors.DetailedError`: the declarative base every package's errors use."""

from __future__ import annotations

import pytest

from protocols.errors import DetailedError


class _BaseError(Exception):
    status = 409


class _StateError(_BaseError, DetailedError):
    template = "alarm {alarm_id}: {reason!r}"
    alarm_id: int
    reason: str = "twice"


class _FixedReasonError(_StateError):
    def __init__(self, alarm_id: int) -> None:
        super().__init__(alarm_id, "fixed")


class _KindError(DetailedError):
    kind = "thing"
    template = "unknown {kind} {ref!r}"
    ref: str


class _GateKindError(_KindError):
    kind = "gateway"


def test_fields_are_positional_attributes_and_format_the_message() -> None:
    """Fields are the constructor's arguments in order, its attributes, and fill the template."""
    err = _StateError(3, "acked")
    assert (err.alarm_id, err.reason) == (3, "acked")
    assert str(err) == "alarm 3: 'acked'"
    assert err.args == ("alarm 3: 'acked'",)
    assert repr(err) == "_StateError(\"alarm 3: 'acked'\")"
    assert str(_StateError(alarm_id=4)) == "alarm 4: 'twice'"


def test_errors_compare_and_hash_by_identity() -> None:
    """Two errors with equal fields are two errors: eq and hash stay Exception's."""
    a, b = _StateError(1, "x"), _StateError(1, "x")
    assert a != b
    assert len({a, b}) == 2


def test_a_subclass_keeps_its_own_init_and_class_constants_format() -> None:
    """A subclass's own __init__ is not replaced; class constants fill the template too."""
    assert str(_FixedReasonError(7)) == "alarm 7: 'fixed'"
    assert _FixedReasonError(7).reason == "fixed"
    assert str(_GateKindError("gw-1")) == "unknown gateway 'gw-1'"
    assert isinstance(_FixedReasonError(7), _BaseError) and _FixedReasonError.status == 409


def test_chained_with_from() -> None:
    """`raise … from` keeps the cause."""
    with pytest.raises(_StateError) as caught:
        try:
            raise KeyError("k")
        except KeyError as exc:
            raise _StateError(1, "y") from exc
    assert isinstance(caught.value.__cause__, KeyError)
