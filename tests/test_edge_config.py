"""The gateway config: validation, and errors that name the file, line and field."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_agent.config.site import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent

GOOD = """\
# a comment line
[gateway]
id = "gw-001"
data_dir = "data"

[mqtt]
host = "127.0.0.1"
port = 1883

[profiles]
dirs = [
]

[[devices]]
id = "tank-1"
profile = "storage-tank-v1"
transport = { kind = "tcp", host = "127.0.0.1", port = 5020 }
device_id = 1
poll_interval_s = 1.0

[[devices]]
id = "gas-1"
profile = "gas-detector-v1"
transport = { kind = "tcp", host = "127.0.0.1", port = 5021 }
poll_interval_s = 2.0
timeout_s = 1.0
"""


def _line_of(text: str, needle: str, occurrence: int = 1) -> int:
    seen = 0
    for n, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            seen += 1
            if seen == occurrence:
                return n
    raise AssertionError(f"{needle!r} not in text")


def _error(tmp_path: Path, text: str) -> ConfigError:
    path = tmp_path / "site.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


def test_example_config_loads() -> None:
    """The shipped examples/site.toml is valid, profiles included."""
    cfg = load_config(ROOT / "examples" / "site.toml")
    assert cfg.gateway.id == "gw-001"
    assert [d.id for d in cfg.devices] == ["tank-1", "gas-1"]
    assert cfg.outbox_path == Path("/var/lib/fieldlink/outbox.db")


def test_good_config_fills_defaults_and_resolves_relative_paths(tmp_path: Path) -> None:
    """Defaults are filled in and a relative data_dir is anchored at the config's folder."""
    path = tmp_path / "site.toml"
    path.write_text(GOOD)
    cfg = load_config(path)
    assert cfg.gateway.data_dir == tmp_path / "data"
    assert cfg.outbox_path == tmp_path / "data" / "outbox.db"
    assert cfg.mqtt.batch_size == 500 and cfg.mqtt.max_inflight == 16
    assert cfg.devices[1].device_id == 1
    assert cfg.devices[0].transport.port == 5020
    assert cfg.source == path.resolve()


def test_bad_value_names_line_and_field(tmp_path: Path) -> None:
    """A bad value in the second [[devices]] table is reported at its own line."""
    text = GOOD.replace("poll_interval_s = 2.0", "poll_interval_s = 0")
    exc = _error(tmp_path, text)
    line = _line_of(text, "poll_interval_s = 0")
    assert (exc.line, exc.field) == (line, "devices[1].poll_interval_s")
    assert str(exc) == f"{tmp_path / 'site.toml'}:{line} devices[1].poll_interval_s: Input should be greater than 0"


@dataclass(frozen=True)
class BadConfig:
    """GOOD with `old` replaced by `new`, and where the ConfigError must point: `field`, the line
    of the `occurrence`-th `at`; `says` is in its message (`exact`: is its message)."""

    old: str
    new: str
    field: str
    at: str
    occurrence: int = 1
    says: str = ""
    exact: bool = False


BAD_CONFIGS = {
    # A bad key inside an inline transport table points at that line.
    "inline_table_key_names_its_line": BadConfig(
        "port = 5021", "port = 70000", "devices[1].transport.port", "port = 70000",
        says="65535"),
    # extra="forbid": a misspelt key fails instead of being ignored.
    "unknown_key_is_an_error_at_its_line": BadConfig(
        "timeout_s = 1.0", "timeout_s = 1.0\npoll_intervall_s = 5", "devices[1].poll_intervall_s",
        "poll_intervall_s", says="Extra inputs are not permitted"),
    # A required key that is absent is reported at its table's header line.
    "missing_field_points_at_its_table": BadConfig(
        'profile = "gas-detector-v1"\n', "", "devices[1].profile", "[[devices]]", occurrence=2,
        says="Field required", exact=True),
    # A device whose profile does not exist fails at load, at its profile line.
    "unknown_profile_names_the_device_line": BadConfig(
        '"gas-detector-v1"', '"no-such-profile"', "devices[1].profile", "no-such-profile",
        says="no-such-profile"),
    # Two devices with one id fail at the second id's line.
    "duplicate_device_ids_are_rejected": BadConfig(
        'id = "gas-1"', 'id = "tank-1"', "devices[1].id", 'id = "tank-1"', occurrence=2,
        says="duplicate"),
    # Only kind = "tcp" exists for now; anything else names the kind key.
    "wrong_transport_kind_is_rejected": BadConfig(
        'kind = "tcp", host = "127.0.0.1", port = 5021', 'kind = "udp", host = "h"',
        "devices[1].transport.kind", '"udp"'),
}


