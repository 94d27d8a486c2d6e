"""The outbox on its file system: what it owns there, the room left, and a ballast file.

What the outbox owns on disk is its main file, the `-wal` and `-shm` files beside it, and the
ballast (below). The disk budget (`outbox_budget.py`) measures *pages in use* against a limit
that this module works out from two sides:

- the configured `max_bytes`, less what the WAL and shared-memory files take now;
- the file system: the main file (its free pages can be reused) plus what `statvfs` says is
  free, less the *reserve* (`disk_reserve_bytes`), so that a disk that another process fills
  makes the outbox thin and drop telemetry long before SQLite meets ENOSPC.

**Ballast.** A file of `ballast_bytes` (`<outbox>-ballast`) is kept while the disk has room.
It is given back to the file system only when the outbox would otherwise lose what it holds
in memory on a full disk: when the daemon stops with alarm or event records still held
(`outbox_ring.py`), and when it starts on a disk too full to open SQLite's `-shm` and `-wal`
files (SQLite then fails with SQLITE_IOERR_SHMSIZE, as the agent did before). It is laid
again once the disk has the reserve and the ballast free, and at exit (as much of it as the
closed files gave back) so that the next start finds its room still there.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class DiskUsage:
    """One look at the outbox's files and its file system, in bytes."""

    main_bytes: int
    wal_bytes: int
    shm_bytes: int
    ballast_bytes: int
    fs_free_bytes: int  # available to this (unprivileged) process: f_bavail × f_frsize
    fs_total_bytes: int
    reserve_bytes: int

    @property
    def owned_bytes(self) -> int:
        """Everything the outbox holds on disk: main file, WAL, shared memory, ballast."""
        return self.main_bytes + self.wal_bytes + self.shm_bytes + self.ballast_bytes

    @property
    def short(self) -> bool:
        """Less free than the reserve: telemetry is being thinned or dropped to keep it."""
        return self.fs_free_bytes < self.reserve_bytes

    def to_jsonable(self) -> dict[str, Any]:
        return {"main_bytes": self.main_bytes, "wal_bytes": self.wal_bytes,
                "shm_bytes": self.shm_bytes, "ballast_bytes": self.ballast_bytes,
                "owned_bytes": self.owned_bytes, "fs_free_bytes": self.fs_free_bytes,
                "fs_total_bytes": self.fs_total_bytes, "reserve_bytes": self.reserve_bytes,
                "short": self.short}


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def owned_files(path: Path) -> tuple[Path, Path, Path, Path]:
    """Main file, WAL, shared memory, ballast."""
    return path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-ballast")


def disk_usage(path: Path, reserve_bytes: int) -> DiskUsage:
    """Sizes of the outbox's files and the free space of their file system (read-only, also
    for the CLI)."""
    main, wal, shm, ballast = (file_size(p) for p in owned_files(path))
    st = os.statvfs(path.parent if path.parent.exists() else Path("/"))
    return DiskUsage(main_bytes=main, wal_bytes=wal, shm_bytes=shm, ballast_bytes=ballast,
                     fs_free_bytes=st.f_bavail * st.f_frsize,
                     fs_total_bytes=st.f_blocks * st.f_frsize, reserve_bytes=reserve_bytes)


class DiskWatch:
    """The outbox's view of its file system, and the keeper of its ballast file."""

    def __init__(self, path: Path, *, reserve_bytes: int, ballast_bytes: int) -> None:
        self.path = Path(path)
        self.reserve_bytes = max(0, reserve_bytes)
        self.ballast_bytes = max(0, ballast_bytes)
        self.ballast = owned_files(self.path)[3]

    def usage(self) -> DiskUsage:
        return disk_usage(self.path, self.reserve_bytes)

    def tune_wal(self, conn: sqlite3.Connection) -> None:
        """Keep the WAL a small part of the reserve: checkpoint after at most a quarter of it,
        and cut the file back to that after each checkpoint."""
        if not self.reserve_bytes:
            return
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        cap = max(16, self.reserve_bytes // 4 // page)
        if pages <= 0 or pages > cap:
            conn.execute(f"PRAGMA wal_autocheckpoint = {int(cap)}")
        limit = conn.execute("PRAGMA journal_size_limit").fetchone()[0]
        if limit < 0 or limit > self.reserve_bytes // 4:
            conn.execute(f"PRAGMA journal_size_limit = {int(self.reserve_bytes // 4)}")

    def page_limit(self, max_bytes: int | None) -> int | None:
        """Bytes of SQLite pages in use that the budget allows now (None: no limit): the
        tighter of `max_bytes` less the WAL and `-shm` files, and the main file plus the file
        system's free space less the reserve."""
        u = self.usage()
        limits = [u.main_bytes + u.fs_free_bytes - self.reserve_bytes]
        if max_bytes is not None:
            limits.append(max_bytes - u.wal_bytes - u.shm_bytes)
        return max(0, min(limits))

    # --- ballast ------------------------------------------------------------------------------

    def lay_ballast(self, *, partial: bool = False) -> bool:
        """Write the ballast file if it is missing and the disk has the reserve and the ballast
        free; True if it is there afterwards. A failure leaves no partial file.

        `partial` (at exit, after the files were closed): take as much as is free, up to the
        ballast's size, so that the room the closed files gave back is still ours at the next
        start instead of another process's."""
        if not self.ballast_bytes:
            return False
        have = file_size(self.ballast)
        if have >= self.ballast_bytes or (partial and have):
            return True
        free = self.usage().fs_free_bytes
        size = self.ballast_bytes
        if partial:
            size = min(size, free - free % _CHUNK)
            if size < _CHUNK:
                return False
        elif free < self.reserve_bytes + self.ballast_bytes:
            return False
        tmp = self.ballast.with_name(self.ballast.name + ".tmp")
        try:
            with tmp.open("wb") as f:
                left = size
                block = b"\0" * _CHUNK
                while left > 0:  # written, not sparse: the blocks must really be taken
                    n = min(left, _CHUNK)
                    f.write(block[:n])
                    left -= n
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self.ballast)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno != errno.ENOSPC:
                log.warning("outbox_ballast_failed", error=str(exc))
            return False
        log.info("outbox_ballast_laid", path=str(self.ballast), bytes=size)
        return True

    def release_ballast(self, why: str) -> int:
        """Delete the ballast file; returns the bytes given back to the file system."""
        size = file_size(self.ballast)
        if not size:
            return 0
        try:
            self.ballast.unlink()
        except FileNotFoundError:
            return 0
        log.warning("outbox_ballast_released", reason=why, bytes=size)
        return size


__all__ = ["DiskUsage", "DiskWatch", "disk_usage", "file_size", "owned_files"]
