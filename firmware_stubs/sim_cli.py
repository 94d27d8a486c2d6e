"""Process entry point of the Modbus TCP simulator: `python -m firmware_stubs.modbus_sim ...`.

On start it prints one line `READY port=N` (plus ` control_port=M` with a control port) to
stdout and, if asked, writes each port alone on one line to a ready file (atomically, so a
reader that sees the file sees the whole number). It serves until SIGTERM or SIGINT and exits
0, or exits 1 with `error: ...` on stderr for a bad profile or a port it cannot bind.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from device_profiles import DeviceProfileError, find_profile
from firmware_stubs.errors import SimulatorError
from firmware_stubs.modbus_sim import ModbusTcpSimulator


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m firmware_stubs.modbus_sim",
        description="Simulate profiled Modbus TCP devices on loopback.",
        epilog="example: python -m firmware_stubs.modbus_sim --profile gas-detector-v1 "
        "--profile storage-tank-v1 --port 0 --control-port 0 --ready-file /tmp/sim.ready",
    )
    parser.add_argument("--profile", action="append", required=True,
                        help="profile id or YAML path; repeat for devices on consecutive ids")
    parser.add_argument("--profile-dir", action="append", default=[],
                        help="extra folder of profiles, searched before the built-in ones")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--device-id", type=int, default=1, help="id of the first device")
    parser.add_argument("--control-port", type=int, default=None,
                        help="JSON-lines control port on --host (0 picks a free port)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ready-file", type=Path, default=None,
                        help="once listening, write the Modbus port (one line) to this file")
    parser.add_argument("--control-ready-file", type=Path, default=None,
                        help="once listening, write the control port (one line) to this file")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    profiles = {
        args.device_id + i: find_profile(name, extra_dirs=args.profile_dir)
        for i, name in enumerate(args.profile)
    }
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with ModbusTcpSimulator(profiles, host=args.host, port=args.port, seed=args.seed,
                                  control_port=args.control_port) as sim:
        if args.control_ready_file is not None and sim.control_port is not None:
            _write_atomic(args.control_ready_file, f"{sim.control_port}\n")
        if args.ready_file is not None:
            _write_atomic(args.ready_file, f"{sim.port}\n")
        ready = f"READY port={sim.port}"
        if sim.control_port is not None:
            ready += f" control_port={sim.control_port}"
        print(ready, flush=True)
        await stop.wait()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers never see a half-written file


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: serve until SIGTERM/SIGINT; exit 0, or 1 on a bad profile/port."""
    args = _parse_args(argv)
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso"),
                    structlog.processors.JSONRenderer()],
    )
    try:
        asyncio.run(_serve(args))
    except (SimulatorError, DeviceProfileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
