"""Opaque paging cursors of the API (the alarm list, a point's series).

A cursor is the sort key of the last row a page returned, so the next page starts right after
that row whatever was inserted meanwhile (an offset would shift). It travels as base64url of
a small JSON array `[kind, *key]`; the kind stops a series cursor being fed to the alarm list.
A cursor the server did not make is refused with a 422 problem (`CursorError`), never bound to
SQL unchecked.

    token = encode_cursor("alarms", (0, 2, 1796601600000, 17))
    decode_cursor("alarms", token, (int, int, int, int))  # -> (0, 2, 1796601600000, 17)
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from typing import Final

from central import CentralError
from protocols.limits import INT64_MAX

MAX_CURSOR_CHARS: Final = 512
_MAX_TEXT: Final = 200


class CursorError(CentralError):
    """A `cursor` parameter this server did not hand out (422)."""

    def __init__(self, kind: str, token: str) -> None:
        super().__init__(f"cursor={token[:64]!r}: not a {kind} cursor from a previous page's"
                         " `next`")
        self.kind = kind
        self.token = token


def encode_cursor(kind: str, key: Sequence[int | str]) -> str:
    raw = json.dumps([kind, *key], separators=(",", ":"), ensure_ascii=False)
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _fits(value: object, want: type) -> bool:
    if want is int:  # bool is an int to Python, not to us
        return type(value) is int and -INT64_MAX <= value <= INT64_MAX
    return isinstance(value, str) and len(value) <= _MAX_TEXT


def decode_cursor(kind: str, token: str, shape: tuple[type, ...]) -> tuple[int | str, ...]:
    """The key in `token`, checked against `kind` and the types in `shape`; raises
    `CursorError` for anything else."""
    if len(token) > MAX_CURSOR_CHARS:
        raise CursorError(kind, token)
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError):  # UnicodeDecodeError and JSONDecodeError included
        raise CursorError(kind, token) from None
    if (not isinstance(data, list) or len(data) != len(shape) + 1 or data[0] != kind
            or not all(_fits(v, t) for v, t in zip(data[1:], shape, strict=True))):
        raise CursorError(kind, token)
    return tuple(data[1:])
