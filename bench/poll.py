"""The edge agent's polling rate and CPU cost: 20 simulated Modbus devices x 50 points.

The simulators run in a separate process; this process runs the agent's real pieces,
`DevicePoller` into a real SQLite `Outbox`, polling every device back-to-back as fast as it
can for `--seconds`. CPU is this process's CPU time (the agent side only).

- `--transport tcp` (default): one pymodbus TCP server per device on loopback, one
  `ModbusTcpTransport` each.
- `--transport rtu`: one RTU bus simulator on a pseudo-terminal with `--devices` slaves at
  115200 baud (answers paced at the wire speed), all devices sharing one `SerialBus` that
  takes turns between them: the line, not the CPU, sets the rate.

    python bench/poll.py [--transport tcp|rtu] [--devices 20] [--points 50] [--seconds 10]

Prints one JSON line: points_per_s, cpu_s_per_1000_points, points_per_cpu_s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)
from _common import emit

from device_profiles import parse_profile


def bench_profile(points: int) -> str:
    """A 50-point device: f32 input registers, u16 holding registers, and the counter."""
    lines = ["id: bench-device-v1", "model: bench", "name_zh: 基准设备", "protocol: modbus", "points:"]
    lines += ["  - {key: counter, name: counter, name_zh: 计数, function: 4, address: 0, type: u32, sim: {kind: counter}}"]
    n_f32 = (points - 1) * 4 // 5
    for i in range(n_f32):
        lines.append(f"  - {{key: f{i}, name: f{i}, name_zh: 值{i}, unit: m, function: 4, address: {2 + 2 * i}, "
                     f"type: f32, sim: {{kind: wave, min: 0, max: 100, period_s: 60}}}}")
    for i in range(points - 1 - n_f32):
        lines.append(f"  - {{key: h{i}, name: h{i}, name_zh: 寄存器{i}, function: 3, address: {i}, type: u16, "
                     f"scale: 0.1, sim: {{kind: random_walk, min: 0, max: 500, step: 1, start: 100}}}}")
    return "\n".join(lines) + "\n"


async def serve_simulators(profile_text: str, count: int) -> None:
    """Child mode: run `count` simulators, print their ports as one JSON line, wait for EOF."""
    from firmware_stubs.modbus_sim import ModbusTcpSimulator

    profile = parse_profile(profile_text, source="bench")
    sims = [ModbusTcpSimulator(profile, seed=i) for i in range(count)]
    for s in sims:
        await s.start()
    print("PORTS " + json.dumps([s.port for s in sims]), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for s in sims:
        await s.stop()


RTU_BAUDRATE = 115200


async def serve_rtu_simulator(profile_text: str, count: int) -> None:
    """Child mode: `count` RTU slaves on one pty; print its path as one line, wait for EOF."""
    from firmware_stubs.rtu_sim import RtuBusSimulator

    profile = parse_profile(profile_text, source="bench")
    async with RtuBusSimulator([profile] * count, baudrate=RTU_BAUDRATE) as sim:
        print("PATH " + json.dumps(sim.path), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def poll_fast(ports: list[int], profile_text: str, seconds: float, workdir: Path,
                    *, rtu_path: str | None = None) -> tuple[int, float, float]:
    from edge_agent.config.site import DeviceConfig
    from edge_agent.field.poller import DevicePoller
    from edge_agent.field.transports import ModbusTcpTransport, ModbusTransport, TransportPool
    from edge_agent.outbox.store import Outbox
    from runtime.logs import configure_logging

    configure_logging("edge-agent", level="warning")  # stdout carries only the JSON line
    profile = parse_profile(profile_text, source="bench")
    pool = TransportPool()
    async with Outbox.open(workdir / "outbox.db") as outbox:
        pollers = []
        for i, port in enumerate(ports):
            transport: ModbusTransport
            if rtu_path is None:
                spec: dict[str, object] = {"kind": "tcp", "host": "127.0.0.1", "port": port}
            else:
                spec = {"kind": "rtu", "port": rtu_path, "baudrate": RTU_BAUDRATE}
            dev = DeviceConfig.model_validate({"id": f"dev-{i}", "profile": profile.id,
                                               "transport": spec, "device_id": port if rtu_path else 1,
                                               "poll_interval_s": 1.0, "timeout_s": 2.0, "slow_every": 1})
            if rtu_path is None:
                transport = ModbusTcpTransport("127.0.0.1", port, timeout_s=2.0)
            else:
                transport = pool.get(dev.transport, timeout_s=2.0)
            pollers.append(DevicePoller(dev, profile, transport, outbox))
        for p in pollers:  # connect and warm up outside the timed window
            await p.poll_once()
        deadline = time.monotonic() + seconds
        counts = [0] * len(pollers)

        async def loop(i: int, p: DevicePoller) -> None:
            while time.monotonic() < deadline:
                r = await p.poll_once()
                counts[i] += r.records

        cpu0, t0 = time.process_time(), time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for i, p in enumerate(pollers):
                tg.create_task(loop(i, p), name=f"poll[dev-{i}]")
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        for p in pollers:
            await p.transport.close()
        await pool.close()
    return sum(counts), elapsed, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--points", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--transport", choices=["tcp", "rtu"], default="tcp",
                    help="tcp: one simulator per device; rtu: all devices on one pty bus at 115200 baud")
    ap.add_argument("--serve-simulators", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--serve-rtu-simulator", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    text = bench_profile(args.points)
    if args.serve_simulators:
        asyncio.run(serve_simulators(text, args.serve_simulators))
        return
    if args.serve_rtu_simulator:
        asyncio.run(serve_rtu_simulator(text, args.serve_rtu_simulator))
        return
    rtu = args.transport == "rtu"
    serve = "--serve-rtu-simulator" if rtu else "--serve-simulators"
    child = subprocess.Popen([sys.executable, __file__, "--points", str(args.points),
                              serve, str(args.devices)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = ""
        ready = "PATH " if rtu else "PORTS "
        while not line.startswith(ready):  # the simulators may log before they are ready
            line = child.stdout.readline()
            if not line:
                raise SystemExit("simulator process exited before it was ready")
        if rtu:  # slave addresses stand in for ports: 1..devices on the one line
            rtu_path: str | None = json.loads(line.removeprefix(ready))
            ports = list(range(1, args.devices + 1))
        else:
            rtu_path, ports = None, json.loads(line.removeprefix(ready))
        with tempfile.TemporaryDirectory(prefix="fieldlink-poll-") as tmp:
            points, elapsed, cpu = asyncio.run(poll_fast(ports, text, args.seconds, Path(tmp),
                                                         rtu_path=rtu_path))
    finally:
        if child.stdin:
            child.stdin.close()
        child.wait(timeout=10)
    emit(bench="poll", transport=args.transport, devices=args.devices, points_per_device=args.points,
         seconds=round(elapsed, 2), points=points, points_per_s=round(points / elapsed),
         cpu_s_per_1000_points=round(1000 * cpu / points, 4), points_per_cpu_s=round(points / cpu),
         simulator_cpu_note="simulators run in a separate process and are not counted")


if __name__ == "__main__":
    main()
