"""The one base exception of the simulators and the narrow errors of scripting them."""

from __future__ import annotations

from protocols.errors import DetailedError


class SimulatorError(Exception):
    """Base of every error of a simulator in `firmware_stubs`."""


class UnknownPointError(SimulatorError, DetailedError):
    """A scripted point (or device id) does not exist in the simulated profiles."""

    template = "device {device_id} has no point {point!r}"
    device_id: int
    point: str


class BadValueError(SimulatorError):
    """A scripted value does not fit the point."""
