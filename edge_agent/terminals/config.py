"""The `[[terminals]]` and `[local_warning]` sections of a gateway's config (DESIGN.md §7).

    [[terminals]]
    id = "t-101"                  # the terminal's id (printed on its case), as central knows it
    kind = "audio"                # or "video" (a camera)
    tcp = "192.168.10.21:7700"    # the terminal listens, the gateway connects ...
    # serial = "/dev/ttyUSB2"     # ... or a serial line, one terminal per port
    # baudrate = 115200

    [local_warning]               # played by the gateway itself on a local level-2 alarm
    text = "燃气泄漏，请立即撤离"    # while it is cut off from central
    level = "red"
    alarms = ["*/gas_lel/*"]      # alarm ids (fnmatch patterns) that trigger it
    terminals = []                # empty: every terminal of the gateway
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from device_profiles.decoding import FieldCheckError
from edge_agent.config.table import ConfigTable
from protocols.callresp import MAX_REPEAT, MAX_TEXT_CHARS, Level

_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$"  # a callresp id that is also an FLT/1 terminal id


class TerminalConfig(ConfigTable, frozen=True):
    """One 叫应 terminal (docs/terminal-protocol.md): on TCP (`tcp = "host:port"`) or on a serial
    port (`serial`), exactly one of them."""

    id: Annotated[str, Meta(pattern=_ID_RE)]
    kind: Literal["audio", "video"] = "audio"
    tcp: str | None = None
    serial: Annotated[str, Meta(min_length=1)] | None = None
    baudrate: Annotated[int, Meta(ge=50, le=4_000_000)] = 115200
    connect_timeout_s: Annotated[float, Meta(gt=0, le=120)] = 5.0
    # Longest wait between reconnect attempts while the terminal does not answer.
    backoff_max_s: Annotated[float, Meta(gt=0, le=3600)] = 30.0
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.tcp is not None:
            host, sep, port = self.tcp.rpartition(":")
            if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise FieldCheckError("tcp", 'expected "host:port"')
        if (self.tcp is None) == (self.serial is None):
            raise ValueError("set exactly one of tcp and serial")

    @property
    def host_port(self) -> tuple[str, int]:
        assert self.tcp is not None
        host, _, port = self.tcp.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.tcp}" if self.tcp is not None else f"serial://{self.serial}"


class LocalWarningConfig(ConfigTable, frozen=True):
    """The local rule: on a local alarm of `alarm_level` whose id matches one of `alarms`,
    raised while the gateway is cut off from central (`only_offline`), play `text` on
    `terminals` (empty: all) by itself."""

    text: Annotated[str, Meta(min_length=1, max_length=MAX_TEXT_CHARS)]
    level: Level = Level.RED
    repeat: Annotated[int, Meta(ge=1, le=MAX_REPEAT)] = 3
    alarms: Annotated[list[str], Meta(min_length=1)] = msgspec.field(default_factory=lambda: ["*"])
    alarm_level: Annotated[int, Meta(ge=1, le=2)] = 2
    terminals: list[str] = msgspec.field(default_factory=list)
    only_offline: bool = True

    def matches(self, alarm_id: str, level: int) -> bool:
        return level >= self.alarm_level and any(fnmatchcase(alarm_id, p) for p in self.alarms)


__all__ = ["LocalWarningConfig", "TerminalConfig"]
