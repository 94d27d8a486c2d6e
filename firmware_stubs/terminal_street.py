"""`python -m firmware_stubs.terminal_street`: the demo street's 叫应 terminals, one child process.

Each terminal is a `firmware_stubs.terminal_sim.TcpTerminalSimulator` on a free loopback port
(the gateway connects to it, as to a terminal on the street's network) with a scripted person
who presses the button some seconds after each warning, or never. Once every terminal listens
it writes `{"ID": port, ...}` to `--ready-file` (atomically) and prints `READY terminals=...`;
it serves until SIGTERM or SIGINT and exits 0, or 1 with `error: ...`.

    python -m firmware_stubs.terminal_street --terminal JY-1:3 --terminal JY-2:never \
        --ready-file t.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from firmware_stubs import sim_process
from firmware_stubs.errors import SimulatorError
from firmware_stubs.terminal_sim import TcpTerminalSimulator
from protocols.terminal import TerminalError


def _terminal(text: str) -> tuple[str, float | None]:
    tid, _, after = text.partition(":")
    if not tid or not after:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ID:SECONDS or ID:never")
    if after == "never":
        return tid, None
    try:
        return tid, float(after)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ID:SECONDS or ID:never") from None


@contextlib.asynccontextmanager
async def street(terminals: Sequence[tuple[str, float | None]],
                 heartbeat_s: float) -> AsyncIterator[dict[str, int]]:
    """The terminals, started and stopped together; yields terminal id → port."""
    async with contextlib.AsyncExitStack() as stack:
        sims = [await stack.enter_async_context(
            TcpTerminalSimulator(tid, press_after_s=after, heartbeat_s=heartbeat_s))
            for tid, after in terminals]
        yield {sim.terminal_id: sim.port for sim in sims}


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m firmware_stubs.terminal_street",
        description="The demo street's 叫应 terminals (FLT/1 on loopback TCP), one process.",
        epilog="example: python -m firmware_stubs.terminal_street --terminal JY-1:3 "
               "--terminal JY-2:never --ready-file /tmp/terminals.json")
    parser.add_argument("--terminal", type=_terminal, action="append", required=True,
                        metavar="ID:SECONDS|ID:never",
                        help="a terminal, and when its person presses after each warning")
    parser.add_argument("--heartbeat", type=float, default=30.0, help="seconds")
    parser.add_argument("--ready-file", type=Path, default=None,
                        help="once listening, write {id: port} as JSON to this file")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    def announce(ports: dict[str, int]) -> str:
        if args.ready_file is not None:
            sim_process.write_atomic(args.ready_file, json.dumps(ports) + "\n")
        listed = ",".join(f"{tid}:{port}" for tid, port in ports.items())
        return sim_process.ready_line(f"terminals={listed}", None)

    await sim_process.serve_until_signal(street(args.terminal, args.heartbeat), announce)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: serve until SIGTERM/SIGINT; exit 0, or 1 on bad settings."""
    return sim_process.run(_serve(_parse_args(argv)), (SimulatorError, TerminalError, OSError))


if __name__ == "__main__":
    sys.exit(main())
