"""The demo's Ctrl-C and SIGTERM, for its whole life, and the line it prints when it has stopped.

The children run in sessions of their own (`central.demo.children`), so a terminal's Ctrl-C
reaches only the demo. The first SIGINT, SIGTERM or SIGHUP (its terminal window closed)
cancels the demo's main task, wherever it is: starting up or serving. Everything that had
started is on one exit stack, each thing entered after what it uses, so the stack stops them
in order: the scripted scenarios, then the gateways' edge agents, then their simulators,
central (its server was already told to stop when the signal came: the console's streams end,
`central.health.service.begin_stop`), the link relays, the BeiDou and 叫应 terminals and last
the broker. Nobody loses a port, a link or a
terminal while it still uses it. A second Ctrl-C forces central's server to stop at once, as in
`central serve`; the other steps are bounded anyway (`children.GRACE_S`).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import Any

import structlog
import uvicorn

from central.demo.children import GRACE_S, Children
from central.health.service import handling_signals, stop_for_signal

log = structlog.get_logger(__name__)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Shutdown:
    """What a stop signal does to the demo: cancel `main` (once) and stop central's server if
    it is there."""

    def __init__(self, main: asyncio.Task[Any]) -> None:
        self.main = main
        self.began: float | None = None  # time.monotonic() of the first signal
        self._central: tuple[Any, uvicorn.Server] | None = None

    def serving(self, app: Any, server: uvicorn.Server) -> None:
        """Central's server exists: a stop signal also begins its clean stop."""
        app.state.stopping = getattr(app.state, "stopping", None) or asyncio.Event()
        self._central = (app, server)

    @property
    def requested(self) -> bool:
        return self.began is not None

    def on_signal(self, sig: signal.Signals) -> None:
        first = self.began is None
        if first:
            self.began = time.monotonic()
            log.info("demo_stopping", signal=sig.name)
            self.main.cancel()
        if self._central is not None:
            app, server = self._central
            stop_for_signal(app, server, sig, again=not first)

    def signals(self) -> contextlib.AbstractContextManager[None]:
        """SIGINT, SIGTERM and SIGHUP (the terminal window closed) go to `on_signal` while
        inside (on the running loop, in the main thread)."""
        return handling_signals(STOP_SIGNALS, self.on_signal)

    def summary(self, children: Children) -> str:
        """One line for the user once everything has stopped."""
        took = "" if self.began is None else f" in {time.monotonic() - self.began:.1f} s"
        killed = (f"{children.killed} killed after {GRACE_S:g} s (see the log)"
                  if children.killed else "none killed")
        return (f"Fieldlink demo stopped{took} (演示已停止): {children.started} child processes "
                f"ended in order, {killed}.")
