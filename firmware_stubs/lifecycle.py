"""What every simulator shares as an object: `async with sim:` runs its `start()` and `stop()`;
one on a pty also says which path the agent should open (`link_path`)."""

from __future__ import annotations

from pathlib import Path
from typing import Self


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


class PtyLinked(StartStop):
    """A simulator on a pty: `path` once started, and an optional stable `_symlink` to it."""

    path: str
    _symlink: Path | None

    @property
    def link_path(self) -> str:
        """What the agent opens: the symlink if one was asked for, else the pty's path."""
        return str(self._symlink) if self._symlink is not None else self.path


__all__ = ["PtyLinked", "StartStop"]
