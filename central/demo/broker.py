"""An embedded MQTT broker (amqtt) for the one-command demo (DESIGN.md §3).

Production and the tests use Mosquitto; this exists so that `central demo` needs nothing
installed. amqtt keeps no queue for anonymous offline sessions, which the uplink contract
tolerates: the edge re-sends whatever central has not acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog
from amqtt.broker import Broker

log = structlog.get_logger(__name__)


class ExpectedShutdownFilter(logging.Filter):
    """Drops amqtt's "Broadcast loop stopped by exception" when the exception is the
    cancellation of its broadcast task at shutdown (amqtt 0.12 logs every BaseException there
    with a traceback at ERROR); any other exception still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, asyncio.CancelledError)
                    and str(record.msg).startswith("Broadcast loop stopped"))


_QUIET = ExpectedShutdownFilter()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int


@asynccontextmanager
async def embedded_broker(host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[BrokerAddress]:
    """Run an amqtt broker on `host:port` (a free port when 0) for the life of the context."""
    port = port or free_port(host)
    logging.getLogger("amqtt.broker").addFilter(_QUIET)  # the same object: added once
    broker = Broker({
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    })
    await broker.start()
    log.info("broker_started", host=host, port=port, kind="amqtt")
    try:
        yield BrokerAddress(host, port)
    finally:
        await broker.shutdown()
        log.info("broker_stopped")
