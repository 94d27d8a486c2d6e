"""Narrowband bearers: drivers of the radios the agent falls back to while IP is down
(DESIGN.md §5), and what they share: the errors, the card a terminal holds and the answer to a
send. Each driver (`edge_agent.bearers.beidou`, `edge_agent.bearers.pdt`,
`edge_agent.bearers.tiantong`) owns one serial port
and speaks its radio's sentences or packets through a pure codec in `protocols/`;
`edge_agent.narrowband.fallback` decides what goes over it and when.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from edge_agent import EdgeError
from protocols.errors import DetailedError
from runtime.serial import SerialPortError

# --- errors --------------------------------------------------------------------------------


class BearerError(EdgeError):
    """Base of every narrowband bearer error."""


class BearerPortError(BearerError, SerialPortError):
    """The serial port cannot be opened, or was lost (missing, busy, unplugged)."""


class BearerTimeoutError(BearerError, DetailedError):
    """The terminal did not answer one step within its timeout."""

    template = "{port}: no answer to {step} within {timeout_s:g} s"
    port: str
    step: str
    timeout_s: float


class NoCardError(BearerError, DetailedError):
    """The terminal answered that it holds no card: it cannot send."""

    template = "{port}: the terminal has no card"
    port: str


class ConnectRejectedError(BearerError, DetailedError):
    """The radio refused the link (HRNP reject to a connect): it cannot send."""

    template = "{port}: the radio rejected the HRNP connect"
    port: str


class BearerRequestError(BearerError):
    """A send the bearer cannot carry (a recipient card of the wrong length for the dialect, a
    radio id out of range, a frame whose text is too long for the radio)."""


class BearerReplyError(BearerError):
    """The terminal's answer makes no sense here (a BD-2 card level without a capacity)."""


# --- results -------------------------------------------------------------------------------


class Refusal(enum.StrEnum):
    """Why a terminal refused a send, in terms common to the bearers and dialects."""

    INTERVAL = "interval"  # the service interval has not passed; `wait_s` says how long
    SUPPRESSED = "suppressed"  # system suppression
    SILENT = "silent"  # radio silence
    NO_BEAMS = "no_beams"  # BD-3 reason 4, power not locked: no satellite in view
    NO_CARD = "no_card"
    NO_PERMISSION = "no_permission"
    LOW_BATTERY = "low_battery"  # BD-2 suppression 2
    UNSPECIFIED = "unspecified"  # executed N with no reason (a payload over the limit)
    CHANNEL_BUSY = "channel_busy"  # PDT result 4
    NO_CONTACT = "no_contact"  # PDT result 10: the recipient radio did not answer
    TX_DENIED = "tx_denied"  # PDT result 11: the system denied the transmission
    NO_NETWORK = "no_network"  # Tiantong +CMS ERROR 331: the module lost its registration
    SEND_FAILED = "send_failed"  # Tiantong: another +CMS ERROR, after the retries; `code`
    OTHER = "other"  # a code this driver does not know; `code` has it


@dataclass(frozen=True, slots=True)
class CardInfo:
    """What the terminal's card allows: one send per `interval_s`, `payload_bytes` each. A PDT
    radio has no card: `card_id` is its radio id ("" when not configured), `level` 0, and the
    interval is the configured courtesy to the channel."""

    card_id: str
    level: int
    interval_s: int
    payload_bytes: int
    dialect: str  # the bearer's own: "bd3", "bd2", "pdt"
    encrypted: bool = False


@dataclass(frozen=True, slots=True)
class SendResult:
    """A terminal's answer to one send (BeiDou `$BDFKI`, a PDT text-message ack): accepted, or
    refused with a reason and the seconds to wait."""

    accepted: bool
    reason: Refusal | None = None
    wait_s: int = 0
    code: int = 0  # the terminal's own number: BD-3 reason, BD-2 suppression, PDT result


__all__ = ["BearerError", "BearerPortError", "BearerReplyError", "BearerRequestError",
           "BearerTimeoutError", "CardInfo", "ConnectRejectedError", "NoCardError", "Refusal",
           "SendResult"]
