"""叫应 terminal simulator: a warning loudspeaker with a display and a button, speaking FLT/1.

A terminal (codec `protocols.terminal`, specification docs/terminal-protocol.md) on loopback
TCP (`TcpTerminalSimulator`: it listens, the gateway connects; a new connection replaces the
old) or on a pseudo-terminal (`PtyTerminalSimulator`: the gateway opens `.link_path` like
`/dev/ttyUSB2`). Either way it behaves as the page says:

- a HEARTBEAT when a connection opens (on a pty: at start), every `heartbeat_s`, and at once
  when its state changes (mains, faults, tamper, camera);
- a PLAY is answered by a RECEIPT and "played" (`.played`), a DISPLAY by a RECEIPT
  (`.displayed`); a repeated frame (same seq and type) gets the same answer and nothing else;
  a frame it cannot take gets an ERROR (UNKNOWN_TYPE, MALFORMED, UNSUPPORTED_VERSION);
- the scripted person presses the button `press_after_s` after each PLAY is delivered (None:
  never), or when told (`press()`); the ACK is kept and repeated every `ack_retry_s` (and on
  every new connection) until the gateway's RECEIPT names it (`.acks_confirmed`).

Faults (`TerminalFaults`): `no_power` (dead: reads nothing, sends nothing; when power returns
it sends a heartbeat and repeats its unconfirmed ACKs), `speaker_fault` (in every heartbeat,
and a PLAY gets ERROR SPEAKER_FAULT instead of a receipt; nobody hears it, nobody presses),
`silent` (no RECEIPTs: the warning plays, the person may still press), `garbage` (that many
random bytes go out before the next frame), and the state a heartbeat reports: `mains`,
`battery`, `tamper`, `camera` (a video terminal, `video=True`, reports OK by default).

Scripting: `set_faults()` / `inject()`, `set_person()`, `press()`, `stats()`, and a JSON-lines
control port (`control_port=0` picks one) taking `{"fault": {"speaker_fault": true}}`,
`{"person": {"press_after_s": null}}`, `{"press": {"warning_id": 1001}}`,
`{"state": {}}` (what was played, displayed, acknowledged) and `{"stats": {}}`; `{}` pings.

As a process: ``python -m firmware_stubs.terminal_sim --terminal-id JY-0001 --tcp --port 0``
prints `READY port=N`; with `--pty --link-file F` it prints `READY path=/dev/pts/N`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from firmware_stubs import sim_process
from firmware_stubs.errors import SimulatorError
from firmware_stubs.lifecycle import PtyLinked
from firmware_stubs.pty_line import PtyLine
from firmware_stubs.terminal_device import Played, TerminalFaults, TerminalSimulator
from protocols.terminal import TerminalDecoder, TerminalError


class TcpTerminalSimulator(TerminalSimulator):
    """A terminal that listens on `host:port` (0: a free port, in `.port` once started)."""

    def __init__(self, terminal_id: str, *, host: str = "127.0.0.1", port: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(terminal_id, **kwargs)
        self.host, self.port = host, port
        self._server: asyncio.Server | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _open(self) -> None:
        self._server = await asyncio.start_server(self._client, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def _write(self, data: bytes) -> bool:
        if self._writer is None or self._writer.is_closing():
            return False
        self._writer.write(data)
        return True

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._writer is not None:
            self._writer.close()  # §2: a new connection replaces the old one
        self._writer = writer
        self._decoder = TerminalDecoder()
        self._connected()
        try:
            while data := await reader.read(4096):
                if writer is self._writer:
                    self._on_bytes(data)
        except ConnectionError:
            pass
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


class PtyTerminalSimulator(TerminalSimulator, PtyLinked):
    """A terminal on a serial line: the gateway opens `.link_path` (`symlink` if given)."""

    def __init__(self, terminal_id: str, *, symlink: str | Path | None = None,
                 **kwargs: Any) -> None:
        super().__init__(terminal_id, **kwargs)
        self._symlink = Path(symlink) if symlink is not None else None
        self._line: PtyLine | None = None
        self.path = ""

    async def _open(self) -> None:
        self._open_line()
        self._connected()  # §2: a serial terminal says who it is on power-up

    async def _close(self) -> None:
        self._close_line()

    def _write(self, data: bytes) -> bool:
        return self._line is not None and self._line.write(data)

    def _on_readable(self) -> None:
        if data := self._read_line():
            self._on_bytes(data)


# --- process entry --------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = sim_process.simulator_parser(
        "terminal_sim", "Simulate a 叫应 warning terminal (FLT/1) on loopback TCP or on a pty.",
        "--terminal-id JY-0001 --tcp --port 0 --press-after 5 --control-port 0")
    parser.add_argument("--terminal-id", required=True, help="printable ASCII, up to 32")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--tcp", action="store_true", help="listen on --host:--port")
    where.add_argument("--pty", action="store_true", help="serve on a pseudo-terminal")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--video", action="store_true", help="a video terminal (camera)")
    parser.add_argument("--heartbeat", type=float, default=30.0, help="seconds")
    parser.add_argument("--press-after", type=float, default=None,
                        help="the person presses this many seconds after a warning "
                        "(default: never)")
    parser.add_argument("--symlink", type=Path, default=None,
                        help="with --pty, also make this symlink to the pty")
    sim_process.add_pty_arguments(parser)
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    common: dict[str, Any] = {"video": args.video, "heartbeat_s": args.heartbeat,
                              "press_after_s": args.press_after, "seed": args.seed,
                              "control_port": args.control_port}
    if args.pty:
        await sim_process.serve_until_signal(
            PtyTerminalSimulator(args.terminal_id, symlink=args.symlink, **common),
            sim_process.announce_pty(args.link_file))
        return

    def announce(sim: TcpTerminalSimulator) -> str:
        return sim_process.ready_line(f"port={sim.port}", sim.control_port)

    await sim_process.serve_until_signal(
        TcpTerminalSimulator(args.terminal_id, host=args.host, port=args.port, **common),
        announce)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: serve until SIGTERM/SIGINT; exit 0, or 1 on a bad setting or port."""
    return sim_process.run(_serve(_parse_args(argv)), (SimulatorError, TerminalError, OSError))


__all__ = ["Played", "PtyTerminalSimulator", "TcpTerminalSimulator", "TerminalFaults",
           "TerminalSimulator", "main"]

if __name__ == "__main__":
    sys.exit(main())
