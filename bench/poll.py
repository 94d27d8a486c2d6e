"""The edge agent's polling rate and CPU cost: 20 simulated Modbus devices x 50 points.

The simulators run in a separate process; this process runs the agent's real pieces,
`DevicePoller` into a real SQLite `Outbox`, polling every device back-to-back as fast as it
can for `--seconds`. CPU is this process's CPU time (the agent side only).

- `--transport tcp` (default): one pymodbus TCP server per device on loopback, one
  `ModbusTcpTransport` each.
- `--transport rtu`: one RTU bus simulator on a pseudo-terminal with `--devices` slaves at
  115200 baud (answers paced at the wire speed), all devices sharing one `SerialBus` that
  takes turns between them: the line, not the CPU, sets the rate.

Then (TCP only, unless `--steady-seconds 0`) the agent's steady state: the real daemon
(`python -m edge_agent run`) polls the same simulators at 1 Hz through a private Mosquitto to a
real central (both other processes, not counted); after `--warmup-seconds` this process samples
the AGENT process's /proc/<pid>/status every second for `--steady-seconds`. The agent runs with
the `Environment=` settings of the systemd unit (packaging/fieldlink-edge.service, e.g. its
malloc arena limit), as on a gateway; `--agent-env` adds or overrides one.

    python bench/poll.py [--transport tcp|rtu] [--devices 20] [--points 50] [--seconds 10]
                         [--steady-seconds 60] [--warmup-seconds 20] [--agent-env KEY=VALUE]

Prints one JSON line: points_per_s, cpu_s_per_1000_points, points_per_cpu_s (the fast poll,
in this process), and for the agent daemon at 1 Hz: rss_mb (its largest VmRSS in the steady
window), rss_peak_mb (VmHWM, its high-water mark since start), agent_points_per_s and
agent_cpu_s_per_1000_points (its CPU over the steady window per record it stored).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)
from _common import emit, proc_cpu_s

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


def status_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a live process in MB (10^6 bytes), from /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024 / 1e6
    return out


def agent_config(work: Path, ports: list[int], profile_text: str, broker_port: int) -> Path:
    """A gateway config: one TCP device per simulator port, polled at 1 Hz, and central's
    command key pinned as on every enrolled gateway (its parsing loads `cryptography`, so a
    gateway without one would not be a fair measure of memory)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from protocols.command_keys import public_key_b64

    key = public_key_b64(Ed25519PrivateKey.generate().public_key())
    (work / "profiles").mkdir()
    (work / "profiles" / "bench-device-v1.yaml").write_text(profile_text)
    data = work / "gw-poll"
    data.mkdir()
    lines = ["[gateway]", 'id = "gw-poll"', f'data_dir = "{data}"', "",
             "[profiles]", f'dirs = ["{work / "profiles"}"]', "",
             "[mqtt]", 'host = "127.0.0.1"', f"port = {broker_port}", "",
             "[commands]", f'central_public_key = "{key}"', ""]
    for i, port in enumerate(ports):
        lines += ["[[devices]]", f'id = "dev-{i}"', 'profile = "bench-device-v1"',
                  f'transport = {{ kind = "tcp", host = "127.0.0.1", port = {port} }}',
                  "device_id = 1", "poll_interval_s = 1.0", ""]
    config = data / "site.toml"
    config.write_text("\n".join(lines))
    return config


UNIT = Path(__file__).resolve().parent.parent / "packaging" / "fieldlink-edge.service"


def unit_environment(unit: Path = UNIT) -> dict[str, str]:
    """The `Environment=` settings of the agent's systemd unit (`KEY=VALUE`, quoted or not)."""
    lines = unit.read_text().splitlines()
    values = (line.removeprefix("Environment=") for line in lines if line.startswith("Environment="))
    return dict(pair.split("=", 1) for value in values for pair in shlex.split(value))


def agent_steady_state(ports: list[int], profile_text: str, warmup_s: float, seconds: float,
                       env: dict[str, str]) -> dict[str, object]:
    """Run the agent daemon at 1 Hz against the simulators; its RSS and CPU in steady state."""
    from edge_agent.outbox.status import read_status
    from tests.fleet import Central
    from tests.helpers import Mosquitto, python_env

    with tempfile.TemporaryDirectory(prefix="fieldlink-poll-agent-") as tmp:
        work = Path(tmp)
        (work / "broker").mkdir()
        broker = Mosquitto(work / "broker")
        broker.start()
        central = Central(work, broker.port)
        config = agent_config(work, ports, profile_text, broker.port)
        agent: subprocess.Popen[bytes] | None = None
        try:
            central.start()
            with (work / "agent.log").open("wb") as log:
                agent = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                                         env=python_env() | env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
            time.sleep(warmup_s)
            if agent.poll() is not None:
                raise SystemExit("the agent exited during warm-up:\n" + (work / "agent.log").read_text()[-3000:])
            outbox = config.parent / "outbox.db"
            seq0, cpu0, t0 = read_status(outbox).last_seq, proc_cpu_s(agent.pid), time.monotonic()
            rss: list[float] = []
            while time.monotonic() - t0 < seconds:
                time.sleep(1.0)
                rss.append(status_mb(agent.pid)["VmRSS"])
            cpu, elapsed = proc_cpu_s(agent.pid) - cpu0, time.monotonic() - t0
            points, final = read_status(outbox).last_seq - seq0, status_mb(agent.pid)
            backlog = read_status(outbox).backlog
        finally:
            if agent is not None:
                agent.terminate()
                agent.wait(timeout=20)
            central.stop()
            broker.stop()
    return {"rss_mb": round(max(rss), 1), "rss_steady_min_mb": round(min(rss), 1),
            "rss_peak_mb": round(final["VmHWM"], 1), "agent_seconds": round(elapsed, 1),
            "agent_points_per_s": round(points / elapsed),
            "agent_cpu_s_per_1000_points": round(1000 * cpu / max(1, points), 4),
            "agent_backlog_at_end": backlog, "agent_env": env}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--points", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--transport", choices=["tcp", "rtu"], default="tcp",
                    help="tcp: one simulator per device; rtu: all devices on one pty bus at 115200 baud")
    ap.add_argument("--steady-seconds", type=float, default=60.0,
                    help="the agent daemon's measured steady state at 1 Hz (tcp only; 0: skip)")
    ap.add_argument("--warmup-seconds", type=float, default=20.0,
                    help="run the agent this long before the steady window starts")
    ap.add_argument("--agent-env", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra environment variable for the agent daemon (to compare settings)")
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
        steady: dict[str, object] = {}
        if not rtu and args.steady_seconds > 0:
            env = unit_environment() | dict(kv.split("=", 1) for kv in args.agent_env)
            steady = agent_steady_state(ports, text, args.warmup_seconds, args.steady_seconds, env)
    finally:
        if child.stdin:
            child.stdin.close()
        child.wait(timeout=10)
    emit(bench="poll", transport=args.transport, devices=args.devices, points_per_device=args.points,
         seconds=round(elapsed, 2), points=points, points_per_s=round(points / elapsed),
         cpu_s_per_1000_points=round(1000 * cpu / points, 4), points_per_cpu_s=round(points / cpu),
         **steady, simulator_cpu_note="simulators run in a separate process and are not counted")


if __name__ == "__main__":
    main()
