"""What the simulators share as processes: arguments, the READY line, ready files, signals.

Each simulator's `main()` builds its own parser (its flags differ) with the common arguments
from here, and hands `run()` a coroutine that serves with `serve_until_signal()`: that prints
the `READY ...` line once the simulator listens and returns on SIGTERM or SIGINT. `run()`
exits 0 then, or 1 with `error: ...` on stderr for one of the errors it is given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Iterable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar

import structlog

from firmware_stubs.lifecycle import PtyLinked

S = TypeVar("S")


def simulator_parser(module: str, description: str, example: str, *,
                     profiles: str | None = None) -> argparse.ArgumentParser:
    """The parser of `python -m firmware_stubs.<module>`; `example` (arguments) ends its help.
    With `profiles` (what each one is, e.g. "slaves on consecutive addresses") it takes a
    repeatable --profile and --profile-dir."""
    command = f"python -m firmware_stubs.{module}"
    parser = argparse.ArgumentParser(prog=command, description=description,
                                     epilog=f"example: {command} {example}")
    if profiles is not None:
        add_profiles(parser, profiles)
    return parser


def add_profiles(parser: argparse.ArgumentParser, members: str) -> None:
    """--profile, once for each of `members` (e.g. "slaves on consecutive addresses"), and
    --profile-dir."""
    parser.add_argument("--profile", action="append", required=True,
                        help=f"profile id or YAML path; repeat for {members}")
    add_profile_dir(parser)


def add_profile_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile-dir", action="append", default=[],
                        help="extra folder of profiles, searched before the built-in ones")


def add_seed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0)


def add_link_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--link-file", type=Path, default=None,
                        help="once serving, write the pty path (one line) to this file")


def add_control_port(parser: argparse.ArgumentParser, where: str = "127.0.0.1") -> None:
    parser.add_argument("--control-port", type=int, default=None,
                        help=f"JSON-lines control port on {where} (0 picks a free port)")


def add_pty_arguments(parser: argparse.ArgumentParser) -> None:
    """What a simulator on a pty takes besides its own settings: --seed, --link-file and
    --control-port."""
    add_seed(parser)
    add_link_file(parser)
    add_control_port(parser)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader sees the whole text or no file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers never see a half-written file


def ready_line(first: str, control_port: int | None) -> str:
    """`READY <first>`, plus ` control_port=N` when the simulator has a control port."""
    ready = f"READY {first}"
    if control_port is not None:
        ready += f" control_port={control_port}"
    return ready


class _OnPty(Protocol):
    @property
    def path(self) -> str: ...

    @property
    def control_port(self) -> int | None: ...


def announce_pty(link_file: Path | None) -> Callable[[_OnPty], str]:
    """A pty simulator's announcement: the pty path into `link_file` (one line), then
    `READY path=/dev/pts/N [control_port=M]`."""
    def announce(sim: _OnPty) -> str:
        if link_file is not None:
            write_atomic(link_file, sim.path + "\n")
        return ready_line(f"path={sim.path}", sim.control_port)
    return announce


class SimulatorGroup:
    """Pty simulators that reach each other inside one process (the terminals of one sky, the
    modules of one network), started and stopped together; each has a name (card, number)."""

    def __init__(self, members: Iterable[tuple[str, PtyLinked]]) -> None:
        self.members = list(members)
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Self:
        async with contextlib.AsyncExitStack() as stack:
            for _, sim in self.members:
                await stack.enter_async_context(sim)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    @property
    def paths(self) -> dict[str, str]:
        """Each member's name and its pty path."""
        return {name: sim.path for name, sim in self.members}


def announce_group(what: str, ready_file: Path | None) -> Callable[[SimulatorGroup], str]:
    """A group's announcement: `{name: pty path}` as JSON into `ready_file`, then
    `READY <what>=NAME:PATH,...`."""
    def announce(group: SimulatorGroup) -> str:
        if ready_file is not None:
            write_atomic(ready_file, json.dumps(group.paths) + "\n")
        members = ",".join(f"{name}:{path}" for name, path in group.paths.items())
        return ready_line(f"{what}={members}", None)
    return announce


async def serve_until_signal(simulator: AbstractAsyncContextManager[S],
                             announce: Callable[[S], str]) -> None:
    """Start `simulator`, print `announce(sim)` (which may write ready files), serve until
    SIGTERM or SIGINT, then stop it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with simulator as sim:
        print(announce(sim), flush=True)
        await stop.wait()


def run(serve: Coroutine[Any, Any, None], errors: tuple[type[BaseException], ...]) -> int:
    """Log JSON to stderr and run `serve`: 0 when it ends, 1 (and `error: ...`) on `errors`."""
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso"),
                    structlog.processors.JSONRenderer()],
    )
    try:
        asyncio.run(serve)
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


__all__ = ["SimulatorGroup", "add_control_port", "add_link_file", "add_profile_dir", "add_profiles",
           "add_pty_arguments", "add_seed", "announce_group", "announce_pty", "ready_line", "run",
           "serve_until_signal", "simulator_parser", "write_atomic"]
