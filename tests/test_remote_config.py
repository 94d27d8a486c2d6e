"""The `apply_config` arguments (protocols.remote_config) and the config history on disk
(edge_agent.config.remote): encoding, limits, refusals, generations and rollback."""

from __future__ import annotations

import asyncio
import os
import zlib
from pathlib import Path

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_profiles.loader import builtin_profiles_dir
from edge_agent.config.remote import (
    PHASE_ROLLBACK,
    PHASE_TRIAL,
    ConfigHistory,
    RemoteConfigRefusedError,
    check_candidate,
    sha256,
)
from edge_agent.config.site import parse_config
from edge_agent.config.trial import ConfigTrial, HealthView, Reload, load_or_roll_back
from protocols import commands as c
from protocols.command_results import CommandResult, CommandState, Reason
from protocols.remote_config import (
    MAX_CONFIG_BYTES,
    ApplyConfig,
    RemoteConfigError,
    apply_config_from_mapping,
)

SITE = """[gateway]
id = "gw-1"
data_dir = "data"

[[devices]]
id = "gas-1"
profile = "gas-detector-v1"
transport = { kind = "tcp", host = "127.0.0.1", port = 5020 }
poll_interval_s = 1.0
"""


def _cmd(args: ApplyConfig) -> c.Command:
    return c.make_command("cfg-1", gw="gw-1", args=args, issued_at_ms=1_700_000_000_000,
                          ttl_ms=60_000)


def test_signed_body_round_trips_compressed() -> None:
    """A site file travels zlib-compressed in the signed body and decodes to the same args."""
    args = ApplyConfig(site_toml=SITE * 20)
    body = c.encode_body(_cmd(args))
    assert len(body) < len(SITE * 20) / 4
    back = c.decode_body(body)
    assert back.args == args and back.kind is c.CommandKind.APPLY_CONFIG and back.target == ""
    assert c.args_from_mapping("apply_config", args.readable()) == args


def test_incompressible_config_exceeds_the_body_limit() -> None:
    """A config whose compressed form does not fit 4096 bytes is refused before signing."""
    noise = os.urandom(6000).hex()
    with pytest.raises(c.MalformedCommandError, match="exceed 4096"):
        c.encode_body(_cmd(ApplyConfig(site_toml=f"# {noise}\n{SITE}")))


@pytest.mark.parametrize(("args", "field"), [
    ({}, "args.site_toml"),
    ({"site_toml": SITE, "extra": 1}, "args.extra"),
    ({"site_toml": 5}, "args.site_toml"),
    ({"site_toml": "a\x00b"}, "args.site_toml"),
    ({"site_toml": SITE, "profiles": {"../etc/passwd": "x"}}, "args.profiles"),
    ({"site_toml": "x" * (MAX_CONFIG_BYTES + 1)}, "args"),
    ({"z": b"not zlib"}, "args.z"),
    ({"z": "text"}, "args.z"),
])
def test_bad_args_are_refused_with_the_field(args: dict[str, object], field: str) -> None:
    """Each malformed argument is a MalformedCommandError naming its field."""
    with pytest.raises(c.MalformedCommandError) as info:
        c.args_from_mapping("apply_config", args)
    assert info.value.field == field


def test_inflating_stops_at_the_limit() -> None:
    """A small body that would inflate past 64 KiB is refused, not inflated."""
    bomb = zlib.compress(cbor2.dumps({"site_toml": "a" * (10 * MAX_CONFIG_BYTES)}), 9)
    assert len(bomb) < 1000
    with pytest.raises(RemoteConfigError, match="limit"):
        apply_config_from_mapping({"z": bomb})


@given(st.binary(max_size=300))
def test_garbage_z_raises_only_the_codec_error(data: bytes) -> None:
    """Any bytes in `z` decode or raise RemoteConfigError, nothing else."""
    try:
        apply_config_from_mapping({"z": data})
    except RemoteConfigError:
        pass


def test_history_keeps_generations_and_rolls_back(tmp_path: Path) -> None:
    """begin keeps the old file as a generation and journals before writing; roll_back puts it
    back and is idempotent (a second call after a crash changes nothing)."""
    live = tmp_path / "site.toml"
    live.write_text(SITE)
    history = ConfigHistory(live)
    new = SITE.replace("1.0", "2.0")
    trial = history.begin("cfg-1", new, baseline=("gas-1",), window_s=5, now_ms=1)
    assert live.read_text() == new and history.generation_path(1).read_text() == SITE
    assert history.read_trial() == trial and trial.phase == PHASE_TRIAL
    assert trial.new_sha == sha256(new) and "+poll_interval_s = 2.0" in trial.diff
    back = history.roll_back(trial, "unhealthy")
    assert live.read_text() == SITE and back.phase == PHASE_ROLLBACK
    assert history.read_trial() == back
    assert history.roll_back(back, "again").reason == "unhealthy"
    history.clear_trial()
    assert history.read_trial() is None
    for i in range(12):
        history.begin(f"cfg-{i + 2}", SITE + f"# {i}\n", baseline=(), window_s=5, now_ms=1)
        history.clear_trial()
    assert history.generations() == list(range(4, 14))


