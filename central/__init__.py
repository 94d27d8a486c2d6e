"""Fieldlink central: MQTT ingest, storage, alarms, commands and the duty officers' console.

Here stand the error forms that several of central's packages raise. `DuplicateError` is the
counterpart of storage's `NotFoundError`: a subclass names its `kind` and the app answers every
one with 409 "Duplicate {kind}", as it answers a `NotFoundError` with 404 "Unknown {kind}", so
no API module lists its duplicates. `RefusedError` is a request central turns down for a reason
the caller can fix ("password refused: too short"); a subclass names `what` was refused and
says nothing else.
"""

from __future__ import annotations

from typing import ClassVar

from protocols.errors import DetailedError

__version__ = "0.1.0"


class CentralError(Exception):
    """Base of every error central raises on purpose. Modules subclass it narrowly."""


class DuplicateError(CentralError, DetailedError):
    """Something is stored already under the name or code `ref` (the API's 409)."""

    kind: ClassVar[str] = "object"
    template = "{kind} {ref!r} exists already"
    ref: str


class RefusedError(CentralError, DetailedError):
    """A request refused for `reason`; `what` names what was refused."""

    what: ClassVar[str] = "request"
    template = "{what} refused: {reason}"
    reason: str
