"""The `[narrowband]` section of a gateway's config (DESIGN.md §5), and the frame key.

Kept apart from `edge_agent.config.site`, which holds the rest of the file's models and the
loading; this section has two bearers' keys and the key-file rule of its own. The radios'
limits that the config checks live here, and the bearers (`edge_agent.bearers`) take them from
here: every gateway loads this module, and only those with a `[narrowband]` radio load its driver.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Final, Literal

from msgspec import Meta

from device_profiles.decoding import FieldCheckError
from edge_agent.config.table import ConfigTable
from protocols.hrnp_text import DEFAULT_MAX_TEXT_BYTES, MAX_RADIO_ID
from protocols.narrowband_wire import TEXT_PREFIX

PDT_INTERVAL_S: Final = 5  # between a PDT radio's texts, by default
# The shortest PDT text that still carries a frame worth sending: 28 characters, 21 bytes.
MIN_TEXT_BYTES: Final = 2 * (len(TEXT_PREFIX) + 24)
TIANTONG_MAX_PARTS: Final = 4  # the SMS one frame may take over Tiantong

# Central's address on each bearer, the recipient: the field that must be given for it.
_RECIPIENT_FIELD = {"beidou": "central_card", "pdt": "central_radio", "tiantong": "central_number"}
_PHONE = Meta(pattern=r"^\+?[0-9]{3,20}$")
_RADIO = Meta(ge=1, le=MAX_RADIO_ID)


class NarrowbandConfig(ConfigTable, kw_only=True, frozen=True):
    """The narrowband fallback (DESIGN.md §5): alarms and a heartbeat by BeiDou short message
    or PDT text message or Tiantong SMS while the IP uplink is down. Absent: no fallback."""

    _secret: ClassVar[frozenset[str]] = frozenset({"key"})

    bearer: Literal["beidou", "pdt", "tiantong"] = "beidou"
    port: Annotated[str, Meta(min_length=1)]
    baudrate: Annotated[int, Meta(ge=50, le=4_000_000)] = 115200
    # --- BeiDou (bearer = "beidou")
    dialect: Literal["bd3", "bd2"] = "bd3"
    # Card of central's own terminal, the recipient (BD-2 cards are 7 digits, BD-3 7 to 10).
    central_card: Annotated[str, Meta(pattern=r"^[0-9]{7,10}$")] | None = None
    # Lower the payload limit the card gives: a BD-3 card reports no capacity, so the regional
    # service's 14,000 bits apply unless this says less (global service: 560 bits = 70 bytes).
    max_payload_bytes: Annotated[int, Meta(ge=16, le=4096)] | None = None
    # --- PDT (bearer = "pdt"): a Hytera radio's HRNP port
    central_radio: Annotated[int, _RADIO] | None = None
    # This gateway's radio id: the source of its texts, by which central names the gateway.
    radio_id: Annotated[int, _RADIO] | None = None
    # The radios' text limit in UTF-16 bytes (128: 64 characters, "FL1:" + 45 frame bytes).
    max_text_bytes: Annotated[int, Meta(ge=MIN_TEXT_BYTES, le=960)] = DEFAULT_MAX_TEXT_BYTES
    # Between texts, for the channel.
    interval_s: Annotated[int, Meta(ge=0, le=3600)] = PDT_INTERVAL_S
    # --- Tiantong (bearer = "tiantong"): a satellite module's AT port, SMS in UCS2
    central_number: Annotated[str, _PHONE] | None = None  # central's module, the recipient
    number: Annotated[str, _PHONE] | None = None  # this module's
    sms_parts: Annotated[int, Meta(ge=1, le=TIANTONG_MAX_PARTS)] = 1  # SMS a frame may take
    # --- both
    # The gateway's frame key (HMAC-SHA256, at least 16 bytes): hex here, or a file holding
    # the hex (relative to this file), so that the key need not sit in the config.
    key: str | None = None  # never in its repr
    key_file: Path | None = None
    after_s: Annotated[float, Meta(ge=0, le=86_400)] = 120.0  # IP down this long before the radio
    heartbeat_s: Annotated[float, Meta(gt=0, le=86_400)] = 600.0
    mac_len: Annotated[int, Meta(ge=4, le=32)] = 4

    def __post_init__(self) -> None:
        """The checks across fields, in the order of the fields they name."""
        recipient = _RECIPIENT_FIELD[self.bearer]
        if getattr(self, recipient) is None:
            raise FieldCheckError(recipient, "Field required", kind="missing")
        if self.central_card is not None and self.dialect == "bd2" and len(self.central_card) != 7:
            raise FieldCheckError("central_card", "a BD-2 card id is 7 digits")
        if self.key is not None:
            try:
                parse_key(self.key)  # the message never repeats the key
            except ValueError as exc:
                raise FieldCheckError("key", str(exc)) from None
        if (self.key_file is None) == (self.key is None):
            raise FieldCheckError("key_file", "give exactly one of key and key_file")

    @property
    def recipient(self) -> str:
        """Central's address on this bearer: its card, or its radio id."""
        value = getattr(self, _RECIPIENT_FIELD[self.bearer])
        assert value is not None  # checked at validation
        return str(value)

    def key_bytes(self) -> bytes:
        """The key, read from `key_file` if that is how it is given; raises `ValueError`."""
        if self.key is not None:
            return parse_key(self.key)
        assert self.key_file is not None
        try:
            text = self.key_file.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read {self.key_file}: {exc}") from exc
        return parse_key(text)


NARROWBAND_MIN_KEY_BYTES = 16


def parse_key(text: str) -> bytes:
    """A frame key from hex (spaces and line ends allowed); at least 16 bytes."""
    try:
        key = bytes.fromhex("".join(text.split()))
    except ValueError:
        raise ValueError("the key must be hex digits") from None
    if len(key) < NARROWBAND_MIN_KEY_BYTES:
        raise ValueError(f"the key must be at least {NARROWBAND_MIN_KEY_BYTES} bytes "
                         f"({2 * NARROWBAND_MIN_KEY_BYTES} hex digits), not {len(key)}")
    return key


__all__ = ["NARROWBAND_MIN_KEY_BYTES", "NarrowbandConfig", "parse_key"]
