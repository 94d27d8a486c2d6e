"""The one base exception of the protocols package; each codec subclasses it narrowly.

`DetailedError` is the declarative form every package's errors use: a class names its fields
(they become its attributes and its constructor's arguments, in order) and a `template`
of its message, formatted with its attributes, instead of writing `__init__` by hand.

`FieldError`, `DeclaredLengthError` and `ChecksumMismatchError` are what several codecs' narrow
errors have in common (the field at fault, a frame's length field, a checksum or CRC); a codec's
error class inherits from its own base and from one of these, so it is caught as either."""

import dataclasses
import typing
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar


@typing.dataclass_transform(eq_default=False)
class DetailedError(Exception):
    """An error whose annotated fields are its attributes and constructor arguments (in the
    order written, defaults allowed) and whose message is `template` formatted with them
    (`str.format`: `"alarm {alarm_id}: {reason}"`, `"{name!r}"`). A class whose message needs
    an expression keeps an `__init__` of its own, which the generated one never replaces.
    Instances compare and hash by identity, as exceptions do."""

    template: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclasses.dataclass(cls, eq=False, repr=False)

    def __post_init__(self) -> None:
        Exception.__init__(self, self.template.format_map(_Attributes(self)))


class _Attributes(Mapping[str, object]):
    """An object's attributes as the mapping `str.format_map` reads: its fields and its class's
    constants (`{kind}`) alike."""

    def __init__(self, owner: object) -> None:
        self._owner = owner

    def __getitem__(self, name: str) -> object:
        return getattr(self._owner, name)

    def __iter__(self) -> Iterator[str]:
        return iter(dir(self._owner))

    def __len__(self) -> int:
        return len(dir(self._owner))


class ProtocolError(Exception):
    """Base of every error a codec in `protocols` raises on bad input."""


class FieldError(ProtocolError, DetailedError):
    """A field is missing or has the wrong shape or value: `field` names it, `reason` says why."""

    template = "{field}: {reason}"
    field: str
    reason: str


class DeclaredLengthError(ProtocolError, DetailedError):
    """A frame's length field is malformed, too large or does not match the frame; `declared`
    is the length it gave, when it gave one."""

    template = "length: {reason}"
    reason: str
    declared: int | None = None


class ChecksumMismatchError(ProtocolError, DetailedError):
    """A checksum or CRC does not match the bytes it covers: `expected` is what the bytes give,
    `got` what the frame carries. Each codec words its own `template`."""

    template = "checksum mismatch: expected {expected}, got {got}"
    expected: int
    got: int
