"""The gateway's one TOML config file, validated at load with errors that name the line.

`load_config(path)` parses the file with `tomllib`, validates it with msgspec models
(`ConfigTable`: a misspelt key is an error, not a silent default) and then checks what the
models cannot: every device's profile exists and device ids are unique. Any failure raises
`ConfigError` whose message reads like a compiler's:
`site.toml:12 devices[1].poll_interval_s: Input should be greater than 0`.

tomllib keeps no source positions, so `config_lines.LineIndex` scans the text once and maps
each key path (`("devices", 1, "poll_interval_s")`) to the line that defines it; an error on a
key that is absent (a required field) points at its table's header line instead.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from device_profiles import Profile, find_profile
from device_profiles.decoding import DecodeError, decode
from edge_agent.config.checks import ConfigError, ConfigIssue, cross_checks, format_loc, issue_at
from edge_agent.config.lines import LineIndex
from edge_agent.config.models import (
    PROTOCOL_KINDS,
    AgentConfig,
    CommandsConfig,
    ControlConfig,
    DeviceConfig,
    GatewayConfig,
    Hj212TransportConfig,
    MetricsConfig,
    OutboxConfig,
    ProfilesConfig,
    RtuTransportConfig,
    StatusConfig,
    TcpTransportConfig,
    TransportConfig,
)
from edge_agent.narrowband.config import NarrowbandConfig
from edge_agent.uplink.mqtt_config import loose_mode

__all__ = [
    "PROTOCOL_KINDS", "AgentConfig", "CommandsConfig", "ConfigError", "ConfigIssue",
    "ControlConfig", "DeviceConfig", "GatewayConfig", "Hj212TransportConfig", "MetricsConfig",
    "NarrowbandConfig", "OutboxConfig", "ProfilesConfig", "RtuTransportConfig", "StatusConfig",
    "TcpTransportConfig", "TransportConfig", "format_loc", "key_files", "load_config",
    "loose_key_files", "parse_config", "resolve_profiles",
]


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
        config = decode(raw, AgentConfig)
    except DecodeError as exc:
        issues = [issue_at(index, i.loc, i.message) for i in exc.issues]
        first = issues[0]
        raise ConfigError(path, first.line, first.field, first.message, issues=issues) from None

    config = _resolve_paths(config, path)
    issues = list(cross_checks(config, check_profiles=check_profiles, index=index))
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
    return config.model_copy(update={"gateway": gateway, "profiles": profiles,
                                     "control": control, "narrowband": narrowband,
                                     "mqtt": mqtt, "_source": path.resolve()})


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
