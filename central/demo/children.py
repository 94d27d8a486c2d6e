"""The demo's child processes: how they start (each in a session of its own, on a leash that
ends it with the demo: `central.demo.leash`), their ready files, and a bounded stop.

Own sessions: a terminal sends Ctrl-C to its whole foreground process group at once, and the
children used to be in it; the BeiDou simulator then exited while central and a gateway still
read its ptys, and both logged a lost port during an orderly stop. Now Ctrl-C reaches only the
demo, which stops its children in the reverse order of their start (a child is started after
what it uses), each step bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

LEASH = "central.demo.leash"
GRACE_S = 5.0  # how long a child may take to stop after SIGTERM before it is killed


def child_env() -> dict[str, str]:
    """This environment, with the repository on PYTHONPATH and unbuffered output."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Children:
    """Starts the demo's child processes and counts how they ended (for the stop's summary)."""

    def __init__(self) -> None:
        self.env = child_env()
        self.started = 0
        self.killed = 0

    async def spawn(self, module: str, args: Sequence[str], log_path: Path,
                    env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
        """`python -m module *args` in a session of its own and on the demo's leash; its
        stdout and stderr appended to `log_path`."""
        with log_path.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", LEASH, str(os.getpid()), module, *args,
                env=self.env | (env or {}), stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        self.started += 1
        return proc

    async def stop(self, procs: Sequence[asyncio.subprocess.Process],
                   grace_s: float = GRACE_S) -> None:
        """SIGTERM to each of `procs` together, one shared `grace_s` for all of them, then
        SIGKILL to the process group of each that is left: bounded by `grace_s` however many
        there are."""
        for p in procs:
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        waits = [asyncio.ensure_future(p.wait()) for p in procs]
        if waits:
            await asyncio.wait(waits, timeout=grace_s)
        for p in procs:
            if p.returncode is None:  # not reaped yet, so its pid is still its group's id
                log.warning("demo_child_killed", pid=p.pid, grace_s=grace_s)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                self.killed += 1
        await asyncio.gather(*waits, return_exceptions=True)


async def wait_file(path: Path, proc: asyncio.subprocess.Process, timeout: float = 20.0) -> str:
    """The text a child writes to `path` once it is ready; RuntimeError if it exits first."""
    async with asyncio.timeout(timeout):
        while not (path.exists() and path.read_text().strip()):
            if proc.returncode is not None:
                raise RuntimeError(f"child exited with {proc.returncode} before it was ready")
            await asyncio.sleep(0.05)
    return path.read_text().strip()


@contextlib.asynccontextmanager
async def ready_child(children: Children, module: str, args: Sequence[str], root: Path,
                      name: str) -> AsyncIterator[asyncio.Task[str]]:
    """`python -m module --ready-file root/name.json *args`, its output in `root/name.log`:
    yields a task that ends with what it wrote to the ready file (so the caller can start
    other things meanwhile); stopped (bounded) on exit."""
    root.mkdir(parents=True, exist_ok=True)
    ready = root / f"{name}.json"
    ready.unlink(missing_ok=True)
    proc = await children.spawn(module, ["--ready-file", str(ready), *args], root / f"{name}.log")
    waiting = asyncio.ensure_future(wait_file(ready, proc))
    try:
        yield waiting
    finally:
        waiting.cancel()
        if waiting.done() and not waiting.cancelled():
            waiting.exception()  # retrieved: the caller saw it, or is leaving for another error
        await children.stop([proc])
