"""sd_notify(3) for both daemons (systemd `Type=notify`), without libsystemd.

`SystemdNotifier.from_env()` reads `$NOTIFY_SOCKET` and `$WATCHDOG_USEC`; outside systemd
(no socket) every call is a no-op. Each daemon sends `READY=1` once it really serves (the
edge: every task started; central: storage open and MQTT subscribed), `STOPPING=1` when it
begins to stop, and runs `watchdog_loop` as a task when the unit has `WatchdogSec=`: a wedged
event loop stops the pings, and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger(__name__)


class SystemdNotifier:
    """sd_notify(3) over `$NOTIFY_SOCKET`: one datagram per message."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SystemdNotifier:
        env = dict(os.environ) if env is None else env
        usec: int | None = None
        # WATCHDOG_PID, when set, names the process that must ping (not a forked child).
        pid = str(os.getpid())
        if env.get("WATCHDOG_USEC", "").isdigit() and env.get("WATCHDOG_PID", pid) == pid:
            usec = int(env["WATCHDOG_USEC"]) or None
        return cls(env.get("NOTIFY_SOCKET") or None, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Half of WatchdogSec= (systemd's advice), or None without a watchdog."""
        return self.watchdog_usec / 2 / 1_000_000 if self.watchdog_usec else None

    def notify(self, message: str) -> bool:
        if not self.address:
            return False
        # An address starting with "@" is in Linux's abstract namespace.
        addr = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(addr)
                sock.sendall(message.encode())
            return True
        except OSError as exc:
            log.warning("sd_notify_failed", error=str(exc))
            return False


async def watchdog_loop(notifier: SystemdNotifier) -> None:
    """Send WATCHDOG=1 at half of WatchdogSec= until cancelled (a task: `systemd.watchdog`).
    A wedged event loop stops this task too, which is exactly what the watchdog is for."""
    interval = notifier.watchdog_interval_s
    if interval is None:
        return
    while True:
        notifier.notify("WATCHDOG=1")
        await asyncio.sleep(interval)


__all__ = ["SystemdNotifier", "watchdog_loop"]