def test_candidate_checked_as_at_start_up(tmp_path: Path) -> None:
    """The candidate gets the start-up checks and must keep this gateway's id."""
    live = tmp_path / "site.toml"
    live.write_text(SITE)
    current = parse_config(SITE, live)
    assert check_candidate(SITE.replace("1.0", "3.0"), current).devices[0].poll_interval_s == 3
    with pytest.raises(RemoteConfigRefusedError, match=r"site.toml:9 devices\[0\]"):
        check_candidate(SITE.replace("1.0", "-1"), current)
    with pytest.raises(RemoteConfigRefusedError, match="not this gateway"):
        check_candidate(SITE.replace("gw-1", "gw-2"), current)
    with pytest.raises(RemoteConfigRefusedError, match="profile"):
        check_candidate(SITE.replace("gas-detector-v1", "no-such-profile"), current)


# --- finishing a trial after a restart (edge_agent.config.trial) ----------------------------


class Run:
    """One agent run's view for ConfigTrial: what answers, what it reported, reload asked."""

    def __init__(self, tmp_path: Path, answering: frozenset[str] = frozenset({"gas-1"})) -> None:
        self.results: list[CommandResult] = []
        self.stop = asyncio.Event()
        self.reload = Reload(self.stop, grace_s=3600)
        self.view = HealthView(answering, uplink_up=True)
        live = tmp_path / "site.toml"
        self.trial = ConfigTrial(ConfigHistory(live), parse_config(live.read_text(), live),
                                 settle=self._settle, probe=lambda: self.view,
                                 reload=self.reload)

    async def _settle(self, result: CommandResult) -> None:
        self.results.append(result)

    async def finish(self) -> None:
        trial = self.trial.history.read_trial()
        assert trial is not None
        await self.trial._finish(trial)
        self.reload.stopped()


def _begun(tmp_path: Path, new: str) -> ConfigHistory:
    live = tmp_path / "site.toml"
    live.write_text(SITE)
    history = ConfigHistory(live)
    history.begin("cfg-1", new, baseline=("gas-1",), window_s=0.5, now_ms=1)
    return history


async def test_healthy_trial_is_applied(tmp_path: Path) -> None:
    """Every baseline device answers and the uplink is up: `succeeded`, journal removed."""
    history = _begun(tmp_path, SITE.replace("1.0", "2.0"))
    run = Run(tmp_path)
    await run.finish()
    [result] = run.results
    assert (result.state, result.data["outcome"]) == (CommandState.SUCCEEDED, "applied")
    assert history.read_trial() is None and not run.reload.requested


async def test_unhealthy_trial_rolls_back_then_reports(tmp_path: Path) -> None:
    """A silent device: the old file goes back and the agent reloads; the next run reports
    `failed`/`rolled_back` naming the device."""
    history = _begun(tmp_path, SITE.replace("5020", "5021"))
    run = Run(tmp_path, answering=frozenset())
    await run.finish()
    assert run.reload.requested and run.results == []
    assert history.live_text() == SITE
    after = Run(tmp_path)
    await after.finish()
    [result] = after.results
    assert (result.state, result.reason) == (CommandState.FAILED, Reason.ROLLED_BACK)
    assert "not answering: gas-1" in (result.detail or "") and history.read_trial() is None


async def test_killed_before_the_write_reports_rolled_back(tmp_path: Path) -> None:
    """Journal says `trial` but the old file is still live (killed between the two): nothing
    to undo, reported `rolled_back`."""
    history = _begun(tmp_path, SITE.replace("1.0", "2.0"))
    (tmp_path / "site.toml").write_text(SITE)  # as if the new file never got written
    run = Run(tmp_path)
    await run.finish()
    [result] = run.results
    assert result.reason is Reason.ROLLED_BACK and "before the new config" in (result.detail or "")
    assert history.read_trial() is None


async def test_killed_mid_rollback_restores_then_reports(tmp_path: Path) -> None:
    """Journal says `rollback` but the new file is still live (killed between the two): the
    next run restores it and reloads, the one after reports."""
    history = _begun(tmp_path, SITE.replace("5020", "5021"))
    trial = history.read_trial()
    assert trial is not None
    history.write_trial(trial.with_phase(PHASE_ROLLBACK, "unhealthy"))
    run = Run(tmp_path)
    await run.finish()
    assert run.reload.requested and run.results == [] and history.live_text() == SITE
    after = Run(tmp_path)
    await after.finish()
    assert [r.reason for r in after.results] == [Reason.ROLLED_BACK]


def test_a_config_that_no_longer_loads_is_rolled_back_at_start(tmp_path: Path) -> None:
    """At start, a file in trial that does not load is rolled back and the old one loaded."""
    history = _begun(tmp_path, SITE.replace("gas-detector-v1", "gone-profile"))
    config = load_or_roll_back(tmp_path / "site.toml")
    assert config.devices[0].profile == "gas-detector-v1" and history.live_text() == SITE
    trial = history.read_trial()
    assert trial is not None and trial.phase == PHASE_ROLLBACK


