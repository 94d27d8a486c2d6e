"""The one base exception of the simulators and the narrow errors of scripting them."""

from __future__ import annotations


class SimulatorError(Exception):
    """Base of every error of a simulator in `firmware_stubs`."""


class UnknownPointError(SimulatorError):
    """A scripted point (or device id) does not exist in the simulated profiles."""

    def __init__(self, device_id: int, point: str) -> None:
        super().__init__(f"device {device_id} has no point {point!r}")
        self.device_id = device_id
        self.point = point


class BadValueError(SimulatorError):
    """A scripted value does not fit the point."""
