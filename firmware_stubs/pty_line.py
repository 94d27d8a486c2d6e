"""The line of a serial simulator: the master side of a raw pseudo-terminal pair.

The agent opens the slave side (`.path`, e.g. `/dev/pts/7`) like `/dev/ttyUSB0`. Raw mode on
the slave side sets the line discipline of the pair: no echo, no CR/LF translation, every byte
as it comes. The simulator keeps its own slave fd open so that reads and writes on the master
never fail with EIO while no agent has the port open (a real line just carries bytes away).
"""

from __future__ import annotations

import asyncio
import os
import tty
from collections.abc import Callable
from pathlib import Path


class PtyLine:
    """An open pty pair whose master is read by `on_readable` on `loop`; `close()` it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_readable: Callable[[], None], *,
                 symlink: Path | None = None) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self._loop = loop
        self.path = os.ttyname(slave)
        # A stable name for a config file (`/tmp/ttyBD0`), swapped in atomically; it goes
        # away with the line.
        self.symlink = symlink
        if symlink is not None:
            tmp = symlink.with_name(symlink.name + ".tmp")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(self.path)
            os.replace(tmp, symlink)
        loop.add_reader(master, on_readable)

    def read(self) -> bytes:
        """What the agent wrote since the last read; b"" for nothing (or a transient EIO)."""
        try:
            return os.read(self._master, 4096)
        except OSError:  # BlockingIOError, InterruptedError, EIO while no slave fd is open
            return b""

    def write(self, data: bytes) -> bool:
        """Send `data`; False when the pty buffer was full and bytes were lost (nobody reads
        the port: a real line loses them too). A line gone for good is not counted."""
        try:
            written = os.write(self._master, data)
        except (BlockingIOError, InterruptedError):
            written = 0
        except OSError:
            return True
        return written >= len(data)

    def close(self) -> None:
        self._loop.remove_reader(self._master)
        os.close(self._master)
        os.close(self._slave)
        if self.symlink is not None and self.symlink.is_symlink():
            self.symlink.unlink()


__all__ = ["PtyLine"]
