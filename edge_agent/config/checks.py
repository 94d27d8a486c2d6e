"""How a gateway config finding is reported, and the checks the models cannot make.

A finding (`ConfigIssue`) names the line of the key it is about (`LineIndex`) and the key path
(`devices[1].transport.port`); `ConfigError` carries all of a file's findings. The cross
checks look at the whole config: ids, buses, ports, files and profiles.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from device_profiles import DeviceProfileError, Profile, find_profile
from device_profiles.decoding import loc_str
from edge_agent import EdgeError
from edge_agent.alarms.config import build_device_rules
from edge_agent.alarms.rules import RulesError
from edge_agent.config.lines import LineIndex
from edge_agent.config.models import (
    PROTOCOL_KINDS,
    AgentConfig,
    Hj212TransportConfig,
    RtuTransportConfig,
)


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


def issue_at(index: LineIndex, loc: Sequence[str | int], message: str) -> ConfigIssue:
    """A finding about the key at `loc`, on the line that defines it."""
    return ConfigIssue(index.line_of(tuple(loc)), format_loc(loc), message)


def format_loc(loc: Sequence[str | int]) -> str:
    """`("devices", 1, "transport", "port")` → `devices[1].transport.port`."""
    return loc_str(tuple(loc))


def cross_checks(config: AgentConfig, *, check_profiles: bool,
                 index: LineIndex) -> Iterable[ConfigIssue]:
    """What the models cannot check: unique ids, one bus per port, files there, profiles that
    load and fit the device."""
    yield from _duplicate_ids(config, index)
    yield from _bus_checks(config, index)
    yield from _hj212_port_checks(config, index)
    yield from _narrowband_checks(config, index)
    yield from _tls_checks(config, index)
    yield from _terminal_checks(config, index)
    for i, d in enumerate(config.profiles.dirs):
        if not d.is_dir():
            yield issue_at(index, ("profiles", "dirs", i), f"not a folder: {d}")
    if check_profiles:
        yield from _profile_checks(config, index)


def _duplicate_ids(config: AgentConfig, index: LineIndex) -> Iterable[ConfigIssue]:
    seen: dict[str, int] = {}
    for i, dev in enumerate(config.devices):
        if dev.id in seen:
            yield issue_at(index, ("devices", i, "id"),
                           f"duplicate device id {dev.id!r} (also devices[{seen[dev.id]}])")
        else:
            seen[dev.id] = i


def _bus_checks(config: AgentConfig, index: LineIndex) -> Iterable[ConfigIssue]:
    """One serial port is one bus: its devices must agree on the line settings, and two
    devices cannot answer to the same slave address on it."""
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
            yield issue_at(index, ("devices", i, "transport"),
                           f"serial port {t.port} is set up differently in devices[{first}] "
                           "(baudrate, bytesize, parity, stopbits and gap must match on one bus)")
        key = (t.port, dev.device_id)
        if key in addresses:
            yield issue_at(index, ("devices", i, "device_id"),
                           f"slave address {dev.device_id} on {t.port} is already "
                           f"devices[{addresses[key]}]")
        else:
            addresses[key] = i


def _profile_checks(config: AgentConfig, index: LineIndex) -> Iterable[ConfigIssue]:
    """Every device's profile loads, speaks its transport's kind and has its alarm points."""
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
            yield issue_at(index, ("devices", i, "profile"), profile)
            continue
        kinds = PROTOCOL_KINDS.get(profile.protocol, frozenset())
        if dev.transport.kind not in kinds:
            # Points at the `transport` line: the kind is usually inline there.
            yield issue_at(index, ("devices", i, "transport", "kind"),
                           f"profile {dev.profile!r} speaks {profile.protocol}: the transport "
                           f"kind must be {' or '.join(sorted(kinds)) or 'a supported one'}, "
                           f"not {dev.transport.kind!r}")
        elif dev.alarms.points:
            try:
                build_device_rules(dev.id, profile, dev.alarms)
            except RulesError as exc:
                loc = (("devices", i, "alarms", "points", exc.point)
                       + ((exc.field,) if exc.field else ()))
                yield issue_at(index, loc, exc.message)


def _hj212_port_checks(config: AgentConfig, index: LineIndex) -> Iterable[ConfigIssue]:
    """An HJ 212 station owns its port: one device per port and no Modbus RTU bus on it."""
    owners: dict[str, int] = {}
    for i, dev in enumerate(config.devices):
        if isinstance(dev.transport, Hj212TransportConfig) and dev.enabled:
            port = dev.transport.port
            if port in owners:
                yield issue_at(index, ("devices", i, "transport", "port"),
                             f"serial port {port} already carries the HJ 212 station "
                             f"devices[{owners[port]}] (one station per port)")
            else:
                owners[port] = i
    for i, dev in enumerate(config.devices):
        t = dev.transport
        if isinstance(t, RtuTransportConfig) and dev.enabled and t.port in owners:
            yield issue_at(index, ("devices", i, "transport", "port"),
                         f"serial port {t.port} carries the HJ 212 station "
                         f"devices[{owners[t.port]}]; a Modbus RTU bus cannot share it")


def _terminal_checks(config: AgentConfig, index: LineIndex) -> Iterable[ConfigIssue]:
    """Terminal ids are unique, a serial terminal owns its port, and the local warning names
    configured terminals."""
    ids: dict[str, int] = {}
    taken = {d.transport.port for d in config.devices if d.enabled
             and isinstance(d.transport, RtuTransportConfig | Hj212TransportConfig)}
    if config.narrowband is not None:
        taken.add(config.narrowband.port)
    for i, t in enumerate(config.terminals):
        if t.id in ids:
            yield issue_at(index, ("terminals", i, "id"),
                           f"duplicate terminal id {t.id!r} (also terminals[{ids[t.id]}])")
        ids.setdefault(t.id, i)
        if t.serial is not None and t.serial in taken:
            yield issue_at(index, ("terminals", i, "serial"),
                           f"serial port {t.serial} is already in use (one owner per port)")
        if t.serial is not None:
            taken.add(t.serial)
    lw = config.local_warning
    for i, tid in enumerate(lw.terminals if lw is not None else ()):
        if tid not in ids:
            yield issue_at(index, ("local_warning", "terminals", i), f"no terminal {tid!r}")


_BEARER_KEYS: dict[str, str] = {
    "dialect": "beidou", "central_card": "beidou", "max_payload_bytes": "beidou",
    "central_radio": "pdt", "radio_id": "pdt", "max_text_bytes": "pdt",
    "interval_s": "pdt|tiantong", "central_number": "tiantong", "number": "tiantong",
    "sms_parts": "tiantong"}


def _narrowband_checks(config: AgentConfig, index: LineIndex) -> Iterable[ConfigIssue]:
    """A missing key file is an error now, not a fallback that fails on the day IP goes down.
    Its content is read when the agent starts (`key_bytes`): the key is often readable by the
    service account only, and `edge-agent status` loads this file as anyone. The radio's port
    belongs to the fallback alone. A key of the other bearer is a mistake, not a no-op."""
    nb = config.narrowband
    if nb is None:
        return
    given = {key for key in _BEARER_KEYS if ("narrowband", key) in index.lines}
    for key in sorted(given):
        if nb.bearer not in _BEARER_KEYS[key].split("|"):
            owners = " or ".join(f'"{b}"' for b in _BEARER_KEYS[key].split("|"))
            yield issue_at(index, ("narrowband", key),
                         f'{key} is for bearer = {owners}, not "{nb.bearer}"')
    if nb.key_file is not None and not nb.key_file.is_file():
        yield issue_at(index, ("narrowband", "key_file"), f"no such file: {nb.key_file}")
    for i, dev in enumerate(config.devices):
        t = dev.transport
        if dev.enabled and isinstance(t, RtuTransportConfig | Hj212TransportConfig) \
                and t.port == nb.port:
            yield issue_at(index, ("narrowband", "port"),
                         f"serial port {nb.port} is already devices[{i}]'s")


def _tls_checks(config: AgentConfig, index: LineIndex) -> Iterable[ConfigIssue]:
    """The `[mqtt.tls]` files must be there now, not at the first connect."""
    tls = config.mqtt.tls
    if tls is None:
        return
    for name, path in tls.files():
        if not path.is_file():
            yield issue_at(index, ("mqtt", "tls", name), f"no such file: {path}")
