"""An edge uplink for the tests: built as the agent builds it and run in a task for a block."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from edge_agent.outbox.store import Outbox
from edge_agent.uplink.link import Uplink
from edge_agent.uplink.mqtt_config import MqttConfig
from protocols.envelope import Birth
from tests.helpers import background


@contextlib.asynccontextmanager
async def running_uplink(gw: str, ob: Outbox, mqtt: MqttConfig, *,
                         boot_id: str = "b") -> AsyncIterator[Uplink]:
    """`gw`'s uplink on `ob`, connecting as `mqtt` says, running until the block ends (then
    cancelled and awaited); it may not have connected yet when the block starts."""
    up = Uplink(gw=gw, outbox=ob, mqtt=mqtt, boot_id=boot_id, version="0",
                birth=Birth(gw=gw, stream="", boot_id="", version=""))
    async with background(up.run(), "uplink.mqtt"):
        yield up
