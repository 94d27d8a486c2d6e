"""The MQTT client central's ingest and command dispatcher use: aiomqtt's, reading the
disconnection reason when it exits.

After an unexpected disconnection aiomqtt keeps the reason in a future that only its message
iterator or its next publish reads. A loop that is cancelled before either (shutdown while the
dispatcher sleeps, ingest stopping mid-write) would leave it unread, and asyncio would log
"Future exception was never retrieved". The loop's own error or the cancellation already says
what happened. (The edge has the same fix in `edge_agent.uplink`; central may not import it.)
"""

from __future__ import annotations

from typing import Any

import aiomqtt


class Client(aiomqtt.Client):
    async def __aexit__(self, *exc_info: Any) -> None:
        try:
            await super().__aexit__(*exc_info)
        finally:
            if self._disconnected.done() and not self._disconnected.cancelled():
                self._disconnected.exception()
