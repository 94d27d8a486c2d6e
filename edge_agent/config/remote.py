"""Remote configuration on disk: the candidate check, kept generations and the trial journal.

Central's `apply_config` command (`protocols.remote_config`) carries a whole new site file.
`check_candidate` runs the same checks as start-up on it (`parse_config`, profiles included)
plus the ones a remote change needs (same gateway id, a file the agent can replace); pushed
profiles are loaded and take part in the check as if already in the first `[profiles] dirs`
folder, where `begin` writes them (a replaced one is kept in `gen-NNNN.profiles/`). Then
`ConfigHistory.begin` keeps the old file as a numbered generation, writes the trial journal and
only then replaces the live file (write beside it, fsync, rename, fsync the folder). Everything
lives beside the config file, in `<config>.history/`: the generations `gen-0001.toml`, … (the
newest `KEEP_GENERATIONS`) and `trial.json`, the journal of the one trial in progress:

- `trial`: the new file is live (or about to be); the health check decides;
- `rollback`: the old generation is live again (or about to be); report `rolled_back`;
- `applied`: healthy; report `succeeded`.

Each step writes the journal BEFORE the file it describes, and every step is idempotent, so
after a kill -9 anywhere the next start reads the journal and finishes (`ConfigTrial`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from device_profiles import DeviceProfileError, load_profile
from edge_agent import EdgeError
from edge_agent.config.checks import cross_checks
from edge_agent.config.lines import LineIndex
from edge_agent.config.site import AgentConfig, ConfigError, parse_config

log = structlog.get_logger(__name__)

KEEP_GENERATIONS = 10
MAX_DIFF_CHARS = 8000  # the diff travels in the command result (an outbox record's attrs)
PHASE_TRIAL = "trial"
PHASE_ROLLBACK = "rollback"
PHASE_APPLIED = "applied"
_TUPLES = ("baseline", "profiles_added", "profiles_replaced")
Profiles = tuple[tuple[str, str], ...]  # pushed device profiles: (file name, YAML text)


class RemoteConfigRefusedError(EdgeError):
    """The candidate config is not one this agent will try; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigHistoryError(EdgeError):
    """The config history (generations, journal) cannot be read or written."""


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def unified_diff(old: str, new: str, name: str = "site.toml") -> str:
    """The unified diff of two config texts, cut at `MAX_DIFF_CHARS`."""
    diff = "".join(difflib.unified_diff(old.splitlines(keepends=True),
                                        new.splitlines(keepends=True),
                                        fromfile=f"a/{name}", tofile=f"b/{name}"))
    if len(diff) > MAX_DIFF_CHARS:
        diff = diff[:MAX_DIFF_CHARS] + "\n… (diff truncated)\n"
    return diff


def check_candidate(text: str, current: AgentConfig,
                    profiles: Profiles = ()) -> AgentConfig:
    """The candidate parsed and checked as at start-up, with the pushed `profiles` as if
    already in the first `[profiles] dirs` folder; `RemoteConfigRefusedError` if not."""
    if current.source is None:
        raise RemoteConfigRefusedError("the running config was not loaded from a file")
    try:
        candidate = parse_config(text, current.source, check_profiles=not profiles)
        if profiles:
            _check_with_profiles(candidate, text, profiles)
    except ConfigError as exc:
        raise RemoteConfigRefusedError(str(exc)) from None
    if candidate.gateway.id != current.gateway.id:
        raise RemoteConfigRefusedError(f"gateway.id {candidate.gateway.id!r} is not this "
                                       f"gateway ({current.gateway.id})")
    folder = current.source.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RemoteConfigRefusedError(f"{folder} is not writable by the agent")
    return candidate


def _check_with_profiles(candidate: AgentConfig, text: str, profiles: Profiles) -> None:
    """Load every pushed profile, then check the devices' profiles with them in front."""
    path = candidate.source or Path("site.toml")
    if not candidate.profiles.dirs:
        raise ConfigError(path, None, "profiles.dirs", "pushed profiles go into the first "
                                                       "[profiles] dirs folder: name one")
    with tempfile.TemporaryDirectory(prefix=".profiles-") as tmp:
        for name, body in profiles:
            (Path(tmp) / name).write_text(body, encoding="utf-8")
            try:
                load_profile(Path(tmp) / name)
            except DeviceProfileError as exc:
                raise ConfigError(path, None, f"profiles.{name}", str(exc)) from None
        dirs = candidate.profiles.model_copy(update={"dirs": [Path(tmp),
                                                              *candidate.profiles.dirs]})
        staged = candidate.model_copy(update={"profiles": dirs})
        for issue in cross_checks(staged, check_profiles=True, index=LineIndex(text)):
            raise ConfigError(path, issue.line, issue.field, issue.message)


