"""The gateway's one TOML config file, validated at load with errors that name the line.

`load_config(path)` parses the file with `tomllib`, validates it with pydantic models
(`extra="forbid"`, so a misspelt key is an error, not a silent default) and then checks what
pydantic cannot: every device's profile exists and device ids are unique. Any failure raises
`ConfigError` whose message reads like a compiler's:
`site.toml:12 devices[1].poll_interval_s: Input should be greater than 0`.

tomllib keeps no source positions, so `config_lines.LineIndex` scans the text once and maps
each key path (`("devices", 1, "poll_interval_s")`) to the line that defines it; an error on a
key that is absent (a required field) points at its table's header line instead.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from device_profiles import DeviceProfileError, Profile, find_profile
from edge_agent.alarms.config import DeviceAlarmsConfig, build_device_rules
from edge_agent.config.lines import LineIndex, Loc
from edge_agent import EdgeError
from edge_agent.uplink.mqtt_config import MqttConfig, loose_mode
from edge_agent.narrowband.config import NarrowbandConfig
from edge_agent.alarms.rules import RulesError
from protocols.modbus_rtu import inter_frame_gap_s
from protocols.topics import TopicError, check_gateway_id

# A device id becomes the first half of a point key ("tank-1/level") and a task name, so it
# must not contain "/" and should survive being a log field or a metric label.
_DEVICE_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class ConfigError(EdgeError):
    """The config file cannot be read or is invalid; names the file, line and field."""

    def __init__(self, path: Path | str, line: int | None, field: str, message: str,
                 *, issues: Sequence[ConfigIssue] = ()) -> None:
        self.path = Path(path)
        self.line = line
        self.field = field
        self.message = message
        self.issues: tuple[ConfigIssue, ...] = tuple(issues) or (ConfigIssue(line, field, message),)
        super().__init__("\n".join(i.render(str(path)) for i in self.issues))


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    line: int | None
    field: str
    message: str

    def render(self, path: str) -> str:
        where = f"{path}:{self.line}" if self.line else path
        return f"{where} {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


# --- the models ---------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewayConfig(_Model):
    id: str
    data_dir: Path = Path("/var/lib/fieldlink")

    @field_validator("id")
    @classmethod
    def _gateway_id(cls, value: str) -> str:
        try:
            return check_gateway_id(value)
        except TopicError as exc:
            raise ValueError(exc.reason) from None


class ProfilesConfig(_Model):
    dirs: list[Path] = Field(default_factory=list)


class TcpTransportConfig(_Model):
    """Modbus TCP (MBAP framing) to a device or a serial-to-Ethernet gateway."""

    kind: Literal["tcp"]
    host: str
    port: int = Field(502, ge=1, le=65535)

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"


class RtuTransportConfig(_Model):
    """Modbus RTU on a serial port (RS-485/RS-232). Devices naming the same `port` share one
    bus: the agent polls them in turn through one owner of the port, so their line settings
    must agree."""

    kind: Literal["rtu"]
    port: str = Field("/dev/ttyS1", min_length=1)
    baudrate: int = Field(9600, ge=50, le=4_000_000)
    bytesize: Literal[7, 8] = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    # Silence before each request; None: t3.5 of Modbus over Serial Line V1.02 §2.5.1.1
    # (3.5 character times, a fixed 1.75 ms above 19200 baud).
    inter_frame_gap_s: float | None = Field(None, ge=0, le=1.0)

    @property
    def endpoint(self) -> str:
        return f"rtu://{self.port}"

    @property
    def gap_s(self) -> float:
        """The inter-frame gap in effect (the configured one or the spec's default)."""
        if self.inter_frame_gap_s is not None:
            return self.inter_frame_gap_s
        return inter_frame_gap_s(self.baudrate, self.bytesize, self.parity, self.stopbits)

    @property
    def line(self) -> tuple[int, int, str, int, float]:
        """The settings every device on this port must share."""
        return (self.baudrate, self.bytesize, self.parity, self.stopbits, self.gap_s)


class Hj212TransportConfig(_Model):
    """An HJ 212-2017 station pushing frames on a serial port (RS-232/485). The agent only
    listens (and answers data replies), so the port belongs to this one device."""

    kind: Literal["hj212"]
    port: str = Field(min_length=1)
    baudrate: int = Field(9600, ge=50, le=4_000_000)
    bytesize: Literal[7, 8] = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    # The station's MN (monitoring point id): frames of other stations are dropped when set.
    mn: str | None = Field(None, min_length=1, max_length=24)
    # The zone of the station's clock (DataTime is local time, no offset on the wire).
    tz: str = "Asia/Shanghai"

    @field_validator("tz")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @property
    def endpoint(self) -> str:
        return f"hj212://{self.port}"


TransportConfig = Annotated[TcpTransportConfig | RtuTransportConfig | Hj212TransportConfig,
                            Field(discriminator="kind")]
_TRANSPORT_KINDS = frozenset({"tcp", "rtu", "hj212"})
# Which transport kinds carry which profile protocol.
PROTOCOL_KINDS: Mapping[str, frozenset[str]] = {"modbus": frozenset({"tcp", "rtu"}),
                                                "hj212": frozenset({"hj212"})}


class DeviceConfig(_Model):
    id: Annotated[str, Field(pattern=_DEVICE_ID_RE)]
    profile: str
    transport: TransportConfig
    # Modbus TCP unit identifier / RTU slave address (Modbus Application Protocol §4.1:
    # 0 is broadcast on serial lines; TCP gateways pass 1..247 to the serial bus behind them).
    device_id: int = Field(1, ge=0, le=255)
    poll_interval_s: float = Field(1.0, gt=0, le=86_400)
    timeout_s: float = Field(1.0, gt=0, le=60)
    # Longest wait between reconnect attempts while the device does not answer.
    backoff_max_s: float = Field(30.0, gt=0, le=3600)
    # Points tagged `poll: fast` are read every cycle, `normal` every `normal_every` cycles,
    # `slow` every `slow_every` cycles (a cycle is `poll_interval_s`).
    normal_every: int = Field(1, ge=1, le=10_000)
    slow_every: int = Field(10, ge=1, le=10_000)
    # Override the profile's read limits: some devices refuse long reads or reads across
    # registers they do not implement.
    max_registers: int | None = Field(None, ge=1, le=125)
    max_bits: int | None = Field(None, ge=1, le=2000)
    max_gap: int | None = Field(None, ge=0, le=125)
    enabled: bool = True
    # Alarm rule overrides and device-level alarms (`[devices.alarms]`, see alarm_config).
    alarms: DeviceAlarmsConfig = Field(default_factory=DeviceAlarmsConfig)


class ControlConfig(_Model):
    """The local control socket (`edge-agent devices/read/write/alarms` talk to it)."""

    # Unix socket path; default `<data_dir>/agent.sock`. Relative to this file's folder.
    socket: Path | None = None
    enabled: bool = True


class StatusConfig(_Model):
    interval_s: float = Field(5.0, gt=0, le=3600)


class MetricsConfig(_Model):
    """The Prometheus endpoint (edge_agent/health/metrics.py): off unless enabled, localhost unless
    `host` says otherwise (the gateway's metrics are for its own network, through a tunnel)."""

    enabled: bool = False
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(9108, ge=0, le=65535)  # 0: a free port (tests)
    interval_s: float = Field(5.0, gt=0, le=3600)  # how often the snapshot is refreshed


class OutboxConfig(_Model):
    # How long delivered records stay in the outbox before pruning (0: prune at once). A
    # technician may keep a day of history on site; the tests keep everything to compare.
    keep_delivered_s: float = Field(0.0, ge=0)
    # Telemetry older than this is sent flagged as historical (backlog), not live.
    live_window_s: float = Field(300.0, gt=0)
    # Disk budget of the outbox file (DESIGN.md §4.6). Past `thin_at` of it telemetry
    # backlog is thinned (every `thin_keep_every`-th sample per point plus each window's
    # min and max, up to `thin_max_rounds` passes), then the oldest is dropped, until it is
    # under `thin_to`; alarms and events are never evicted.
    max_bytes: int = Field(2**30, ge=2**20)
    thin_at: float = Field(0.9, gt=0, le=1)
    thin_to: float = Field(0.8, gt=0, lt=1)
    thin_keep_every: int = Field(4, ge=2, le=1000)
    thin_max_rounds: int = Field(2, ge=0, le=10)
    # Free space kept on the outbox's file system: below it telemetry is thinned and dropped
    # as above, so that the disk filling up (by anyone) is met long before ENOSPC. The WAL
    # and `-shm` files count towards `max_bytes` too.
    disk_reserve_bytes: int = Field(64 * 2**20, ge=0)
    # A file of this size beside the outbox, given back to the file system only to write
    # held alarms at stop or to start on a full disk (0: none).
    ballast_bytes: int = Field(2**20, ge=0, le=2**30)
    # Alarm and event records held in memory while the disk is full (oldest given up first).
    hold_records: int = Field(10_000, ge=1, le=1_000_000)
    # Ceiling on the backlog drain after an outage (records per second); below it the drain
    # adapts to the ack round trip. Live data and alarms are not limited.
    backlog_max_points_per_s: float = Field(2000.0, gt=0)
    # How much queueing (seconds of ack round trip above the lowest seen) the backlog drain
    # may add ahead of live data and alarms; the drain's window shrinks when it adds more.
    backlog_queue_delay_s: float = Field(0.5, gt=0, le=60)
    # A wall-clock step larger than this marks records CLOCK_SUSPECT until NTP or
    # `edge-agent clock ok` confirms the time (DESIGN.md §4.7).
    clock_max_step_s: float = Field(2.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _thin_order(self) -> OutboxConfig:
        if self.thin_to >= self.thin_at:
            raise ValueError("thin_to must be below thin_at")
        return self


class CommandsConfig(_Model):
    """Signed commands from central (DESIGN.md §6)."""

    # Central's Ed25519 public key, pinned at enrolment: base64 of its 32 raw bytes, or a path
    # (relative to this file) to a PEM or base64 file. Without it every command is rejected.
    central_public_key: str | None = None


class AgentConfig(_Model):
    gateway: GatewayConfig
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    profiles: ProfilesConfig = Field(default_factory=ProfilesConfig)
    status: StatusConfig = Field(default_factory=StatusConfig)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    devices: list[DeviceConfig] = Field(default_factory=list)
    commands: CommandsConfig = Field(default_factory=CommandsConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    narrowband: NarrowbandConfig | None = None
    # Where the file was loaded from; relative paths in it were resolved against its folder.
    _source: Path | None = PrivateAttr(default=None)

    @property
    def source(self) -> Path | None:
        return self._source

    @property
    def outbox_path(self) -> Path:
        return self.gateway.data_dir / "outbox.db"

    @property
    def alarms_path(self) -> Path:
        return self.gateway.data_dir / "alarms.db"

    @property
    def commands_path(self) -> Path:
        return self.gateway.data_dir / "commands.db"

    @property
    def control_socket_path(self) -> Path:
        return self.control.socket or self.gateway.data_dir / "agent.sock"

    def device(self, device_id: str) -> DeviceConfig:
        for dev in self.devices:
            if dev.id == device_id:
                return dev
        raise KeyError(device_id)


# --- loading ------------------------------------------------------------------------------


def load_config(path: Path | str, *, check_profiles: bool = True) -> AgentConfig:
    """Read, validate and cross-check one gateway config file, or raise `ConfigError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, None, "", f"cannot read: {exc}") from exc
    return parse_config(text, path, check_profiles=check_profiles)


def parse_config(text: str, path: Path | str = "site.toml", *,
                 check_profiles: bool = True) -> AgentConfig:
    """Validate config text; `path` names the file in errors and anchors relative paths."""
    path = Path(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # Python 3.11's TOMLDecodeError has no lineno attribute; the message ends in
        # "(at line N, column M)".
        m = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise ConfigError(path, int(m.group(1)) if m else None, "", f"TOML syntax: {msg}") from exc

    index = LineIndex(text)
    try:
        config = AgentConfig.model_validate(raw)
    except ValidationError as exc:
        issues = [_issue(index, _error_loc(err), err["msg"]) for err in exc.errors()]
        first = issues[0]
        raise ConfigError(path, first.line, first.field, first.message, issues=issues) from None

    config = _resolve_paths(config, path)
    issues = list(_cross_checks(config, check_profiles=check_profiles, index=index))
    if issues:
        first = issues[0]
        raise ConfigError(path, first.line, first.field, first.message, issues=issues)
    return config


def _resolve_paths(config: AgentConfig, path: Path) -> AgentConfig:
    base = path.resolve().parent

    def fix(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else base / p

    gateway = config.gateway.model_copy(update={"data_dir": fix(config.gateway.data_dir)})
    profiles = config.profiles.model_copy(update={"dirs": [fix(d) for d in config.profiles.dirs]})
    control = config.control.model_copy(
        update={"socket": fix(config.control.socket) if config.control.socket else None})
    narrowband = config.narrowband
    if narrowband is not None and narrowband.key_file is not None:
        narrowband = narrowband.model_copy(update={"key_file": fix(narrowband.key_file)})
    mqtt = config.mqtt
    if mqtt.tls is not None:
        mqtt = mqtt.model_copy(update={"tls": mqtt.tls.model_copy(update={
            name: fix(p) for name, p in mqtt.tls.files()})})
    resolved = config.model_copy(update={"gateway": gateway, "profiles": profiles,
                                         "control": control, "narrowband": narrowband,
                                         "mqtt": mqtt})
    resolved._source = path.resolve()
    return resolved


def _cross_checks(config: AgentConfig, *, check_profiles: bool,
                  index: LineIndex) -> Iterable[ConfigIssue]:
    seen: dict[str, int] = {}
    for i, dev in enumerate(config.devices):
        if dev.id in seen:
            yield _issue(index, ("devices", i, "id"),
                         f"duplicate device id {dev.id!r} (also devices[{seen[dev.id]}])")
        else:
            seen[dev.id] = i
    # One serial port is one bus: its devices must agree on the line settings, and two
    # devices cannot answer to the same slave address on it.
    buses: dict[str, int] = {}
    addresses: dict[tuple[str, int], int] = {}
    for i, dev in enumerate(config.devices):
        t = dev.transport
        if not isinstance(t, RtuTransportConfig) or not dev.enabled:
            continue
        first = buses.setdefault(t.port, i)
        other = config.devices[first].transport
        assert isinstance(other, RtuTransportConfig)
        if other.line != t.line:
            yield _issue(index, ("devices", i, "transport"),
                         f"serial port {t.port} is set up differently in devices[{first}] "
                         "(baudrate, bytesize, parity, stopbits and gap must match on one bus)")
        key = (t.port, dev.device_id)
        if key in addresses:
            yield _issue(index, ("devices", i, "device_id"),
                         f"slave address {dev.device_id} on {t.port} is already "
                         f"devices[{addresses[key]}]")
        else:
            addresses[key] = i
    yield from _hj212_port_checks(config, index)
    yield from _narrowband_checks(config, index)
    yield from _tls_checks(config, index)
    for i, d in enumerate(config.profiles.dirs):
        if not d.is_dir():
            yield _issue(index, ("profiles", "dirs", i), f"not a folder: {d}")
    if not check_profiles:
        return
    found: dict[str, Profile | str] = {}  # profile id -> the profile, or why it does not load
    for i, dev in enumerate(config.devices):
        if dev.profile not in found:
            try:
                found[dev.profile] = find_profile(dev.profile,
                                                  extra_dirs=tuple(config.profiles.dirs))
            except DeviceProfileError as exc:
                found[dev.profile] = str(exc)
        profile = found[dev.profile]
        if isinstance(profile, str):
            yield _issue(index, ("devices", i, "profile"), profile)
            continue
        kinds = PROTOCOL_KINDS.get(profile.protocol, frozenset())
        if dev.transport.kind not in kinds:
            # Points at the `transport` line: the kind is usually inline there.
            yield _issue(index, ("devices", i, "transport", "kind"),
                         f"profile {dev.profile!r} speaks {profile.protocol}: the transport "
                         f"kind must be {' or '.join(sorted(kinds)) or 'a supported one'}, "
                         f"not {dev.transport.kind!r}")
        elif dev.alarms.points:
            try:
                build_device_rules(dev.id, profile, dev.alarms)
            except RulesError as exc:
                loc = ("devices", i, "alarms", "points", exc.point) + ((exc.field,) if exc.field else ())
                yield _issue(index, loc, exc.message)


def _hj212_port_checks(config: AgentConfig, index: LineIndex) -> Iterable[ConfigIssue]:
    """An HJ 212 station owns its port: one device per port and no Modbus RTU bus on it."""
    owners: dict[str, int] = {}
    for i, dev in enumerate(config.devices):
        if isinstance(dev.transport, Hj212TransportConfig) and dev.enabled:
            port = dev.transport.port
            if port in owners:
                yield _issue(index, ("devices", i, "transport", "port"),
                             f"serial port {port} already carries the HJ 212 station "
                             f"devices[{owners[port]}] (one station per port)")
            else:
                owners[port] = i
    for i, dev in enumerate(config.devices):
        t = dev.transport
        if isinstance(t, RtuTransportConfig) and dev.enabled and t.port in owners:
            yield _issue(index, ("devices", i, "transport", "port"),
                         f"serial port {t.port} carries the HJ 212 station "
                         f"devices[{owners[t.port]}]; a Modbus RTU bus cannot share it")


_BEARER_KEYS: dict[str, str] = {
    "dialect": "beidou", "central_card": "beidou", "max_payload_bytes": "beidou",
    "central_radio": "pdt", "radio_id": "pdt", "max_text_bytes": "pdt", "interval_s": "pdt"}


def _narrowband_checks(config: AgentConfig, index: LineIndex) -> Iterable[ConfigIssue]:
    """A missing key file is an error now, not a fallback that fails on the day IP goes down.
    Its content is read when the agent starts (`key_bytes`): the key is often readable by the
    service account only, and `edge-agent status` loads this file as anyone. The radio's port
    belongs to the fallback alone. A key of the other bearer is a mistake, not a no-op."""
    nb = config.narrowband
    if nb is None:
        return
    for key in sorted(nb.model_fields_set & _BEARER_KEYS.keys()):
        if _BEARER_KEYS[key] != nb.bearer:
            yield _issue(index, ("narrowband", key),
                         f'{key} is for bearer = "{_BEARER_KEYS[key]}", not "{nb.bearer}"')
    if nb.key_file is not None and not nb.key_file.is_file():
        yield _issue(index, ("narrowband", "key_file"), f"no such file: {nb.key_file}")
    for i, dev in enumerate(config.devices):
        t = dev.transport
        if dev.enabled and isinstance(t, RtuTransportConfig | Hj212TransportConfig) \
                and t.port == nb.port:
            yield _issue(index, ("narrowband", "port"),
                         f"serial port {nb.port} is already devices[{i}]'s")


def _tls_checks(config: AgentConfig, index: LineIndex) -> Iterable[ConfigIssue]:
    """The `[mqtt.tls]` files must be there now, not at the first connect."""
    tls = config.mqtt.tls
    if tls is None:
        return
    for name, path in tls.files():
        if not path.is_file():
            yield _issue(index, ("mqtt", "tls", name), f"no such file: {path}")


def key_files(config: AgentConfig) -> list[tuple[str, Path]]:
    """The secret files the config names: the MQTT TLS key and the narrowband frame key."""
    out: list[tuple[str, Path]] = []
    if config.mqtt.tls is not None and config.mqtt.tls.key is not None:
        out.append(("mqtt.tls.key", config.mqtt.tls.key))
    if config.narrowband is not None and config.narrowband.key_file is not None:
        out.append(("narrowband.key_file", config.narrowband.key_file))
    return out


def loose_key_files(config: AgentConfig) -> list[tuple[str, Path, int]]:
    """Key files that group or others may read: `(setting, path, mode)`; a warning, since a
    key readable by the service account only is what matters and the file still works."""
    return [(name, path, mode) for name, path in key_files(config)
            if (mode := loose_mode(path)) is not None]


def resolve_profiles(config: AgentConfig) -> dict[str, Profile]:
    """The profile of every configured device, by device id (extra dirs win over built-ins)."""
    by_id: dict[str, Profile] = {}
    out: dict[str, Profile] = {}
    for dev in config.devices:
        if dev.profile not in by_id:
            by_id[dev.profile] = find_profile(dev.profile, extra_dirs=tuple(config.profiles.dirs))
        out[dev.id] = by_id[dev.profile]
    return out


def _error_loc(err: Mapping[str, Any]) -> Loc:
    """The key path a pydantic error is about, without the tags of discriminated unions.

    pydantic puts the chosen member's tag into the path (`transport.rtu.port`), which is not a
    key of the file; an invalid or missing tag is reported on the union itself, so point at
    the discriminator key (`transport.kind`) instead.
    """
    loc = list(err["loc"])
    cleaned = [part for i, part in enumerate(loc)
               if not (i > 0 and loc[i - 1] == "transport" and part in _TRANSPORT_KINDS)]
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        cleaned.append(str(err.get("ctx", {}).get("discriminator", "kind")).strip("'\""))
    return tuple(cleaned)


def _issue(index: LineIndex, loc: Sequence[str | int], message: str) -> ConfigIssue:
    return ConfigIssue(index.line_of(tuple(loc)), format_loc(loc), message)


def format_loc(loc: Sequence[str | int]) -> str:
    """`("devices", 1, "transport", "port")` → `devices[1].transport.port`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part.startswith("function-"):
            continue  # pydantic validator wrappers and union tags, not keys of the file
        else:
            out += f".{part}" if out else part
    return out
