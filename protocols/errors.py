"""The one base exception of the protocols package; each codec subclasses it narrowly.

`FieldError` and `DeclaredLengthError` are what several codecs' narrow errors have in common
(the field at fault, a frame's length field); a codec's error class inherits from its own base
and from one of these, so it is caught as either."""


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