@dataclass(frozen=True, slots=True)
class Trial:
    """The journal of one config trial (`trial.json`)."""

    cmd_id: str
    phase: str
    generation: int  # the kept old config
    old_sha: str
    new_sha: str
    diff: str
    baseline: tuple[str, ...]  # devices that answered before: they must answer again
    window_s: float
    started_ms: int
    reason: str | None = None
    profiles_dir: str | None = None  # where pushed profiles went (the first [profiles] dirs)
    profiles_added: tuple[str, ...] = ()  # new files: removed on rollback
    profiles_replaced: tuple[str, ...] = ()  # kept in gen-NNNN.profiles/: put back on rollback
    starts: int = 0  # agent starts on the new file so far (a crash loop ends in a rollback)

    def with_phase(self, phase: str, reason: str | None = None) -> Trial:
        return dataclasses.replace(self, phase=phase, reason=reason or self.reason)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


class ConfigHistory:
    """The live config file, its kept generations and the trial journal beside it."""

    def __init__(self, config_path: Path, keep: int = KEEP_GENERATIONS) -> None:
        self.path = Path(config_path)
        self.dir = self.path.with_name(self.path.name + ".history")
        self.journal = self.dir / "trial.json"
        self.keep = keep

    def live_text(self) -> str:
        return self._read(self.path)

    def generation_path(self, n: int) -> Path:
        return self.dir / f"gen-{n:04d}.toml"

    def generations(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(p.stem[4:]) for p in self.dir.glob("gen-*.toml") if p.stem[4:].isdigit())

    def read_trial(self) -> Trial | None:
        if not self.journal.exists():
            return None
        try:
            raw: dict[str, Any] = json.loads(self._read(self.journal))
            return Trial(**{**raw, **{k: tuple(raw.get(k, ())) for k in _TUPLES}})
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigHistoryError(f"{self.journal}: unreadable journal: {exc}") from exc

    def write_trial(self, trial: Trial) -> None:
        self._write(self.journal, json.dumps(dataclasses.asdict(trial), ensure_ascii=False))

    def clear_trial(self) -> None:
        try:
            self.journal.unlink(missing_ok=True)
        except OSError as exc:
            raise ConfigHistoryError(f"{self.journal}: {exc}") from exc

    def begin(self, cmd_id: str, new_text: str, *, baseline: tuple[str, ...], window_s: float,
              now_ms: int, profiles: Profiles = (), profiles_dir: Path | None = None) -> Trial:
        """Keep the live file (and the profiles about to be replaced) as a new generation,
        journal the trial, then write the profiles and `new_text`."""
        old = self.live_text()
        self.dir.mkdir(mode=0o750, exist_ok=True)
        gen = (self.generations() or [0])[-1] + 1
        self._write(self.generation_path(gen), old)
        diff = unified_diff(old, new_text, self.path.name)
        added, replaced = [], []
        for name, body in profiles:
            assert profiles_dir is not None
            target = profiles_dir / name
            before = self._read(target) if target.exists() else None
            if before is None:
                added.append(name)
            else:
                replaced.append(name)
                self.profiles_backup(gen).mkdir(exist_ok=True)
                self._write(self.profiles_backup(gen) / name, before)
            diff += unified_diff(before or "", body, name)
        trial = Trial(cmd_id=cmd_id, phase=PHASE_TRIAL, generation=gen, old_sha=sha256(old),
                      new_sha=sha256(new_text), diff=diff[:MAX_DIFF_CHARS], baseline=baseline,
                      window_s=window_s, started_ms=now_ms,
                      profiles_dir=str(profiles_dir) if profiles else None,
                      profiles_added=tuple(added), profiles_replaced=tuple(replaced))
        self.write_trial(trial)
        for name, body in profiles:
            assert profiles_dir is not None
            self._write(profiles_dir / name, body)
        self._write(self.path, new_text)
        self._prune()
        log.info("config_trial_begun", cmd_id=cmd_id, generation=gen, new_sha=trial.new_sha)
        return trial

    def roll_back(self, trial: Trial, reason: str) -> Trial:
        """Journal the rollback, then put the kept generation back (again, if need be)."""
        back = trial
        if trial.phase != PHASE_ROLLBACK:  # a rollback resumed keeps its first reason
            back = trial.with_phase(PHASE_ROLLBACK, reason)
            self.write_trial(back)
        if trial.profiles_dir is not None:
            folder = Path(trial.profiles_dir)
            for name in trial.profiles_replaced:
                self._write(folder / name, self._read(self.profiles_backup(trial.generation)
                                                      / name))
            for name in trial.profiles_added:
                (folder / name).unlink(missing_ok=True)
        old = self._read(self.generation_path(trial.generation))
        if sha256(self.live_text()) != sha256(old):
            self._write(self.path, old)
        log.warning("config_rolled_back", cmd_id=trial.cmd_id, generation=trial.generation,
                    reason=back.reason)
        return back

    def profiles_backup(self, n: int) -> Path:
        return self.dir / f"gen-{n:04d}.profiles"

    def _prune(self) -> None:
        for n in self.generations()[:-self.keep]:
            self.generation_path(n).unlink(missing_ok=True)
            shutil.rmtree(self.profiles_backup(n), ignore_errors=True)

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigHistoryError(f"{path}: {exc}") from exc

    @staticmethod
    def _write(path: Path, text: str) -> None:
        try:
            _write_atomic(path, text)
        except OSError as exc:
            raise ConfigHistoryError(f"{path}: {exc}") from exc
