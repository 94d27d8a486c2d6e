"""The gateway config's models: one msgspec Struct per TOML table (`ConfigTable`: unknown keys
are errors, values frozen).

`edge_agent.config.site` loads a file into `AgentConfig` (and re-exports these names);
`edge_agent.config.checks` checks what the models cannot.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, ClassVar, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from msgspec import Meta

from device_profiles.decoding import FieldCheckError
from edge_agent.alarms.config import DeviceAlarmsConfig
from edge_agent.config.table import ConfigTable, TaggedTable
from edge_agent.narrowband.config import NarrowbandConfig
from edge_agent.terminals.config import LocalWarningConfig, TerminalConfig
from edge_agent.uplink.mqtt_config import MqttConfig
from protocols.modbus_rtu import inter_frame_gap_s
from protocols.topics import TopicError, check_gateway_id

# A device id becomes the first half of a point key ("tank-1/level") and a task name, so it
# must not contain "/" and should survive being a log field or a metric label.
_DEVICE_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

Baudrate = Annotated[int, Meta(ge=50, le=4_000_000)]
Port = Annotated[str, Meta(min_length=1)]


# --- the models ---------------------------------------------------------------------------


class GatewayConfig(ConfigTable, frozen=True):
    id: str
    data_dir: Path = Path("/var/lib/fieldlink")

    def __post_init__(self) -> None:
        try:
            check_gateway_id(self.id)
        except TopicError as exc:
            raise FieldCheckError("id", exc.reason) from None


class ProfilesConfig(ConfigTable, frozen=True):
    dirs: list[Path] = msgspec.field(default_factory=list)


class _Transport(TaggedTable, tag_field="kind", frozen=True):
    pass


class TcpTransportConfig(_Transport, tag="tcp", frozen=True):
    """Modbus TCP (MBAP framing) to a device or a serial-to-Ethernet gateway."""

    kind: ClassVar[Literal["tcp"]] = "tcp"
    host: str
    port: Annotated[int, Meta(ge=1, le=65535)] = 502

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"


class RtuTransportConfig(_Transport, tag="rtu", frozen=True):
    """Modbus RTU on a serial port (RS-485/RS-232). Devices naming the same `port` share one
    bus: the agent polls them in turn through one owner of the port, so their line settings
    must agree."""

    kind: ClassVar[Literal["rtu"]] = "rtu"
    port: Port = "/dev/ttyS1"
    baudrate: Baudrate = 9600
    bytesize: Literal[7, 8] = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    # Silence before each request; None: t3.5 of Modbus over Serial Line V1.02 §2.5.1.1
    # (3.5 character times, a fixed 1.75 ms above 19200 baud).
    inter_frame_gap_s: Annotated[float, Meta(ge=0, le=1.0)] | None = None

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


class Hj212TransportConfig(_Transport, tag="hj212", frozen=True):
    """An HJ 212-2017 station pushing frames on a serial port (RS-232/485). The agent only
    listens (and answers data replies), so the port belongs to this one device."""

    kind: ClassVar[Literal["hj212"]] = "hj212"
    port: Port
    baudrate: Baudrate = 9600
    bytesize: Literal[7, 8] = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    # The station's MN (monitoring point id): frames of other stations are dropped when set.
    mn: Annotated[str, Meta(min_length=1, max_length=24)] | None = None
    # The zone of the station's clock (DataTime is local time, no offset on the wire).
    tz: str = "Asia/Shanghai"

    def __post_init__(self) -> None:
        try:
            ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise FieldCheckError("tz", f"unknown time zone {self.tz!r}") from None

    @property
    def endpoint(self) -> str:
        return f"hj212://{self.port}"


TransportConfig = TcpTransportConfig | RtuTransportConfig | Hj212TransportConfig
# Which transport kinds carry which profile protocol.
PROTOCOL_KINDS: Mapping[str, frozenset[str]] = {"modbus": frozenset({"tcp", "rtu"}),
                                                "hj212": frozenset({"hj212"})}


class DeviceConfig(ConfigTable, frozen=True):
    id: Annotated[str, Meta(pattern=_DEVICE_ID_RE)]
    profile: str
    transport: TransportConfig
    # Modbus TCP unit identifier / RTU slave address (Modbus Application Protocol §4.1:
    # 0 is broadcast on serial lines; TCP gateways pass 1..247 to the serial bus behind them).
    device_id: Annotated[int, Meta(ge=0, le=255)] = 1
    poll_interval_s: Annotated[float, Meta(gt=0, le=86_400)] = 1.0
    timeout_s: Annotated[float, Meta(gt=0, le=60)] = 1.0
    # Longest wait between reconnect attempts while the device does not answer.
    backoff_max_s: Annotated[float, Meta(gt=0, le=3600)] = 30.0
    # Points tagged `poll: fast` are read every cycle, `normal` every `normal_every` cycles,
    # `slow` every `slow_every` cycles (a cycle is `poll_interval_s`).
    normal_every: Annotated[int, Meta(ge=1, le=10_000)] = 1
    slow_every: Annotated[int, Meta(ge=1, le=10_000)] = 10
    # Override the profile's read limits: some devices refuse long reads or reads across
    # registers they do not implement.
    max_registers: Annotated[int, Meta(ge=1, le=125)] | None = None
    max_bits: Annotated[int, Meta(ge=1, le=2000)] | None = None
    max_gap: Annotated[int, Meta(ge=0, le=125)] | None = None
    enabled: bool = True
    # Alarm rule overrides and device-level alarms (`[devices.alarms]`, see alarm_config).
    alarms: DeviceAlarmsConfig = msgspec.field(default_factory=DeviceAlarmsConfig)


class ControlConfig(ConfigTable, frozen=True):
    """The local control socket (`edge-agent devices/read/write/alarms` talk to it)."""

    # Unix socket path; default `<data_dir>/agent.sock`. Relative to this file's folder.
    socket: Path | None = None
    enabled: bool = True


Interval = Annotated[float, Meta(gt=0, le=3600)]


class StatusConfig(ConfigTable, frozen=True):
    interval_s: Interval = 5.0


class MetricsConfig(ConfigTable, frozen=True):
    """The Prometheus endpoint (edge_agent/health/metrics.py): off unless enabled, localhost unless
    `host` says otherwise (the gateway's metrics are for its own network, through a tunnel)."""

    enabled: bool = False
    host: Annotated[str, Meta(min_length=1)] = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 9108  # 0: a free port (tests)
    interval_s: Interval = 5.0  # how often the snapshot is refreshed


class OutboxConfig(ConfigTable, frozen=True):
    # How long delivered records stay in the outbox before pruning (0: prune at once). A
    # technician may keep a day of history on site; the tests keep everything to compare.
    keep_delivered_s: Annotated[float, Meta(ge=0)] = 0.0
    # Telemetry older than this is sent flagged as historical (backlog), not live.
    live_window_s: Annotated[float, Meta(gt=0)] = 300.0
    # Disk budget of the outbox file (DESIGN.md §4.6). Past `thin_at` of it telemetry
    # backlog is thinned (every `thin_keep_every`-th sample per point plus each window's
    # min and max, up to `thin_max_rounds` passes), then the oldest is dropped, until it is
    # under `thin_to`; alarms and events are never evicted.
    max_bytes: Annotated[int, Meta(ge=2**20)] = 2**30
    thin_at: Annotated[float, Meta(gt=0, le=1)] = 0.9
    thin_to: Annotated[float, Meta(gt=0, lt=1)] = 0.8
    thin_keep_every: Annotated[int, Meta(ge=2, le=1000)] = 4
    thin_max_rounds: Annotated[int, Meta(ge=0, le=10)] = 2
    # Free space kept on the outbox's file system: below it telemetry is thinned and dropped
    # as above, so that the disk filling up (by anyone) is met long before ENOSPC. The WAL
    # and `-shm` files count towards `max_bytes` too.
    disk_reserve_bytes: Annotated[int, Meta(ge=0)] = 64 * 2**20
    # A file of this size beside the outbox, given back to the file system only to write
    # held alarms at stop or to start on a full disk (0: none).
    ballast_bytes: Annotated[int, Meta(ge=0, le=2**30)] = 2**20
    # Alarm and event records held in memory while the disk is full (oldest given up first).
    hold_records: Annotated[int, Meta(ge=1, le=1_000_000)] = 10_000
    # Ceiling on the backlog drain after an outage (records per second); below it the drain
    # adapts to the ack round trip. Live data and alarms are not limited.
    backlog_max_points_per_s: Annotated[float, Meta(gt=0)] = 2000.0
    # How much queueing (seconds of ack round trip above the lowest seen) the backlog drain
    # may add ahead of live data and alarms; the drain's window shrinks when it adds more.
    backlog_queue_delay_s: Annotated[float, Meta(gt=0, le=60)] = 0.5
    # A wall-clock step larger than this marks records CLOCK_SUSPECT until NTP or
    # `edge-agent clock ok` confirms the time (DESIGN.md §4.7).
    clock_max_step_s: Annotated[float, Meta(gt=0, le=3600)] = 2.0

    def __post_init__(self) -> None:
        if self.thin_to >= self.thin_at:
            raise ValueError("thin_to must be below thin_at")


class CommandsConfig(ConfigTable, frozen=True):
    """Signed commands from central (DESIGN.md §6)."""

    # Central's Ed25519 public key, pinned at enrolment: base64 of its 32 raw bytes, or a path
    # (relative to this file) to a PEM or base64 file. Without it every command is rejected.
    central_public_key: str | None = None
    # `apply_config` (edge_agent.config.trial): how long a new config has to come back healthy
    # (every device that answered before answers again, uplink up) before it is rolled back.
    config_health_window_s: Interval = 60.0


class AgentConfig(ConfigTable, frozen=True):
    gateway: GatewayConfig
    mqtt: MqttConfig = msgspec.field(default_factory=MqttConfig)
    profiles: ProfilesConfig = msgspec.field(default_factory=ProfilesConfig)
    status: StatusConfig = msgspec.field(default_factory=StatusConfig)
    outbox: OutboxConfig = msgspec.field(default_factory=OutboxConfig)
    devices: list[DeviceConfig] = msgspec.field(default_factory=list)
    commands: CommandsConfig = msgspec.field(default_factory=CommandsConfig)
    control: ControlConfig = msgspec.field(default_factory=ControlConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    narrowband: NarrowbandConfig | None = None
    terminals: list[TerminalConfig] = msgspec.field(default_factory=list)  # 叫应 terminals (§7)
    local_warning: LocalWarningConfig | None = None
    # Where the file was loaded from; relative paths in it were resolved against its folder.
    # The program's, not the file's: `decode` refuses a key that starts with "_".
    _source: Path | None = None

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
    def terminals_path(self) -> Path:
        return self.gateway.data_dir / "terminals.db"

    @property
    def control_socket_path(self) -> Path:
        return self.control.socket or self.gateway.data_dir / "agent.sock"

    def device(self, device_id: str) -> DeviceConfig:
        for dev in self.devices:
            if dev.id == device_id:
                return dev
        raise KeyError(device_id)
