"""The one base exception of the protocols package; each codec subclasses it narrowly.

`FieldError`, `DeclaredLengthError` and `ChecksumMismatchError` are what several codecs' narrow
errors have in common (the field at fault, a frame's length field, a checksum or CRC); a codec's
error class inherits from its own base and from one of these, so it is caught as either."""


class ProtocolError(Exception):
    """Base of every error a codec in `protocols` raises on bad input."""


class FieldError(ProtocolError):
    """A field is missing or has the wrong shape or value: `field` names it, `reason` says why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class DeclaredLengthError(ProtocolError):
    """A frame's length field is malformed, too large or does not match the frame; `declared`
    is the length it gave, when it gave one."""

    def __init__(self, reason: str, declared: int | None = None) -> None:
        super().__init__(f"length: {reason}")
        self.reason = reason
        self.declared = declared


class ChecksumMismatchError(ProtocolError):
    """A checksum or CRC does not match the bytes it covers: `expected` is what the bytes give,
    `got` what the frame carries. Each codec words its own message."""

    def __init__(self, message: str, expected: int, got: int) -> None:
        super().__init__(message)
        self.expected = expected
        self.got = got
