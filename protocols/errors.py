"""The one base exception of the protocols package; each codec subclasses it narrowly."""


class ProtocolError(Exception):
    """Base of every error a codec in `protocols` raises on bad input."""
