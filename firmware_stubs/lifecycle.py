"""What every simulator shares as an object: `async with sim:` runs its `start()` and `stop()`;
one on a pty also owns its line from `start()` to `stop()` and says which path the agent should
open (`link_path`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

from firmware_stubs.errors import SimulatorError
from firmware_stubs.pty_line import PtyLine
from protocols.stream import ByteStream, NeedData, decoded

T = TypeVar("T")
E = TypeVar("E", bound=Exception)
K = TypeVar("K")
S = TypeVar("S")


class StartStop:
    """`async with` a simulator: `start()` on entry, `stop()` on exit."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel each of `tasks` (None: a task never started) and wait until it has ended."""
    for task in tasks:
        if task is None:
            continue
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Directory(dict[K, S]):
    """Simulators by the address they answer to on a shared medium (a radio id on the air, a
    number on the network): one simulator an address at a time."""

    def __init__(self, taken: str) -> None:
        super().__init__()
        self._taken = taken  # the error for an address in use; {} stands for the address

    def add(self, address: K, sim: S) -> None:
        """Register `sim` at `address`; SimulatorError if another simulator holds it."""
        other = self.get(address)
        if other is not None and other is not sim:
            raise SimulatorError(self._taken.format(address))
        self[address] = sim

    def discard(self, address: K, sim: S) -> None:
        """Unregister `sim` from `address`, if it is the one there."""
        if self.get(address) is sim:
            del self[address]


class PtyLinked(StartStop):
    """A simulator on a pty: `path` once started, and an optional stable `_symlink` to it.

    `start()` calls `_open_line()`, `stop()` `_close_line()`; in between the line calls
    `_on_readable()` whenever the agent has written something, which reads it with
    `_read_line()` or, for a simulator that decodes what it reads, `_read_frames()`.
    """

    path: str
    _symlink: Path | None
    _line: PtyLine | None

    @property
    def link_path(self) -> str:
        """What the agent opens: the symlink if one was asked for, else the pty's path."""
        return str(self._symlink) if self._symlink is not None else self.path

    def _open_line(self) -> PtyLine:
        """Open the pty pair (and the symlink to it); `path` is its slave side from now on."""
        self._line = PtyLine(asyncio.get_running_loop(), self._on_readable,
                             symlink=self._symlink)
        self.path = self._line.path
        return self._line

    def _close_line(self) -> bool:
        """Close the pty pair and its symlink; False when none was open."""
        if self._line is None:
            return False
        self._line.close()
        self._line = None
        return True

    def _on_readable(self) -> None:
        raise NotImplementedError

    def _read_line(self) -> bytes:
        """What the agent wrote since the last read; b"" for nothing, or with no line open."""
        return self._line.read() if self._line is not None else b""

    def _read_frames(self, decoder: ByteStream,
                     next_item: Callable[[], T | Literal[NeedData.NEED_DATA]],
                     error: type[E]) -> Iterator[T | E]:
        """Feed what the agent wrote to `decoder` and yield each frame it now holds, or in its
        place the `error` it raised (`next_item` is the decoder's `next_frame`…)."""
        if data := self._read_line():
            decoder.feed(data)
            yield from decoded(next_item, error)


__all__ = ["Directory", "PtyLinked", "StartStop", "cancel_and_wait"]
