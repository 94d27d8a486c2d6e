"""Warnings that come by radio, played on the 叫应 terminals (DESIGN.md §5 "Downlink", §7).

`RadioWarningPlayer` is the narrowband downlink's `WarningHandler`
(`edge_agent.narrowband.downlink`) when the gateway has terminals: a verified radio warning
goes to `TerminalService.play` with the bearer's name as origin ("beidou", "pdt") and the
signed command's cmd_id, so the IP copy of the same command (central still sends it when the
gateway returns) plays nothing again. The receipts and acks become 叫应 EVENT records in the
outbox, which the fallback sends up by radio (frame kind 3) and the uplink over IP later.
"""

from __future__ import annotations

import structlog

from edge_agent.terminals.service import TerminalService
from protocols.narrowband_down import RadioWarning

log = structlog.get_logger(__name__)


class RadioWarningPlayer:
    """Plays radio warnings on `terminals`; `bearer` is the radio that brought them."""

    def __init__(self, terminals: TerminalService, bearer: str) -> None:
        self.terminals = terminals
        self.bearer = bearer

    async def __call__(self, warning: RadioWarning) -> None:
        outcomes = await self.terminals.play(warning.args, origin=self.bearer,
                                             cmd_id=warning.command.cmd_id)
        if not any(o.result != "refused" for o in outcomes.values()):
            log.warning("narrowband_warning_not_taken", cmd_id=warning.command.cmd_id,
                        warning_id=warning.args.warning_id,
                        terminals={t: o.to_wire() for t, o in outcomes.items()})


__all__ = ["RadioWarningPlayer"]
