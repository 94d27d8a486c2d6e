"""What the h11-style stream decoders in `protocols` share: the NEED_DATA answer and the buffer.

A decoder is fed bytes as they come off a line (`feed()`) and asked for the next whole frame;
until there is one it answers `NEED_DATA`. Bytes it steps over (garbage before a start marker,
a bad frame's start) are dropped and counted in `discarded`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from typing import Final, Literal, TypeVar

T = TypeVar("T")
E = TypeVar("E", bound=Exception)


class NeedData(enum.Enum):
    """A decoder needs more bytes before it can say anything."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


class ByteStream:
    """The buffer behind a stream decoder; subclasses parse `self._buffer` and `_drop()`."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.discarded = 0

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def _drop(self, count: int) -> None:
        del self._buffer[:count]
        self.discarded += count


class FramedStream(ByteStream):
    """The buffer of a decoder whose frames open with a start marker and may be cut off: a bad
    frame is stepped over by one byte only (`_step_past_bad()`, counted in `errors`), since a
    real frame may start inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.errors = 0

    def skip_partial(self) -> bool:
        """Give up the partial frame the decoder waits on (the line went quiet): step past its
        start marker, counted as an error; the next call rescans the rest. False if nothing was
        buffered."""
        if not self._buffer:
            return False
        self._step_past_bad()
        return True

    def _step_past_bad(self) -> None:
        self.errors += 1
        self._drop(1)


def decoded(next_item: Callable[[], T | Literal[NeedData.NEED_DATA]],
            error: type[E]) -> Iterator[T | E]:
    """Ask `next_item` (a decoder's `next_frame`, `next_sentence`…) until it answers NEED_DATA:
    each frame in line order and, in the place of a bad one, the `error` it raised (the decoder
    has stepped past it, so asking again goes on). Every reader of a decoder loops so."""
    while True:
        try:
            item = next_item()
        except error as exc:
            yield exc
            continue
        if isinstance(item, NeedData):
            return
        yield item


__all__ = ["NEED_DATA", "ByteStream", "FramedStream", "NeedData", "decoded"]
