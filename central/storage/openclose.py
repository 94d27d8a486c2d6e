"""The open/close life shared by central's stores: the storage backends and the side
stores."""

from __future__ import annotations

import abc
from types import TracebackType
from typing import Self


class OpenClose(abc.ABC):
    """A store used as an async context manager: `open()` on entry, `close()` on exit."""

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
