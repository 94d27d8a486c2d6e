"""Backlog drain after an outage, end to end, with live data flowing at the same time.

Fills a gateway's outbox with `--records` telemetry records while its uplink is cut (the
agent's link runs through a loopback proxy in drop mode; the agent keeps polling live
devices), then restores the link and times until central has committed every record and the
edge has marked them delivered. Live points polled during the drain must not wait behind
history (DESIGN.md §4.2): their latency is central's receive time minus their device time.

    python bench/drain.py --records 1000000

Prints one JSON line: drain_points_per_s, live_latency_p99_s, live_latency_p50_s,
first_record_after_restore_s (from the link's return to the first record central committed,
by central's receive time), wire_bytes_per_point (MQTT payload bytes of the backlog batches the
agent published, resends included, over the backlog records it published),
agent_cpu_us_per_point and central_cpu_us_per_point (each process's CPU time from the restore
to the drain's end over the records drained: on a busy box, where the rate says little, they
tell which side limits the drain), ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)
from _common import emit, proc_cpu_s

from edge_agent.uplink.mqtt_config import MqttConfig
from tests.fleet import Agent, Central, DeviceDef, Simulator, sqlite_rows
from tests.helpers import Mosquitto, wait_for
from tests.netproxy import LinkProxy

GW = "gw-drain-01"
RECONNECT_MAX_S = MqttConfig().reconnect_max_s
DEVICES = [DeviceDef("gas-1", "gas-detector-v1", 1), DeviceDef("tank-1", "storage-tank-v1", 2)]


async def prefill(outbox_path: Path, records: int, hours: float = 72.0) -> None:
    """History as a cut-off gateway would have written it: 100 points, oldest first."""
    from edge_agent.outbox.store import NewRecord, Outbox
    from protocols.envelope import RecordKind

    now_ms = int(time.time() * 1000)
    step_ms = max(1, int(hours * 3600_000 / records))
    start_ms = now_ms - records * step_ms
    async with Outbox.open(outbox_path) as ob:
        chunk = 20_000
        for base in range(0, records, chunk):
            n = min(chunk, records - base)
            await ob.append([NewRecord(kind=RecordKind.TELEMETRY, ts_ms=start_ms + (base + i) * step_ms,
                                       point=f"hist-{(base + i) % 100 // 10}/p{(base + i) % 10}",
                                       value=float((base + i) % 1000)) for i in range(n)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds of drain")
    ap.add_argument("--max-inflight", type=int, default=16, help="the agent's [mqtt] max_inflight")
    ap.add_argument("--backlog-batch-size", type=int, default=5000,
                    help="the agent's [mqtt] backlog_batch_size")
    ap.add_argument("--reconnect-max", type=float, default=RECONNECT_MAX_S,
                    help="the agent's [mqtt] reconnect_max_s (default: the shipped one). The "
                         "drain counts from the restore, so it includes how soon the agent "
                         "notices; a cut link is retried within reconnect_link_max_s whatever "
                         "this is, so the bench runs what a real gateway's config has")
    ap.add_argument("--ceiling", type=float, default=1_000_000.0,
                    help="the agent's [outbox] backlog_max_points_per_s (the drain's rate ceiling)")
    ap.add_argument("--queue-delay", type=float, default=None,
                    help="the agent's [outbox] backlog_queue_delay_s (the pacer's RTT allowance)")
    ap.add_argument("--logs", type=Path, help="copy the children's logs into this folder")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="fieldlink-drain-") as tmp:
        work = Path(tmp)
        (work / "broker").mkdir()
        broker = Mosquitto(work / "broker")
        broker.start()
        proxy = LinkProxy("127.0.0.1", broker.port)
        proxy.start()
        proxy.set_mode("drop")
        central = Central(work, broker.port)
        sim = Simulator(work, [d.profile for d in DEVICES])
        try:
            central.start()
            sim.start()
            agent = Agent(work, GW, proxy.port, sim.port, DEVICES, poll_interval_s=1.0, ack_timeout_s=10,
                          mqtt_extra=f"keepalive_s = 10\nmax_inflight = {args.max_inflight}\n"
                                     f"backlog_batch_size = {args.backlog_batch_size}\n"
                                     f"reconnect_max_s = {args.reconnect_max}",
                          extra=f"\n[outbox]\nbacklog_max_points_per_s = {args.ceiling}\n"
                                + ("" if args.queue_delay is None
                                   else f"backlog_queue_delay_s = {args.queue_delay}\n"))
            t_fill = time.perf_counter()
            asyncio.run(prefill(agent.outbox, args.records))
            fill_s = time.perf_counter() - t_fill
            print(f"prefilled {args.records} records in {fill_s:.1f}s", file=sys.stderr, flush=True)
            agent.start()
            from edge_agent.outbox.store import read_status

            # Up and failing to connect (the link is cut) before the clock starts: the agent's
            # start-up (imports, ~2-7 s on a busy box) is not part of the drain.
            wait_for(lambda: read_status(agent.outbox).meta.get("uplink_state") == "disconnected",
                     timeout=60, interval=0.2, what="the agent to find its link cut")
            time.sleep(3)  # live polling into the outbox while the link is still cut
            restore_wall_ms = int(time.time() * 1000)
            pids = [c.proc.pid for c in (agent, central) if c.proc is not None]
            cpu0 = [proc_cpu_s(pid) for pid in pids]
            t0 = time.perf_counter()
            proxy.set_mode("pass")

            last_report = [0.0]

            def drained() -> bool:
                st = read_status(agent.outbox)
                if time.monotonic() - last_report[0] > 5:  # progress on stderr
                    last_report[0] = time.monotonic()
                    print(f"backlog {st.backlog} pacing {st.meta.get('uplink_pacing')}",
                          file=sys.stderr, flush=True)
                return st.backlog == 0

            wait_for(drained, timeout=args.timeout, interval=0.5, what="the backlog to drain")
            drain_s = time.perf_counter() - t0
            cpu_s = [proc_cpu_s(pid) - c0 for pid, c0 in zip(pids, cpu0, strict=True)]
            first_ms = sqlite_rows(central.db_path, "SELECT min(received_ms) FROM readings"
                                   " WHERE gw = ? AND received_ms >= ?", (GW, restore_wall_ms))[0][0]
            # The agent writes its wire counters with its state (every 10 s): wait for the
            # ones that cover the whole drain.
            wire: dict = {}
            last_seq = read_status(agent.outbox).last_seq

            def counted() -> bool:
                wire.update(json.loads(read_status(agent.outbox).meta.get("uplink_wire") or "{}"))
                return wire.get("records_sent", 0) >= last_seq

            wait_for(counted, timeout=30, interval=0.5, what="the agent's wire counters")
            status = read_status(agent.outbox)
            # live latency counts from when the agent was back online (its reconnect back-off
            # after the cut is not queueing behind history)
            since = int(status.meta.get("uplink_since_ms") or restore_wall_ms)
            held = sqlite_rows(central.db_path, "SELECT (SELECT count(*) FROM readings WHERE gw = ?)"
                               " + (SELECT count(*) FROM events WHERE gw = ?)", (GW, GW))[0][0]
            live = sorted((r[0] - r[1]) / 1000 for r in sqlite_rows(
                central.db_path, "SELECT received_ms, ts_ms FROM readings r JOIN points p ON p.id = r.point_id "
                "WHERE r.gw = ? AND p.device NOT LIKE 'hist-%' AND r.ts_ms >= ?", (GW, max(since, restore_wall_ms))))
            agent.stop()
        finally:
            for child in (sim, central):
                child.stop()
            proxy.stop()
            broker.stop()
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                for log in work.rglob("*.log"):
                    shutil.copy(log, args.logs / log.name)

    def pct(xs: list[float], q: float) -> float:
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else float("nan")

    emit(bench="drain", records=args.records, ceiling_points_per_s=args.ceiling, delivered_at_central=held, last_seq=status.last_seq,
         prefill_points_per_s=round(args.records / fill_s), drain_s=round(drain_s, 1),
         drain_points_per_s=round(status.last_seq / drain_s),
         drain_points_per_s_after_reconnect=round(status.last_seq / max(0.001, drain_s - max(0, since - restore_wall_ms) / 1000)),
         max_inflight=args.max_inflight, backlog_batch_size=args.backlog_batch_size,
         reconnect_max_s=args.reconnect_max, live_points=len(live),
         live_latency_p50_s=pct(live, 0.5), live_latency_p99_s=pct(live, 0.99),
         first_record_after_restore_s=round((first_ms - restore_wall_ms) / 1000, 3),
         wire_bytes_per_point=round(wire["backlog_bytes_sent"] / wire["backlog_records_sent"], 2),
         agent_cpu_us_per_point=round(cpu_s[0] * 1e6 / status.last_seq, 2),
         central_cpu_us_per_point=round(cpu_s[1] * 1e6 / status.last_seq, 2),
         reconnect_after_restore_s=round(max(0, since - restore_wall_ms) / 1000, 1))


if __name__ == "__main__":
    main()
