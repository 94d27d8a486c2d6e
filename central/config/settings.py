"""Central's settings: one validated model, loaded from TOML + environment + CLI flags.

Precedence (lowest first): defaults, the TOML file (top level or a `[central]` table),
`FIELDLINK_CENTRAL_*` environment variables, explicit overrides (CLI flags).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from central import CentralError
from central.callresp.settings import CallRespSettings
from protocols.errors import DetailedError

ENV_PREFIX = "FIELDLINK_CENTRAL_"



def sqlite_path(url: str) -> str | None:
    """The file of a `sqlite:///PATH` URL (`:memory:` stays as it is), None for another URL."""
    return url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else None

class SettingsError(CentralError, DetailedError):
    """The configuration file, environment or flags do not validate."""

    template = "{source}: {reason}"
    source: str
    reason: str


class NarrowbandGateway(BaseModel):
    """A gateway central accepts narrowband frames from (DESIGN.md §5): its BeiDou card and/or
    its PDT radio id (what names the sender on each bearer), and the key its frames are MACed
    with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gw: str = Field(min_length=1)
    card: str | None = Field(default=None, pattern=r"^[0-9]{1,10}$",
                             description="the gateway terminal's BeiDou card id")
    radio: int | None = Field(default=None, ge=1, le=0xFFFFFF,
                              description="the gateway's PDT radio id (24 bits)")
    phone: str | None = Field(default=None, pattern=r"^\+?[0-9]{3,20}$",
                              description="the gateway's Tiantong number, as SMS name it")
    key: str = Field(repr=False, description="the frame MAC key, hex, at least 16 bytes")

    @model_validator(mode="after")
    def _card_or_radio(self) -> Self:
        if self.card is None and self.radio is None and self.phone is None:
            raise ValueError(f"gateway {self.gw!r} needs a card, a radio or a phone")
        return self

    @field_validator("key")
    @classmethod
    def _hex_key(cls, value: str) -> str:
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raise ValueError("key must be hex digits") from None
        if len(raw) < 16:
            raise ValueError(f"key must be at least 16 bytes, not {len(raw)}")
        return value

    @property
    def key_bytes(self) -> bytes:
        return bytes.fromhex(self.key)

    @property
    def card_number(self) -> str | None:
        """The card without leading zeros: terminals pad it (`04207733` is card 4207733)."""
        return None if self.card is None else self.card.lstrip("0")


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    db_url: str = Field(default="sqlite:///./central.db", description="sqlite:///PATH or postgresql://USER@HOST:PORT/DB[?options=-csearch_path%3DSCHEMA]")
    pg_latest_interval_s: float = Field(
        default=0.5, ge=0, le=60,
        description="PostgreSQL: seconds a worker may hold latest values before writing them"
                    " (0: in each ingest transaction); another worker's readers see them this"
                    " late at most")
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = Field(default=1883, ge=1, le=65535)
    mqtt_client_id: str = Field(default="fieldlink-central", min_length=1, max_length=64)
    mqtt_shared: bool = Field(default=False, description="subscribe via $share/central/... (§9)")
    mqtt_keepalive_s: int = Field(default=30, ge=5, le=3600)
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    offline_after_s: float = Field(default=120.0, gt=0,
                                   description="silence after which a gw is offline")
    ingest_drain_max: int = Field(default=50, ge=1, le=1000,
                                  description="messages (batches, states, births) written in "
                                  "one transaction at most")
    # --- alarms (DESIGN.md §7; central.alarms.rules, central.alarms.engine)
    offline_alarm_after_s: float = Field(default=300.0, gt=0, description="silence after which a "
                                         "gateway_offline alarm is raised")
    alarm_rules_interval_s: float = Field(default=5.0, gt=0,
                                          description="period of central's rules")
    alarm_flap_max: int = Field(default=6, ge=1,
                                description="raise/clear transitions allowed within "
                                "the flap window before an alarm is marked flapping")
    alarm_flap_window_s: float = Field(default=600.0, gt=0)
    incident_window_s: float = Field(default=900.0, ge=0,
                                     description="an incident closes this long "
                                     "after its last alarm cleared")
    # --- end alarms
    # --- record times, history and retention (DESIGN.md §4.7; central.storage.history)
    future_tolerance_s: float = Field(default=300.0, ge=0,
                                      description="a record time further ahead of "
                                      "central's clock is stored flagged CLOCK_SUSPECT")
    retention_raw_days: float = Field(default=30.0, ge=0, description="keep raw readings this long "
                                      "(by record time); 0 keeps them for ever")
    retention_1m_days: float = Field(default=400.0, ge=0,
                                     description="keep 1-minute aggregates; 0 = ever")
    retention_1h_days: float = Field(default=0.0, ge=0,
                                     description="keep 1-hour aggregates; 0 = ever")
    retention_interval_s: float = Field(default=3600.0, gt=0, description="period of the purge")
    retention_chunk_rows: int = Field(default=5000, ge=1,
                                      description="rows deleted per transaction")
    agg_flush_interval_s: float = Field(default=30.0, gt=0, description="pause between folds of "
                                        "new samples into the aggregates, each fold spread over "
                                        "0.9 of it: longer folds more samples per bucket write "
                                        "(reads fold first anyway)")
    # --- end history
    # --- narrowband (DESIGN.md §5; central.narrowband.receiver): central's own BeiDou terminal
    # or PDT radio (one per central process)
    narrowband_port: str | None = Field(default=None, description="serial port of central's BeiDou "
                                        "terminal or PDT radio, e.g. /dev/ttyUSB1; None: no "
                                        "receiver")
    narrowband_bearer: Literal["beidou", "pdt", "tiantong"] = Field(
        default="beidou", description="what is on narrowband_port: a BeiDou terminal, a "
                                      "Hytera PDT radio (HRNP) or a Tiantong module (AT, SMS)")
    narrowband_baudrate: int = Field(default=115200, gt=0)
    narrowband_dialect: Literal["bd3", "bd2"] = Field(default="bd3", description="BeiDou only")
    narrowband_mac_len: int = Field(default=4, ge=4, le=32,
                                    description="truncated MAC bytes, as the "
                                    "gateways send them")
    narrowband_gateways: list[NarrowbandGateway] = Field(default_factory=list)
    # the downlink (central.narrowband.downlink): 叫应 warnings to gateways off IP
    narrowband_downlink_segments: int = Field(
        default=3, ge=1, le=16, description="short messages a warning may take; its text is "
                                            "cut to fit")
    narrowband_max_payload_bytes: int | None = Field(
        default=None, ge=16, le=4096, description="cap on one downlink message, for gateways' "
                                                  "terminals that carry less than central's")
    narrowband_radio_id: int | None = Field(default=None, ge=1, le=0xFFFFFF,
                                            description="PDT: central's own radio id, the "
                                                        "source of the texts it sends")
    narrowband_interval_s: float = Field(default=5.0, ge=0, le=3600,
                                         description="PDT: seconds between texts sent")
    # --- end narrowband
    # --- mqtt tls and identities (DESIGN.md §8; central.identity, central.ingest.broker)
    mqtt_tls_ca: Path | None = Field(default=None, description="CA certificate (PEM) the broker's "
                                     "certificate must chain to; setting it turns TLS on")
    mqtt_tls_cert: Path | None = Field(default=None, description="central's client certificate (CN "
                                       "_central), from `central ca central-cert`")
    mqtt_tls_key: Path | None = Field(default=None, description="its private key (mode 0600)")
    mqtt_username: str | None = Field(default=None, min_length=1, description="for brokers that "
                                      "authenticate by password (EMQX, ...)")
    mqtt_password: str | None = Field(default=None, repr=False)
    pki_dir: Path | None = Field(default=None, description="the gateway CA (ca.key 0600, ca.crt, "
                                 "crl.pem); default: pki/ next to the SQLite file; with "
                                 "PostgreSQL required, absolute, shared by every worker")
    gateway_cert_days: float = Field(default=365.0, gt=0, le=3650, description="lifetime of a "
                                     "gateway certificate (renew before it ends)")
    enrol_token_ttl_s: float = Field(default=86_400.0, gt=0, le=30 * 86_400,
                                     description="default lifetime of an enrolment token")
    # --- end mqtt tls
    # --- identity (DESIGN.md §8; central.identity): sessions, login throttle, profiles
    session_idle_s: float = Field(default=1800.0, gt=0,
                                  description="a console session or API token "
                                  "unused this long is logged out")
    login_max_failures: int = Field(default=5, ge=1, description="failed logins per user name or "
                                    "client address within login_window_s before logins are "
                                    "refused (429) until the window passes")
    login_window_s: float = Field(default=300.0, gt=0)
    cookie_secure: bool = Field(default=False, description="mark the session cookie Secure (set it "
                                "when the console is served over HTTPS)")
    profile_dirs: list[Path] = Field(default_factory=list, description="device profiles beyond "
                                     "the built-in ones, to check writes against (§8)")
    # --- end identity
    callresp: CallRespSettings = Field(default_factory=CallRespSettings)  # 叫应 (§7)
    command_key_path: Path | None = Field(
        default=None, description="Ed25519 command-signing key (PEM, made on first start); "
                                  "default: central-command-key.pem next to the SQLite file; "
                                  "with PostgreSQL required, absolute, shared by every worker")

    @property
    def sqlite_file(self) -> str | None:
        """The SQLite file (or `:memory:`) of `db_url`; None for PostgreSQL."""
        return sqlite_path(self.db_url)

    def beside_database(self, setting: Literal["pki_dir", "command_key_path"],
                        default_name: str) -> Path | None:
        """Where `setting` points, else `default_name` next to the SQLite file; None for an
        in-memory SQLite database (its CA and key live as long as the process).

        With PostgreSQL the path must be set, and absolute (`SettingsError` otherwise): every
        central worker (§9) must use the one CA and the one command key, and a default would
        be relative to each worker's working directory, so two workers started from different
        folders would each make their own, and gateways would refuse one of them.
        """
        configured: Path | None = getattr(self, setting)
        sqlite = self.sqlite_file
        if configured is not None:
            path = Path(configured).expanduser()
            if sqlite is None and not path.is_absolute():
                raise SettingsError(setting, f"{configured} is relative; with PostgreSQL give an "
                                             "absolute path that every central worker shares")
            return path
        if sqlite is None:
            raise SettingsError(setting, "with PostgreSQL set it (an absolute path that every "
                                         "central worker shares): pki_dir for the gateway CA, "
                                         "command_key_path for the command-signing key")
        return None if sqlite == ":memory:" else Path(sqlite).expanduser().parent / default_name

    @model_validator(mode="after")
    def _mqtt_tls(self) -> Self:
        if (self.mqtt_tls_cert is None) != (self.mqtt_tls_key is None):
            raise ValueError("mqtt_tls_cert and mqtt_tls_key go together")
        if self.mqtt_tls_cert is not None and self.mqtt_tls_ca is None:
            raise ValueError("mqtt_tls_cert needs mqtt_tls_ca (the broker's CA)")
        if self.mqtt_password is not None and self.mqtt_username is None:
            raise ValueError("mqtt_password needs mqtt_username")
        for name in ("mqtt_tls_ca", "mqtt_tls_cert", "mqtt_tls_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).expanduser().is_file():
                raise ValueError(f"{name}: no such file: {path}")
        return self

    @model_validator(mode="after")
    def _unique_cards(self) -> Self:
        # A card or radio names the sender, so two gateways on one could forge each other.
        cards: set[str] = set()
        radios: set[int] = set()
        gws: set[str] = set()
        for g in self.narrowband_gateways:
            if g.card_number is not None and g.card_number in cards:
                raise ValueError(f"narrowband_gateways: card {g.card} listed twice")
            if g.radio is not None and g.radio in radios:
                raise ValueError(f"narrowband_gateways: radio {g.radio} listed twice")
            if g.gw in gws:
                raise ValueError(f"narrowband_gateways: gateway {g.gw!r} listed twice")
            if g.card_number is not None:
                cards.add(g.card_number)
            if g.radio is not None:
                radios.add(g.radio)
            gws.add(g.gw)
        return self


def load_settings(path: Path | None = None, *, env: Mapping[str, str] | None = None,
                  **overrides: Any) -> Settings:
    """Build `Settings` from a TOML file, `FIELDLINK_CENTRAL_*` variables and overrides.

    Overrides whose value is None are ignored, so CLI flags can be passed straight through.
    """
    data: dict[str, Any] = {}
    source = "settings"
    if path is not None:
        source = str(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SettingsError(source, f"cannot read: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(source, str(exc)) from exc  # message names line and column
        table = raw.get("central", raw)
        if not isinstance(table, dict):
            raise SettingsError(source, "[central] must be a table")
        data.update(table)
    for key, value in (env or {}).items():
        if key.startswith(ENV_PREFIX):
            data[key.removeprefix(ENV_PREFIX).lower()] = value
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}"
                            for e in exc.errors())
        raise SettingsError(source, reasons) from exc
