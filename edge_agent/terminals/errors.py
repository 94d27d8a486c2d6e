"""The terminal driver's errors: one base, narrow subclasses with their data as attributes."""

from __future__ import annotations

from edge_agent import EdgeError
from protocols.errors import DetailedError


class TerminalDriverError(EdgeError):
    """Base of every error of the 叫应 terminal driver."""


class TerminalLineError(TerminalDriverError, DetailedError):
    """The line to a terminal cannot be opened, or failed or ended: `endpoint` and `reason`."""

    template = "{endpoint}: {reason}"
    endpoint: str
    reason: str


class TerminalSilentError(TerminalLineError):
    """No frame from the terminal for three heartbeat intervals (FLT/1 §4.4): it is lost."""


class TerminalStoreError(TerminalDriverError):
    """A receipt or an ack could not be stored (ledger or outbox): it is not confirmed to the
    terminal, which repeats it."""


__all__ = ["TerminalDriverError", "TerminalLineError", "TerminalSilentError",
           "TerminalStoreError"]
