"""The config trial at run time: restart on the new file, check health, roll back by itself.

How a new config is applied: the agent stops and runs again, in the same process, on the file
as it now is (`run_with_trials` around `run_agent`; `Reload.request` sets the agent's stop
event). Every part that reads the config (devices, rules, birth inventory, uplink, outbox)
is then built from it exactly as at start-up, with no second code path to keep in step, and
the same works under systemd and for an agent process in a test. A config that no longer
loads, or an agent that cannot start on it, is rolled back at once (`load_or_roll_back`,
also at the first start after a kill -9).

`ConfigTrial.run` (task `config.trial`) reads the journal (`edge_agent.config.remote`) at every
start and finishes what it finds:

- `trial` with the new file live: within `window_s`, every device of the baseline (those
  that answered before, still in the config and enabled) must answer (state ok or degraded)
  and the uplink must be connected; then `applied` → `succeeded`. Otherwise the old
  generation is put back and the agent reloads → `rollback`. After a kill -9 the window
  starts again with the new start, up to `MAX_TRIAL_STARTS` starts (a crash loop on the new
  file ends in a rollback). `trial` with the old file still live (stopped before the write)
  → `rollback`.
- `rollback` with the old file live → `failed`/`rolled_back`, with the reason; with the new
  file live (stopped mid-rollback) → restore and reload first.
- `applied` → `succeeded`.

Each result carries `outcome`, the unified `diff` and the kept `generation`; the journal is
removed only once the result is in the command ledger and the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from edge_agent.commands.ledger import CommandLedgerError
from edge_agent.config.remote import (
    PHASE_APPLIED,
    PHASE_ROLLBACK,
    PHASE_TRIAL,
    ConfigHistory,
    ConfigHistoryError,
    Trial,
    sha256,
)
from edge_agent.config.site import AgentConfig, ConfigError, load_config
from protocols.command_results import CommandResult, CommandState, Reason

log = structlog.get_logger(__name__)

CHECK_EVERY_S = 0.25
RELOAD_GRACE_S = 10.0
MAX_TRIAL_STARTS = 3
SETTLE_RETRY_S = 0.5
KIND = "apply_config"


@dataclass(frozen=True, slots=True)
class HealthView:
    answering: frozenset[str]  # devices whose last cycle read data; `terminal:<id>` connected
    uplink_up: bool


class Reload:
    """A request to stop the agent and run it again on the config file as it now is.

    A task that swallows its cancellation (Python 3.11's `asyncio.wait_for`, inside aiomqtt
    and pymodbus, can drop a cancel that races the reply it waits for) would hold the stop for
    ever; so if the agent has not stopped `grace_s` after the request, the process re-executes
    itself (same pid, same arguments: to systemd and to a test it stays the same process).
    Every store is written for a kill -9 (the outbox, ledger and journal), which is all an
    exec is to them.
    """

    def __init__(self, stop: asyncio.Event, grace_s: float = RELOAD_GRACE_S) -> None:
        self.stop = stop
        self.grace_s = grace_s
        self.requested = False
        self._timer: asyncio.TimerHandle | None = None

    def request(self, why: str) -> None:
        log.info("agent_reload_requested", why=why)
        self.requested = True
        self.stop.set()
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.grace_s, self._reexec)

    def stopped(self) -> None:
        """The agent stopped in time: no re-exec."""
        if self._timer is not None:
            self._timer.cancel()

    def _reexec(self) -> None:
        stuck = {t.get_name(): [f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}"
                                for f in t.get_stack(limit=8)]
                 for t in asyncio.all_tasks() if not t.done()}
        log.error("agent_stop_stuck_reexec", grace_s=self.grace_s, argv=sys.orig_argv,
                  tasks=stuck)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os.execv(sys.executable, sys.orig_argv)


Settle = Callable[[CommandResult], Awaitable[None]]


def trial_result(trial: Trial) -> CommandResult:
    data: dict[str, Any] = {"outcome": "applied" if trial.phase == PHASE_APPLIED
                            else "rolled_back", "diff": trial.diff,
                            "generation": trial.generation, "sha256": trial.new_sha,
                            "health_window_s": trial.window_s, "baseline": list(trial.baseline)}
    if trial.phase == PHASE_APPLIED:
        return CommandResult(trial.cmd_id, CommandState.SUCCEEDED, kind=KIND, data=data)
    return CommandResult(trial.cmd_id, CommandState.FAILED, Reason.ROLLED_BACK, kind=KIND,
                         detail=trial.reason, data=data | {"error": trial.reason})


class ConfigTrial:
    """Finishes the config trial the journal names, if any (see the module doc)."""

    def __init__(self, history: ConfigHistory, config: AgentConfig, *, settle: Settle,
                 probe: Callable[[], HealthView], reload: Reload) -> None:
        self.history = history
        self.config = config
        self.settle = settle
        self.probe = probe
        self.reload = reload
        self._finishing: str | None = None  # the cmd_id this run finishes (journal or not)

    def owns(self, cmd_id: str) -> bool:
        if cmd_id == self._finishing:
            return True  # settled and its journal removed while the executor recovers
        try:
            trial = self.history.read_trial()
        except ConfigHistoryError:
            return False
        return trial is not None and trial.cmd_id == cmd_id

    async def run(self) -> None:
        trial = self.history.read_trial()
        if trial is not None:
            self._finishing = trial.cmd_id
            await self._finish(trial)
        await asyncio.Event().wait()  # nothing (more) to do in this run

    async def _finish(self, trial: Trial) -> None:
        live = sha256(self.history.live_text())
        if trial.phase == PHASE_TRIAL and live != trial.new_sha:
            trial = self.history.roll_back(trial, "the agent stopped before the new config "
                                                  "was written; the old one stays")
        elif trial.phase == PHASE_TRIAL and trial.starts >= MAX_TRIAL_STARTS:
            self.history.roll_back(trial, f"the agent started {trial.starts} times on the new "
                                          "config without finishing its health check")
            self.reload.request("config rolled back")
            return
        elif trial.phase == PHASE_TRIAL:
            self.history.write_trial(dataclasses.replace(trial, starts=trial.starts + 1))
            why = await self._unhealthy(trial)
            if why is not None:
                self.history.roll_back(trial, why)
                self.reload.request("config rolled back")
                return
            trial = trial.with_phase(PHASE_APPLIED)
            self.history.write_trial(trial)
            log.info("config_applied", cmd_id=trial.cmd_id, generation=trial.generation)
        elif trial.phase == PHASE_ROLLBACK and live != trial.old_sha:
            self.history.roll_back(trial, trial.reason or "rolled back")
            self.reload.request("config rollback resumed")
            return
        await self._settle(trial_result(trial))
        self.history.clear_trial()

    async def _unhealthy(self, trial: Trial) -> str | None:
        """None once every expected device answers and the uplink is up; else why not, at the
        end of the window."""
        enabled = {d.id for d in self.config.devices if d.enabled} | {
            f"terminal:{t.id}" for t in self.config.terminals if t.enabled}
        expected = [d for d in trial.baseline if d in enabled]
        deadline = time.monotonic() + trial.window_s
        while True:
            view = self.probe()
            silent = [d for d in expected if d not in view.answering]
            if not silent and view.uplink_up:
                return None
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(CHECK_EVERY_S)
        parts = [f"not answering: {', '.join(silent)}"] if silent else []
        if not view.uplink_up:
            parts.append("uplink not connected")
        return f"unhealthy after {trial.window_s:g} s ({'; '.join(parts)})"

    async def _settle(self, result: CommandResult) -> None:
        while True:  # the command ledger opens with the commands task, beside this one
            try:
                await self.settle(result)
                return
            except CommandLedgerError as exc:
                log.debug("config_trial_waits_for_ledger", error=str(exc))
                await asyncio.sleep(SETTLE_RETRY_S)


def load_or_roll_back(path: Any) -> AgentConfig:
    """`load_config`, but a file in trial that does not load is rolled back first."""
    try:
        return load_config(path)
    except ConfigError as exc:
        history = ConfigHistory(path)
        trial = history.read_trial()
        if trial is None or trial.phase != PHASE_TRIAL:
            raise
        history.roll_back(trial, f"the new config does not load: {exc}")
        return load_config(path)


async def run_with_trials(config: AgentConfig,
                          run: Callable[..., Awaitable[bool]]) -> None:
    """Run the agent (`run(config)` returns True to be run again on the file as it now is)
    until it stops for good; an agent that cannot start on a config in trial is
    run again on the rolled-back one."""
    while True:
        try:
            again = await run(config)
        except Exception as exc:  # the supervisor of trials: a new config that breaks start-up
            history = ConfigHistory(config.source) if config.source else None
            trial = history.read_trial() if history else None
            if history is None or trial is None or trial.phase != PHASE_TRIAL:
                raise
            log.exception("agent_failed_on_new_config")
            history.roll_back(trial, f"the agent failed to start: {type(exc).__name__}: {exc}")
            again = True
        if not again:
            return
        assert config.source is not None
        config = load_or_roll_back(config.source)
