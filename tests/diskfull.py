"""A really small file system for full-disk tests: a tmpfs the test mounts (root only) and
unmounts in teardown, and a filler that plays "another process filled the disk"."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

_CHUNK = 16 * 1024


@contextlib.contextmanager
def small_fs(where: Path, size_bytes: int) -> Iterator[Path]:
    """Mount a tmpfs of `size_bytes` at `where` for the block; skip the test where mounting is
    impossible (not root, or no mount permission in this container)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (the full-disk tests run as root in CI)")
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs",
                           str(where)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield where
    finally:
        # Lazy: a child that the test could not stop must not leave the mount behind.
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(filler: Path, *, leave: int = 0) -> int:
    """Grow `filler` until the file system has at most `leave` bytes free (0: until ENOSPC);
    returns the bytes it added."""
    added = 0
    with filler.open("ab", buffering=0) as f:  # unbuffered: nothing left to flush at close
        while True:
            room = free_bytes(filler.parent) - leave
            if leave and room <= 0:
                break
            n = _CHUNK if not leave else max(1, min(_CHUNK, room))
            try:
                added += f.write(b"\xff" * n) or 0
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    return added


__all__ = ["fill", "free_bytes", "small_fs"]
