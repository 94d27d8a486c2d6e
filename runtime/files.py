"""Files written whole or not at all: a key, a certificate, a config that a crash half-way
must not leave truncated (central's CA, the edge's enrolment)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from protocols.errors import DetailedError


class FileError(DetailedError):
    """A file that cannot be read, parsed, loaded or written: `path` names it, `reason` says
    why. A package's error for its own files inherits from its own base and from this."""

    template = "{path}: {reason}"
    path: Path
    reason: str


def write_atomic(path: Path, data: bytes, mode: int, *, exclusive: bool = False) -> bool:
    """Write `data` to `path` with permission bits `mode`, through a temporary file in the same
    folder (created 0600, so a key is never readable by others, even for a moment), fsynced,
    then renamed into place. True when written; with `exclusive`, False when `path` already
    existed (it is kept)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)  # 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
