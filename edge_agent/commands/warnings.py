"""The `play_warning` kind (DESIGN.md §7): the executor hands the checked args to the gateway's
叫应 terminals (`edge_agent.terminals.service.TerminalService.play`, origin "ip") and reports
what each terminal answered: `{"terminals": {"t-101": {"result": "delivered"},
"t-102": {"result": "refused", "reason": "speaker_fault"}}}`. The command succeeds when at least
one terminal took the warning (delivered, or sent and awaiting its receipt); the receipts
and acks themselves go up as `callresp` events. The IP copy of a command that came by radio
first plays nothing again (`TerminalService.play` claims each cmd_id once): its result says
what the terminals did with the radio copy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from protocols.callresp import PlayWarning

ORIGIN = "ip"


class Outcome(Protocol):
    @property
    def result(self) -> str: ...

    def to_wire(self) -> dict[str, str]: ...


class WarningPlayer(Protocol):
    async def play(self, args: PlayWarning, *, origin: str,
                   cmd_id: str | None = None) -> Mapping[str, Outcome]: ...


async def play_for_command(player: WarningPlayer, args: PlayWarning,
                           cmd_id: str) -> tuple[dict[str, Any], bool]:
    """Play `args` for command `cmd_id`: the result data, and whether any terminal took it."""
    outcomes = await player.play(args, origin=ORIGIN, cmd_id=cmd_id)
    data = {"terminals": {t: o.to_wire() for t, o in outcomes.items()}}
    return data, any(o.result != "refused" for o in outcomes.values())


__all__ = ["ORIGIN", "Outcome", "WarningPlayer", "play_for_command"]
