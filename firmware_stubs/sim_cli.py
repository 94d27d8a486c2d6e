"""Process entry point of the Modbus TCP simulator: `python -m firmware_stubs.modbus_sim ...`.

On start it prints one line `READY port=N` (plus ` control_port=M` with a control port) to
stdout and, if asked, writes each port alone on one line to a ready file (atomically, so a
reader that sees the file sees the whole number). It serves until SIGTERM or SIGINT and exits
0, or exits 1 with `error: ...` on stderr for a bad profile or a port it cannot bind.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from device_profiles import DeviceProfileError, find_profile
from firmware_stubs import sim_process
from firmware_stubs.errors import SimulatorError
from firmware_stubs.modbus_sim import ModbusTcpSimulator


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = sim_process.simulator_parser(
        "modbus_sim", "Simulate profiled Modbus TCP devices on loopback.",
        "--profile gas-detector-v1 --profile storage-tank-v1 --port 0 --control-port 0 "
        "--ready-file /tmp/sim.ready")
    sim_process.add_profiles(parser, "devices on consecutive ids")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--device-id", type=int, default=1, help="id of the first device")
    sim_process.add_control_port(parser, where="--host")
    sim_process.add_seed(parser)
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

    def announce(sim: ModbusTcpSimulator) -> str:
        if args.control_ready_file is not None and sim.control_port is not None:
            sim_process.write_atomic(args.control_ready_file, f"{sim.control_port}\n")
        if args.ready_file is not None:
            sim_process.write_atomic(args.ready_file, f"{sim.port}\n")
        return sim_process.ready_line(f"port={sim.port}", sim.control_port)

    await sim_process.serve_until_signal(
        ModbusTcpSimulator(profiles, host=args.host, port=args.port, seed=args.seed,
                           control_port=args.control_port), announce)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: serve until SIGTERM/SIGINT; exit 0, or 1 on a bad profile/port."""
    args = _parse_args(argv)
    return sim_process.run(_serve(args), (SimulatorError, DeviceProfileError, OSError))


if __name__ == "__main__":
    sys.exit(main())
