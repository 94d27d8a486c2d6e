"""Central as a service (DESIGN.md §10): uvicorn with systemd readiness and a bounded stop.

`central serve` and `central demo` both run the app through `CentralServer`:

- **Signals** are ours, not uvicorn's: SIGTERM or Ctrl-C sets `app.state.stopping` (the
  console's event streams end on it, so no open browser holds the stop) and asks uvicorn to
  shut down; a second Ctrl-C forces it. uvicorn's own signal capture is switched off because
  it re-raises the signal once `serve()` returns: for SIGINT a KeyboardInterrupt in the middle
  of the caller's clean-up (the demo's fleet and broker), and one Ctrl-C would then stop
  only the HTTP server while the rest was torn down by cancellation.
- **Bounded**: requests still running `GRACE_S` after the stop are cancelled.
- **systemd** (`Type=notify`, runtime.systemd): READY=1 once storage is open (the lifespan has
  finished) and MQTT ingest is subscribed, WATCHDOG=1 at half of WatchdogSec= while the event
  loop runs, STOPPING=1 when the stop begins.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

import structlog
import uvicorn

from runtime.systemd import SystemdNotifier, watchdog_loop

log = structlog.get_logger(__name__)
GRACE_S = 5  # how long requests may run on after a stop before they are cancelled
READY_POLL_S = 0.1


class CentralServer(uvicorn.Server):
    """uvicorn's server without its signal capture (`stop_on_signals` handles them)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def make_server(app: Any, host: str, port: int) -> CentralServer:
    """The HTTP server for `app`: no access log, the lifespan on, a bounded graceful stop."""
    return CentralServer(uvicorn.Config(app, host=host, port=port, log_config=None,
                                        access_log=False, lifespan="on",
                                        timeout_graceful_shutdown=GRACE_S))


def begin_stop(app: Any, server: uvicorn.Server, notifier: SystemdNotifier | None = None) -> None:
    """Start a clean stop (idempotent): streams end, uvicorn shuts down, systemd is told."""
    stopping: asyncio.Event = app.state.stopping
    if stopping.is_set():
        return
    stopping.set()
    server.should_exit = True
    if notifier is not None:
        notifier.notify("STOPPING=1")
    log.info("central_stopping")


def stop_for_signal(app: Any, server: uvicorn.Server, sig: signal.Signals, *, again: bool,
                    notifier: SystemdNotifier | None = None) -> None:
    """What a stop signal does to central's server: begin its clean stop, or, for a SIGINT
    that comes `again` (the user's second Ctrl-C), force it (open requests are dropped at
    once). The caller says what "again" means: `central serve` counts its own stop, the demo
    the first signal it got."""
    if again and sig == signal.SIGINT:
        server.force_exit = True
        log.warning("central_stop_forced")
    begin_stop(app, server, notifier)


@contextlib.contextmanager
def handling_signals(signals: Iterable[signal.Signals],
                     handler: Callable[[signal.Signals], None]) -> Iterator[None]:
    """While inside, each of `signals` calls `handler(sig)` on the running loop instead of its
    default action. Must be entered on the running loop, in the main thread; a signal the loop
    cannot take there keeps its default."""
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, handler, sig)
            handled.append(sig)
    try:
        yield
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


@contextlib.contextmanager
def stop_on_signals(app: Any, server: uvicorn.Server,
                    notifier: SystemdNotifier | None = None) -> Iterator[None]:
    """SIGTERM/SIGINT begin a clean stop; a second SIGINT forces it (`stop_for_signal`).
    Must be entered on the running loop, in the main thread."""
    app.state.stopping = getattr(app.state, "stopping", None) or asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        stop_for_signal(app, server, sig, again=app.state.stopping.is_set(), notifier=notifier)

    with handling_signals((signal.SIGTERM, signal.SIGINT), on_signal):
        yield


async def notify_when_ready(app: Any, server: uvicorn.Server, notifier: SystemdNotifier) -> None:
    """READY=1 once the server listens (storage is open then) and ingest is subscribed."""
    while not server.should_exit:
        ingest = getattr(app.state, "ingest", None)
        if server.started and ingest is not None and ingest.connected:
            notifier.notify("READY=1\nSTATUS=serving; MQTT ingest subscribed")
            log.info("central_ready")
            return
        await asyncio.sleep(READY_POLL_S)


async def run_service(app: Any, server: uvicorn.Server,
                      notifier: SystemdNotifier | None = None) -> None:
    """Serve until SIGTERM/SIGINT, telling systemd about readiness and liveness."""
    notifier = notifier or SystemdNotifier.from_env()
    helpers: list[asyncio.Task[None]] = []
    with stop_on_signals(app, server, notifier):
        if notifier.enabled:
            helpers.append(asyncio.create_task(notify_when_ready(app, server, notifier),
                                               name="systemd.ready"))
        if notifier.watchdog_interval_s is not None:
            helpers.append(asyncio.create_task(watchdog_loop(notifier),
                                               name="systemd.watchdog"))
        try:
            await server.serve()
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)


__all__ = ["GRACE_S", "CentralServer", "begin_stop", "handling_signals", "make_server",
           "notify_when_ready", "run_service", "stop_for_signal", "stop_on_signals"]
