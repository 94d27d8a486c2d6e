"""What the agent's observers read of the running agent: the control socket and the metrics.

`edge_agent.agent.AgentRuntime` is the one implementation. The observers depend on this
protocol instead of on the agent module, because the agent imports them to start them: a
dependency on the agent would be an import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from edge_agent.alarms.wiring import AlarmRules
    from edge_agent.config.site import AgentConfig
    from edge_agent.field.poller import DevicePoller
    from edge_agent.field.stations import Hj212Station
    from edge_agent.field.transports import TransportPool
    from edge_agent.narrowband.fallback import NarrowbandFallback
    from edge_agent.outbox.store import Outbox
    from edge_agent.terminals.service import TerminalService
    from edge_agent.uplink.link import Uplink


class RuntimeView(Protocol):
    """The running agent as its observers see it; each part is None until it is started."""

    @property
    def config(self) -> AgentConfig: ...

    @property
    def uplink(self) -> Uplink | None: ...

    @property
    def pool(self) -> TransportPool | None: ...

    @property
    def outbox(self) -> Outbox | None: ...

    @property
    def alarms(self) -> AlarmRules | None: ...

    @property
    def narrowband(self) -> NarrowbandFallback | None: ...

    @property
    def terminals(self) -> TerminalService | None: ...

    @property
    def disk(self) -> dict[str, Any] | None:
        """The outbox's last `disk_status()`, with unsaved alarms."""
        ...

    @property
    def restarts(self) -> dict[str, int]:
        """Restarts of each supervised task, by task name."""
        ...

    @property
    def devices(self) -> list[DevicePoller | Hj212Station]:
        """Every running device, pollers first, in config order within each."""
        ...

    def status(self) -> dict[str, Any]:
        """The snapshot for `edge-agent status`."""
        ...
