"""Process entry point of BeiDou terminals that reach each other:
`python -m firmware_stubs.beidou_cli`.

A satellite link cannot be a socket between two processes, so the terminals that talk to each
other (a gateway's and central's) run in this one process, linked by one `BeidouSky`; each is
a pty that the edge agent or central opens like `/dev/ttyUSB1`. On start it prints
`READY terminals=CARD:PATH,...` and, if asked, writes `{"CARD": "/dev/pts/N", ...}` to a ready
file (atomically). It serves until SIGTERM or SIGINT and exits 0, or 1 with `error: ...`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from firmware_stubs import sim_process
from firmware_stubs.beidou_sim import BeidouMode, BeidouSky, BeidouTerminalSimulator
from firmware_stubs.errors import SimulatorError


def _terminal(text: str) -> tuple[str, float]:
    card, _, interval = text.partition(":")
    try:
        return card, float(interval) if interval else 60.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected CARD or CARD:INTERVAL_S") from None


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = sim_process.simulator_parser(
        "beidou_cli", "Simulate BeiDou RDSS terminals on ptys, linked by one simulated sky.",
        "--terminal 0242407:0 --terminal 4238473:10 --ready-file /tmp/beidou.json")
    parser.add_argument("--terminal", type=_terminal, action="append", required=True,
                        metavar="CARD[:INTERVAL_S]",
                        help="a terminal's card id and its send interval (default 60 s)")
    parser.add_argument("--mode", choices=["bd3", "bd2"], default="bd3")
    parser.add_argument("--level", type=int, default=3, help="card level (capacity)")
    parser.add_argument("--ready-file", type=Path, default=None,
                        help="once open, write {card: pty path} as JSON to this file")
    return parser.parse_args(argv)


def _terminals(args: argparse.Namespace) -> sim_process.SimulatorGroup:
    """The terminals of one sky."""
    sky = BeidouSky()
    mode = BeidouMode.BD3 if args.mode == "bd3" else BeidouMode.BD2
    return sim_process.SimulatorGroup(
        (card, BeidouTerminalSimulator(mode=mode, card_id=card, level=args.level,
                                       interval_s=interval, sky=sky))
        for card, interval in args.terminal)


async def _serve(args: argparse.Namespace) -> None:
    await sim_process.serve_until_signal(
        _terminals(args), sim_process.announce_group("terminals", args.ready_file))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: serve until SIGTERM/SIGINT; exit 0, or 1 on bad settings."""
    return sim_process.run(_serve(_parse_args(argv)), (SimulatorError, OSError))


if __name__ == "__main__":
    sys.exit(main())
