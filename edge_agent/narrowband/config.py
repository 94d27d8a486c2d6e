"""The `[narrowband]` section of a gateway's config (DESIGN.md §5), and the frame key.

Kept apart from `edge_agent.config.site`, which holds the rest of the file's models and the
loading; this section has two bearers' keys and the key-file rule of its own. The radios'
limits that the config checks live here, and the bearers (`edge_agent.bearers`) take them from
here: every gateway loads this module, and only those with a `[narrowband]` radio load its driver.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from protocols.hrnp_text import DEFAULT_MAX_TEXT_BYTES, MAX_RADIO_ID
from protocols.narrowband_wire import TEXT_PREFIX

PDT_INTERVAL_S: Final = 5  # between a PDT radio's texts, by default
# The shortest PDT text that still carries a frame worth sending: 28 characters, 21 bytes.
MIN_TEXT_BYTES: Final = 2 * (len(TEXT_PREFIX) + 24)
TIANTONG_MAX_PARTS: Final = 4  # the SMS one frame may take over Tiantong

# Central's address on each bearer, the recipient: the field that must be given for it.
_RECIPIENT_FIELD = {"beidou": "central_card", "pdt": "central_radio", "tiantong": "central_number"}


class NarrowbandConfig(BaseModel):
    """The narrowband fallback (DESIGN.md §5): alarms and a heartbeat by BeiDou short message
    or PDT text message or Tiantong SMS while the IP uplink is down. Absent: no fallback."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bearer: Literal["beidou", "pdt", "tiantong"] = "beidou"
    port: str = Field(min_length=1)
    baudrate: int = Field(default=115200, ge=50, le=4_000_000)
    # --- BeiDou (bearer = "beidou")
    dialect: Literal["bd3", "bd2"] = "bd3"
    # Card of central's own terminal, the recipient (BD-2 cards are 7 digits, BD-3 7 to 10).
    central_card: str | None = Field(default=None, pattern=r"^[0-9]{7,10}$", validate_default=True)
    # Lower the payload limit the card gives: a BD-3 card reports no capacity, so the regional
    # service's 14,000 bits apply unless this says less (global service: 560 bits = 70 bytes).
    max_payload_bytes: int | None = Field(default=None, ge=16, le=4096)
    # --- PDT (bearer = "pdt"): a Hytera radio's HRNP port
    central_radio: int | None = Field(default=None, ge=1, le=MAX_RADIO_ID, validate_default=True)
    # This gateway's radio id: the source of its texts, by which central names the gateway.
    radio_id: int | None = Field(default=None, ge=1, le=MAX_RADIO_ID)
    # The radios' text limit in UTF-16 bytes (128: 64 characters, "FL1:" + 45 frame bytes).
    max_text_bytes: int = Field(default=DEFAULT_MAX_TEXT_BYTES, ge=MIN_TEXT_BYTES, le=960)
    interval_s: int = Field(default=PDT_INTERVAL_S, ge=0, le=3600)  # between texts, for the channel
    # --- Tiantong (bearer = "tiantong"): a satellite module's AT port, SMS in UCS2
    central_number: str | None = Field(default=None, pattern=r"^\+?[0-9]{3,20}$",
                                       validate_default=True)  # central's module, the recipient
    number: str | None = Field(default=None, pattern=r"^\+?[0-9]{3,20}$")  # this module's
    sms_parts: int = Field(default=1, ge=1, le=TIANTONG_MAX_PARTS)  # SMS a frame may take
    # --- both
    # The gateway's frame key (HMAC-SHA256, at least 16 bytes): hex here, or a file holding
    # the hex (relative to this file), so that the key need not sit in the config.
    key: str | None = Field(default=None, repr=False)
    key_file: Path | None = Field(default=None, validate_default=True)
    after_s: float = Field(default=120.0, ge=0,
                           le=86_400)  # IP down this long before the radio is used
    heartbeat_s: float = Field(default=600.0, gt=0, le=86_400)
    mac_len: int = Field(default=4, ge=4, le=32)

    @property
    def recipient(self) -> str:
        """Central's address on this bearer: its card, or its radio id."""
        value = getattr(self, _RECIPIENT_FIELD[self.bearer])
        assert value is not None  # checked at validation
        return str(value)

    @field_validator("key")
    @classmethod
    def _key_hex(cls, value: str | None) -> str | None:
        if value is not None:
            parse_key(value)  # the message never repeats the key
        return value

    @field_validator(*_RECIPIENT_FIELD.values())
    @classmethod
    def _recipient_of_bearer(cls, value: str | int | None,
                             info: ValidationInfo) -> str | int | None:
        if value is None and _RECIPIENT_FIELD.get(info.data.get("bearer", "")) == info.field_name:
            raise PydanticCustomError("missing", "Field required")
        return value

    @field_validator("central_card")
    @classmethod
    def _card_of_dialect(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("dialect") == "bd2" and len(value) != 7:
            raise ValueError("a BD-2 card id is 7 digits")
        return value

    @field_validator("key_file")
    @classmethod
    def _one_key(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if "key" not in info.data:
            return value  # the key itself failed; its error says so
        if (value is None) == (info.data["key"] is None):
            raise ValueError("give exactly one of key and key_file")
        return value

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
