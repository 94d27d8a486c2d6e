"""The demo's child processes: their environment, their ready files, and a bounded stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path


def child_env() -> dict[str, str]:
    """This environment, with the repository on PYTHONPATH and unbuffered output."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def wait_file(path: Path, proc: asyncio.subprocess.Process, timeout: float = 20.0) -> str:
    """The text a child writes to `path` once it is ready; RuntimeError if it exits first."""
    async with asyncio.timeout(timeout):
        while not (path.exists() and path.read_text().strip()):
            if proc.returncode is not None:
                raise RuntimeError(f"child exited with {proc.returncode} before it was ready")
            await asyncio.sleep(0.05)
    return path.read_text().strip()


@contextlib.asynccontextmanager
async def ready_child(module: str, args: Sequence[str], root: Path,
                      name: str) -> AsyncIterator[asyncio.Task[str]]:
    """`python -m module --ready-file root/name.json *args`, its stderr in `root/name.log`:
    yields a task that ends with what it wrote to the ready file (so the caller can start
    other things meanwhile); stopped (bounded) on exit."""
    root.mkdir(parents=True, exist_ok=True)
    ready = root / f"{name}.json"
    ready.unlink(missing_ok=True)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, "--ready-file", str(ready), *args, env=child_env(),
        stdout=asyncio.subprocess.DEVNULL, stderr=(root / f"{name}.log").open("ab"))
    waiting = asyncio.ensure_future(wait_file(ready, proc))
    try:
        yield waiting
    finally:
        waiting.cancel()
        if waiting.done() and not waiting.cancelled():
            waiting.exception()  # retrieved: the caller saw it, or is leaving for another error
        await stop_children([proc])


async def stop_children(procs: list[asyncio.subprocess.Process], grace_s: float = 5.0) -> None:
    """SIGTERM to every child, one shared `grace_s` for all of them, then SIGKILL the rest:
    the stop is bounded by `grace_s` however many children there are."""
    for p in procs:
        if p.returncode is None:
            p.send_signal(signal.SIGTERM)
    waits = [asyncio.ensure_future(p.wait()) for p in procs]
    if waits:
        await asyncio.wait(waits, timeout=grace_s)
    for p in procs:
        if p.returncode is None:
            p.kill()
    await asyncio.gather(*waits, return_exceptions=True)