# --- pushed profiles -------------------------------------------------------------------------


def _profile(new_id: str) -> str:
    text = (builtin_profiles_dir() / "gas_detector_v1.yaml").read_text()
    return text.replace("id: gas-detector-v1", f"id: {new_id}", 1)


def _with_profiles_dir(tmp_path: Path) -> str:
    (tmp_path / "profiles").mkdir(exist_ok=True)
    return SITE.replace('data_dir = "data"', 'data_dir = "data"\n\n[profiles]\n'
                                             'dirs = ["profiles"]')


def test_pushed_profiles_are_checked_with_the_config(tmp_path: Path) -> None:
    """A device may use a profile pushed with the config; a broken profile, or profiles with
    no `[profiles] dirs` to go to, are refused."""
    live = tmp_path / "site.toml"
    live.write_text(SITE)
    current = parse_config(SITE, live)
    site = _with_profiles_dir(tmp_path).replace("gas-detector-v1", "gas-remote")
    pushed = (("gas-remote.yaml", _profile("gas-remote")),)
    assert check_candidate(site, current, pushed).devices[0].profile == "gas-remote"
    with pytest.raises(RemoteConfigRefusedError, match="gas-remote"):
        check_candidate(site, current)  # without the profile
    with pytest.raises(RemoteConfigRefusedError, match="profiles.bad.yaml"):
        check_candidate(site, current, (*pushed, ("bad.yaml", "id: [unclosed")))
    with pytest.raises(RemoteConfigRefusedError, match="profiles.dirs"):
        check_candidate(SITE, current, pushed)
    assert not (tmp_path / "profiles" / "gas-remote.yaml").exists()


def test_rollback_removes_added_and_restores_replaced_profiles(tmp_path: Path) -> None:
    """begin writes pushed profiles (diffed); roll_back deletes the new and restores the old."""
    live = tmp_path / "site.toml"
    live.write_text(SITE)
    folder = tmp_path / "profiles"
    folder.mkdir()
    (folder / "old.yaml").write_text("id: old\n")
    history = ConfigHistory(live)
    trial = history.begin("cfg-1", _with_profiles_dir(tmp_path), baseline=(), window_s=1,
                          now_ms=1, profiles=(("new.yaml", "id: new\n"), ("old.yaml", "id: o2\n")),
                          profiles_dir=folder)
    assert (trial.profiles_added, trial.profiles_replaced) == (("new.yaml",), ("old.yaml",))
    assert "+id: new" in trial.diff and "-id: old\n+id: o2" in trial.diff
    assert (folder / "new.yaml").exists() and (folder / "old.yaml").read_text() == "id: o2\n"
    assert history.read_trial() == trial
    history.roll_back(trial, "unhealthy")
    assert not (folder / "new.yaml").exists() and (folder / "old.yaml").read_text() == "id: old\n"
    assert live.read_text() == SITE


async def test_a_crash_loop_on_the_new_config_ends_in_a_rollback(tmp_path: Path) -> None:
    """Each start during a trial is counted; the third start without a verdict rolls back."""
    history = _begun(tmp_path, SITE.replace("1.0", "2.0"))
    for _ in range(3):  # three starts, each killed during its health window
        trial = history.read_trial()
        assert trial is not None and trial.phase == PHASE_TRIAL
        run = Run(tmp_path, answering=frozenset())
        task = asyncio.create_task(run.trial._finish(trial))
        await asyncio.sleep(0.1)
        task.cancel()
    run = Run(tmp_path)
    await run.finish()
    assert run.reload.requested and history.live_text() == SITE
    after = Run(tmp_path)
    await after.finish()
    assert "started 3 times" in (after.results[0].detail or "")


async def test_a_terminal_connected_before_must_connect_again(tmp_path: Path) -> None:
    """叫应 terminals are in the baseline as `terminal:<id>`: one that stays disconnected on
    the new config rolls it back; one the new config drops is not expected."""
    terminal = '\n[[terminals]]\nid = "t-1"\ntcp = "127.0.0.1:7001"\n'
    live = tmp_path / "site.toml"
    live.write_text(SITE + terminal)
    history = ConfigHistory(live)
    history.begin("cfg-1", SITE.replace("1.0", "2.0") + terminal,
                  baseline=("gas-1", "terminal:t-1"), window_s=0.3, now_ms=1)
    run = Run(tmp_path)  # gas-1 answers, t-1 does not
    await run.finish()
    assert run.reload.requested and history.live_text() == SITE + terminal
    after = Run(tmp_path)
    await after.finish()
    assert "not answering: terminal:t-1" in (after.results[0].detail or "")

    history.begin("cfg-2", SITE.replace("1.0", "2.0"), baseline=("gas-1", "terminal:t-1"),
                  window_s=0.3, now_ms=1)
    dropped = Run(tmp_path)
    await dropped.finish()
    assert [r.state for r in dropped.results] == [CommandState.SUCCEEDED]
