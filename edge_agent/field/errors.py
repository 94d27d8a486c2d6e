"""The transport error family: what a Modbus request over any link (TCP, RTU bus) can fail with.

Library exceptions (pymodbus, pyserial) are translated into these where our code calls the
library, chained with `from`; the poller and the command executor see only these.
"""

from __future__ import annotations

from edge_agent import EdgeError
from protocols.errors import DetailedError


class TransportError(EdgeError, DetailedError):
    """A request did not complete; `endpoint` names the link."""

    template = "{endpoint}: {message}"
    endpoint: str
    message: str


class TransportConnectError(TransportError):
    """The link cannot be opened (refused, unreachable, no such port)."""


class TransportTimeoutError(TransportError):
    """The device did not answer within the timeout."""


class TransportCrcError(TransportError):
    """An answer arrived with a wrong CRC (line noise, a bad termination or a failing slave)."""


class TransportFramingError(TransportError):
    """Bytes came back but no right answer: garbage, or a reply that is wrong.

    `reason` is one of `FRAMING_REASONS`: `garbage` (bytes that make no frame), `short_frame`
    (a frame cut off before its end), `lying_byte_count` (a CRC-valid frame whose byte count
    promises more data than it carries), `wrong_unit` (an answer from another slave address
    that is not a late answer to the previous request), `wrong_function` (an answer for
    another function code), `too_few_registers` (a consistent answer with fewer items than
    asked).
    """

    def __init__(self, endpoint: str, message: str, *, reason: str = "garbage") -> None:
        super().__init__(endpoint, message)
        self.reason = reason


FRAMING_REASONS = ("garbage", "short_frame", "lying_byte_count", "wrong_unit", "wrong_function",
                   "too_few_registers")


class ModbusExceptionError(TransportError):
    """The device answered with a Modbus exception response (§7: e.g. 2 illegal address)."""

    def __init__(self, endpoint: str, function: int, code: int) -> None:
        super().__init__(endpoint, f"function {function} exception code {code}")
        self.function = function
        self.code = code
