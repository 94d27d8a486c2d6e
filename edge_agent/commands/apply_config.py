"""The `apply_config` command: a new site config from central, tried with rollback (§6).

`prepare` refuses (`rejected`/`config_invalid`, the reason in `detail` and `error`) a config
that fails the start-up checks (`edge_agent.config.remote.check_candidate`), or arrives while
another trial runs. The action notes which devices answer now (the baseline the new config
must meet), keeps the old file (and any profile it replaces) as a generation, journals the
trial, writes the pushed profiles and the new file and asks the agent to reload; the command
stays `executing` until `edge_agent.config.trial` reports `succeeded` (applied) or
`failed`/`rolled_back`, with the diff, after the reload.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import Any

from edge_agent.commands.outcomes import Action, CommandDeferred, CommandFailed, CommandRejected
from edge_agent.config.remote import (
    ConfigHistory,
    ConfigHistoryError,
    RemoteConfigRefusedError,
    check_candidate,
)
from edge_agent.config.site import AgentConfig
from edge_agent.config.trial import ConfigTrial, HealthView, Reload
from protocols.command_results import Reason
from protocols.commands import Command
from protocols.remote_config import ApplyConfig
from runtime.clock import now_ms


@dataclass(eq=False)
class ApplyConfigHandler:
    """`outcomes.KindHandler` of `apply_config`: the running config and the collaborators
    that check, try and record a new one."""

    config: AgentConfig
    history: ConfigHistory
    trial: ConfigTrial
    _: KW_ONLY
    probe: Callable[[], HealthView]
    reload: Reload
    wall_ms: Callable[[], int] = now_ms

    def resumes(self, cmd_id: str) -> bool:
        return self.trial.owns(cmd_id)

    def prepare(self, cmd: Command) -> Action:
        args = cmd.args
        assert isinstance(args, ApplyConfig)
        try:
            candidate = check_candidate(args.site_toml, self.config, args.profiles)
            running = self.history.read_trial()
            if running is not None:
                raise RemoteConfigRefusedError(f"config trial {running.cmd_id} is in progress")
            unchanged = self.history.live_text() == args.site_toml and not args.profiles
        except (RemoteConfigRefusedError, ConfigHistoryError) as exc:
            raise CommandRejected(Reason.CONFIG_INVALID, str(exc),
                                  {"outcome": "refused", "error": str(exc)}) from None
        if unchanged:
            return self._unchanged

        async def apply() -> dict[str, Any]:
            baseline = tuple(sorted(self.probe().answering))
            try:
                self.history.begin(cmd.cmd_id, args.site_toml, baseline=baseline,
                                   window_s=self.config.commands.config_health_window_s,
                                   now_ms=self.wall_ms(), profiles=args.profiles,
                                   profiles_dir=next(iter(candidate.profiles.dirs), None))
            except ConfigHistoryError as exc:
                with contextlib.suppress(ConfigHistoryError):  # the live file is written
                    self.history.clear_trial()  # last, atomically: the old one is still live
                raise CommandFailed(Reason.INTERNAL_ERROR, str(exc)) from exc
            self.reload.request("config trial")
            raise CommandDeferred("the agent reloads on the new config; the trial reports")

        return apply

    async def _unchanged(self) -> dict[str, Any]:
        return {"outcome": "unchanged", "diff": ""}