@pytest.mark.parametrize("case", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_config_names_field_and_line(tmp_path: Path, case: BadConfig) -> None:
    """A bad key or value is a ConfigError naming its field and the line it stands on."""
    text = GOOD.replace(case.old, case.new)
    exc = _error(tmp_path, text)
    assert exc.field == case.field
    assert exc.line == _line_of(text, case.at, occurrence=case.occurrence)
    if case.exact:
        assert exc.message == case.says
    else:
        assert case.says in exc.message


def test_bad_gateway_id_is_rejected(tmp_path: Path) -> None:
    """The gateway id must be a valid topic level and CN (topics.check_gateway_id)."""
    text = GOOD.replace('id = "gw-001"', 'id = "gw/001"')
    exc = _error(tmp_path, text)
    assert (exc.field, exc.line) == ("gateway.id", 3)


def test_several_errors_are_all_reported(tmp_path: Path) -> None:
    """Every validation error is listed, one per line, first one in the attributes."""
    text = GOOD.replace("port = 1883", "port = 0").replace("poll_interval_s = 2.0", "poll_interval_s = -1")
    exc = _error(tmp_path, text)
    assert [i.field for i in exc.issues] == ["mqtt.port", "devices[1].poll_interval_s"]
    assert len(str(exc).splitlines()) == 2
    assert exc.line == _line_of(text, "port = 0")


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    """A TOML syntax error is a ConfigError with tomllib's line."""
    text = GOOD.replace("device_id = 1", "device_id = = 1")
    exc = _error(tmp_path, text)
    assert exc.line == _line_of(text, "device_id = = 1")
    assert "TOML syntax" in exc.message


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """An unreadable file raises ConfigError, not OSError."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_profile_check_can_be_skipped() -> None:
    """parse_config(check_profiles=False) accepts unknown profiles (for status on a bare box)."""
    cfg = parse_config(GOOD.replace('"gas-detector-v1"', '"later-v1"'), check_profiles=False)
    assert cfg.devices[1].profile == "later-v1"


def test_birth_ordinals_follow_config_order(tmp_path: Path) -> None:
    """Birth lists devices with profile id and hash; ordinals run over devices in config order
    and a disabled device keeps its ordinals (adding or enabling one renumbers nothing)."""
    from edge_agent.config.site import resolve_profiles
    from edge_agent.uplink.birth import build_birth

    path = tmp_path / "site.toml"
    path.write_text(GOOD)
    cfg = load_config(path)
    profiles = resolve_profiles(cfg)
    birth = build_birth(cfg, profiles, stream="s1", boot_id="b1", version="0.1.0")
    assert (birth.gw, birth.stream, birth.boot_id) == ("gw-001", "s1", "b1")
    tank, gas = birth.devices
    assert (tank.id, tank.profile, tank.profile_hash) == ("tank-1", "storage-tank-v1",
                                                         profiles["tank-1"].hash)
    assert [p.ordinal for p in tank.points] == list(range(len(tank.points)))
    assert tank.points[0].key == "tank-1/level" and tank.points[0].name_zh == "液位"
    assert gas.points[0].ordinal == len(tank.points)

    path.write_text(GOOD.replace('id = "tank-1"', 'id = "tank-1"\nenabled = false'))
    cfg2 = load_config(path)
    birth2 = build_birth(cfg2, resolve_profiles(cfg2), stream="s1", boot_id="b2", version="0.1.0")
    assert [d.id for d in birth2.devices] == ["gas-1"]
    assert birth2.devices[0].points == gas.points
