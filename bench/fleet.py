"""A city's fleet against central: thousands of gateways on MQTT, sustained rate and ack lag.

Starts a private Mosquitto (`max_connections -1`, the file-descriptor limit raised to the hard
limit), `central serve` (one process, or `--workers N` processes subscribed through
`$share/central/...` on one PostgreSQL schema), and plays `--gateways` gateways with paho:
no thread per gateway, but one `selectors` loop per bench process (`--procs`, default 1)
driving every client's socket. Each gateway (`tests.fakegw.FakeGateway`) connects at a
ramped rate, publishes its retained state (offline Will) and its birth, then a data batch of
`--points-per-gateway` readings every `--interval` s under its own stream and seqs (envelope
version 2 once central announces it), waits for central's `down/ack` and resends what stays
unacknowledged for `--ack-timeout` s (doubled after each expiry up to 8x, as the edge's ledger
does), and everything in flight after a reconnect or when central comes back.

Timeline: connect ramp (`--connect-rate` per s) → settle (`--settle` s; central works off
the births and states) → the steady window (`--seconds`) → drain (up to `--drain` s, no new
batches, until what the window published is acked). Rate and lag are measured on the
window only: `points_per_s` counts points whose ack arrived inside the window; the lag of a
batch is from its first publish to its ack (resends included), over the batches first
published inside the window; a batch still unacked after the drain counts as infinite lag.

    python bench/fleet.py --gateways 2000 [--seconds 60] [--points-per-gateway 20]
        [--interval 5] [--backend sqlite|postgres] [--workers 1] [--procs 1]

Prints one JSON line: gateways, connected, points_per_s, lag_p50_s, lag_p99_s,
lag_max_by_slice_s (the longest lag of the batches sent in each 10 s of the window: a
periodic burst, such as a 30 s flush, shows there), central_cpu_ms_per_batch (central's CPU
in the window over the batches acked in it), and the limits (file descriptors, connect
errors, CPU of each part) that bound the result.
"""

from __future__ import annotations

import argparse
import heapq
import math
import multiprocessing as mp
import os
import random
import re
import resource
import selectors
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)
import paho.mqtt.client as mqtt
from _common import central_counters, emit, proc_cpu_s

from tests.fakegw import FakeGateway
from tests.fleet import Central
from tests.helpers import Mosquitto
from tests.pg import url_with_schema

RW = selectors.EVENT_READ | selectors.EVENT_WRITE
# central's counters read at the window's start and end
SLICE_S = 10  # lag_max_by_slice_s: a burst shows where in the window it was
COUNTERS = ("births_total", "records_duplicate_total", "commits_total", "batches_total")


def raise_nofile() -> tuple[int, int]:
    """Soft fd limit up to the hard one (children, Mosquitto included, inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


@dataclass(frozen=True)
class Plan:
    """What every bench process needs to know; times are CLOCK_MONOTONIC, shared by all."""

    host: str
    port: int
    points: int
    interval_s: float
    ack_timeout_s: float
    keepalive_s: int
    t0: float
    connect_rate: float
    window_start: float
    window_end: float
    hard_end: float


@dataclass
class SliceResult:
    lags: list[float] = field(default_factory=list)  # batches first sent in the window
    # the longest of those lags per `SLICE_S` of the window, by the slice they were sent in
    slice_max: dict[int, float] = field(default_factory=dict)
    unacked_in_window: int = 0
    points_acked_in_window: int = 0
    batches_acked_in_window: int = 0
    connected_at_window_end: int = 0
    min_connected_in_window: int = 0
    ever_connected: int = 0
    connect_errors: Counter[str] = field(default_factory=Counter)
    resends: int = 0
    disconnects: int = 0
    loop_lag_max_s: float = 0.0  # how late the loop ran its 1-s housekeeping: bench starved?


class SelectorFleet:
    """Many `FakeGateway`s on one selector: paho's external-event-loop callbacks register
    each client's socket; the loop calls `loop_read`/`loop_write`, and once a second
    `loop_misc` (keepalive), `resend_due` and reconnects."""

    def __init__(self, names: list[tuple[int, str]], plan: Plan) -> None:
        self.plan = plan
        self.sel = selectors.DefaultSelector()
        self.gws: list[FakeGateway] = []
        self.order: list[int] = []  # global index, for the connect ramp
        for index, name in names:
            g = FakeGateway(name, plan.host, plan.port, points=plan.points,
                            ack_timeout_s=plan.ack_timeout_s, keepalive_s=plan.keepalive_s)
            self._wire(g.client)
            self.gws.append(g)
            self.order.append(index)
        self.res = SliceResult(min_connected_in_window=len(self.gws))
        self.rng = random.Random(self.order[0] if self.order else 0)
        self.produce: list[tuple[float, int]] = []  # (due, gateway) heap
        self.retry_at: dict[int, float] = {}
        self.started: set[int] = set()  # connect() called once: later ones are reconnects
        self._done = False

    def _wire(self, c: mqtt.Client) -> None:
        sel = self.sel

        def opened(client: mqtt.Client, _u: object, sock: object) -> None:
            sel.register(sock, selectors.EVENT_READ, client)  # type: ignore[arg-type]

        def closed(_c: mqtt.Client, _u: object, sock: object) -> None:
            try:
                sel.unregister(sock)  # type: ignore[arg-type]
            except (KeyError, ValueError):
                pass

        def want_write(client: mqtt.Client, _u: object, sock: object) -> None:
            try:
                sel.modify(sock, RW, client)  # type: ignore[arg-type]
            except (KeyError, ValueError):
                pass

        def done_write(client: mqtt.Client, _u: object, sock: object) -> None:
            try:
                sel.modify(sock, selectors.EVENT_READ, client)  # type: ignore[arg-type]
            except (KeyError, ValueError):
                pass

        c.on_socket_open = opened
        c.on_socket_close = closed
        c.on_socket_register_write = want_write
        c.on_socket_unregister_write = done_write

    def run(self) -> SliceResult:
        p, res = self.plan, self.res
        connects = sorted((p.t0 + i / p.connect_rate, n) for n, i in enumerate(self.order))
        ci = 0
        next_misc = time.monotonic() + 1.0
        while not self._done:
            now = time.monotonic()
            due = min(next_misc, connects[ci][0] if ci < len(connects) else next_misc,
                      self.produce[0][0] if self.produce else next_misc)
            for key, mask in self.sel.select(max(0.0, min(due - now, 0.5))):
                client: mqtt.Client = key.data
                if mask & selectors.EVENT_READ:
                    client.loop_read()
                if mask & selectors.EVENT_WRITE:
                    client.loop_write()
            now = time.monotonic()
            while ci < len(connects) and connects[ci][0] <= now:
                n = connects[ci][1]
                ci += 1
                self._connect(n, now)
            while self.produce and self.produce[0][0] <= now:
                t, n = heapq.heappop(self.produce)
                if t < p.window_end:
                    self.gws[n].produce()
                    heapq.heappush(self.produce, (t + p.interval_s, n))
            if now >= next_misc:
                res.loop_lag_max_s = max(res.loop_lag_max_s, now - next_misc)
                next_misc = now + 1.0
                self._housekeeping(now)
        res.ever_connected = sum(1 for g in self.gws if g.counters.connects)
        return self._finish()

    def _connect(self, n: int, now: float) -> None:
        g = self.gws[n]
        try:
            if n in self.started:
                g.client.reconnect()
            else:
                g.connect()
        except OSError as exc:
            self.res.connect_errors[f"{type(exc).__name__}[{exc.errno}]"] += 1
            self.retry_at[n] = now + 2.0
            return
        self.retry_at.pop(n, None)
        if n not in self.started:
            self.started.add(n)
            # the first batch lands anywhere in the first interval: no lock-step
            heapq.heappush(self.produce, (now + 1.0 + self.rng.uniform(0, self.plan.interval_s), n))

    def _housekeeping(self, now: float) -> None:
        p, res = self.plan, self.res
        connected = 0
        window_inflight = 0
        for n, g in enumerate(self.gws):
            if n in self.retry_at:
                if now >= self.retry_at[n]:
                    self._connect(n, now)
                continue
            if n not in self.started:
                continue
            if g.client.socket() is None:  # dropped: reconnect, as paho's own loop would
                self.retry_at[n] = now + self.rng.uniform(0.5, 2.0)
                continue
            g.client.loop_misc()
            g.resend_due()
            connected += g.connected
            window_inflight += sum(1 for fl in g.inflight.values()
                                   if fl.first_sent >= p.window_start)
        if p.window_start <= now < p.window_end:
            res.min_connected_in_window = min(res.min_connected_in_window, connected)
            res.connected_at_window_end = connected
        # Done when the drain ends, or earlier once all the window published is acked.
        self._done = now >= p.hard_end or (now >= p.window_end and window_inflight == 0)

    def _finish(self) -> SliceResult:
        p, res = self.plan, self.res
        for g in self.gws:
            res.resends += g.counters.resends
            res.disconnects += g.counters.disconnects
            for first_sent, acked, n in g.counters.lags:
                if p.window_start <= acked < p.window_end:
                    res.points_acked_in_window += n
                    res.batches_acked_in_window += 1
                if p.window_start <= first_sent < p.window_end:
                    res.lags.append(acked - first_sent)
                    k = int((first_sent - p.window_start) // SLICE_S)
                    res.slice_max[k] = max(res.slice_max.get(k, 0.0), acked - first_sent)
            res.unacked_in_window += sum(1 for fl in g.inflight.values()
                                         if p.window_start <= fl.first_sent < p.window_end)
        for g in self.gws:
            if g.client.socket() is not None:
                g.client.disconnect()
        end = time.monotonic() + 2.0
        while self.sel.get_map() and time.monotonic() < end:
            for key, mask in self.sel.select(0.1):
                c: mqtt.Client = key.data
                if mask & selectors.EVENT_WRITE:
                    c.loop_write()
                if mask & selectors.EVENT_READ:
                    c.loop_read()
        return res


def run_slice(names: list[tuple[int, str]], plan: Plan, out: mp.Queue) -> None:
    raise_nofile()
    out.put(SelectorFleet(names, plan).run())


# --- measuring the other processes -----------------------------------------------------------


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += proc_cpu_s(pid)
        except (OSError, IndexError):
            pass
    return total


def postgres_pids() -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() == "postgres":
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def machine_busy() -> tuple[float, float]:
    """(busy jiffies, total jiffies) over all cores, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = f[3] + f[4]
    return float(sum(f) - idle), float(sum(f))


def nofile_of(pid: int) -> int | None:
    m = re.search(r"Max open files\s+(\d+)", Path(f"/proc/{pid}/limits").read_text())
    return int(m.group(1)) if m else None


def central_metrics(worker: Central, names: tuple[str, ...]) -> dict[str, int]:
    """Counters of one worker from one scrape (-1 each when it fails): the scrape costs
    central CPU inside the window, so it is made once per snapshot."""
    try:
        got = central_counters(worker, names, timeout=5)
    except OSError:
        got = {}
    return {name: int(got.get(name, -1)) for name in names}


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    v = sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]
    return None if v == float("inf") else round(v, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gateways", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the steady window")
    ap.add_argument("--points-per-gateway", type=int, default=20)
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between batches")
    ap.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--workers", type=int, default=1, help="central processes (postgres only "
                                                           "for more than one)")
    ap.add_argument("--procs", type=int, default=1, help="bench processes driving gateways")
    ap.add_argument("--ack-timeout", type=float, default=10.0, help="the edge's default")
    ap.add_argument("--keepalive", type=int, default=30, help="the edge's default")
    ap.add_argument("--connect-rate", type=float, default=200.0, help="new connections per s")
    ap.add_argument("--settle", type=float, default=None,
                    help="seconds between the last connect and the window (default 3 intervals)")
    ap.add_argument("--drain", type=float, default=30.0)
    ap.add_argument("--pg-url", default=os.environ.get(
        "FIELDLINK_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    args = ap.parse_args()
    if args.workers > 1 and args.backend != "postgres":
        ap.error("--workers > 1 needs --backend postgres (workers share one database)")
    nofile = raise_nofile()
    settle = args.settle if args.settle is not None else max(3 * args.interval, 10.0)

    with tempfile.TemporaryDirectory(prefix="fieldlink-fleet-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        db_url = None
        if args.backend == "postgres":
            import psycopg
            schema = f"fl_fleet_{os.getpid()}_{int(time.time())}"
            with psycopg.connect(args.pg_url, autocommit=True) as conn:
                conn.execute(f"CREATE SCHEMA {schema}")

            def drop() -> None:
                with psycopg.connect(args.pg_url, autocommit=True) as conn:
                    conn.execute(f"DROP SCHEMA {schema} CASCADE")
            stack.callback(drop)
            db_url = url_with_schema(args.pg_url, schema)
        broker = Mosquitto(work)
        with broker.conf.open("a") as f:
            f.write("max_connections -1\n")
        broker.start()
        stack.callback(broker.stop)
        shared = args.workers > 1
        workers = [Central(work, broker.port, db_url=db_url,
                           name=f"central-{i}" if shared else "central",
                           extra_args=["--shared", "--mqtt-client-id", f"central-{i}"]
                           if shared else [])
                   for i in range(args.workers)]
        for w in workers:
            w.start()
            stack.callback(w.stop)
        time.sleep(1.0)  # let central subscribe

        t0 = time.monotonic() + 1.0
        ramp = args.gateways / args.connect_rate
        w0 = t0 + ramp + settle
        w1 = w0 + args.seconds
        plan = Plan(host=broker.host, port=broker.port, points=args.points_per_gateway,
                    interval_s=args.interval, ack_timeout_s=args.ack_timeout,
                    keepalive_s=args.keepalive, t0=t0, connect_rate=args.connect_rate,
                    window_start=w0, window_end=w1, hard_end=w1 + args.drain)
        names = [(i, f"fleet-gw-{i:05d}") for i in range(args.gateways)]
        ctx = mp.get_context("fork")
        out: mp.Queue = ctx.Queue()
        procs = [ctx.Process(target=run_slice, args=(names[k::args.procs], plan, out),
                             name=f"fleet-slice-{k}") for k in range(args.procs)]
        for pr in procs:
            pr.start()

        def snapshot() -> dict[str, float]:
            assert broker.proc is not None
            scraped = [central_metrics(w, COUNTERS) for w in workers]
            busy, total = machine_busy()
            return {"broker": cpu_of([broker.proc.pid]),
                    "central": cpu_of([w.proc.pid for w in workers if w.proc]),
                    "bench": cpu_of([pr.pid for pr in procs if pr.pid]),
                    "postgres": cpu_of(postgres_pids()) if db_url else 0.0,
                    "busy": busy, "total": total,
                    **{k: sum(s[k] for s in scraped) for k in COUNTERS}}

        time.sleep(max(0.0, w0 - time.monotonic()))
        s0 = snapshot()
        time.sleep(max(0.0, w1 - time.monotonic()))
        s1 = snapshot()
        results: list[SliceResult] = [out.get(timeout=args.drain + 120) for _ in procs]
        for pr in procs:
            pr.join(timeout=10)
        assert broker.proc is not None
        broker_nofile = nofile_of(broker.proc.pid)

    window = w1 - w0
    ncpu = os.cpu_count() or 1
    pct = {k: round(100 * (s1[k] - s0[k]) / window) for k in ("broker", "central", "bench",
                                                             "postgres")}
    machine_pct = round(100 * ncpu * (s1["busy"] - s0["busy"]) / (s1["total"] - s0["total"]))
    lags = sorted([x for r in results for x in r.lags]
                  + [float("inf")] * sum(r.unacked_in_window for r in results))
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r.connect_errors)
    points = sum(r.points_acked_in_window for r in results)
    batches = sum(r.batches_acked_in_window for r in results)
    emit(bench="fleet", backend=args.backend, workers=args.workers, procs=args.procs,
         gateways=args.gateways,
         connected=sum(r.connected_at_window_end for r in results),
         connected_min=sum(r.min_connected_in_window for r in results),
         points_per_gateway=args.points_per_gateway, interval_s=args.interval,
         window_s=args.seconds,
         offered_points_per_s=round(args.gateways * args.points_per_gateway / args.interval),
         points_per_s=round(points / (w1 - w0)),
         batches_per_s=round(batches / (w1 - w0), 1),
         # CPU per batch: comparable between runs on a busy box, where the rate is not
         central_cpu_ms_per_batch=round(1000 * (s1["central"] - s0["central"]) / batches, 3)
         if batches else None,
         # batches per ingest write transaction: what one commit's cost is spread over
         central_batches_per_commit=round((s1["batches_total"] - s0["batches_total"])
                                          / (s1["commits_total"] - s0["commits_total"]), 1)
         if s1["commits_total"] > s0["commits_total"] else None,
         lag_p50_s=percentile(lags, 0.50), lag_p99_s=percentile(lags, 0.99),
         lag_max_s=percentile(lags, 1.0), batches_in_window=len(lags),
         lag_max_by_slice_s=[round(max(r.slice_max.get(k, 0.0) for r in results), 3)
                             for k in range(math.ceil(args.seconds / SLICE_S))],
         unacked_after_drain=sum(r.unacked_in_window for r in results),
         resends=sum(r.resends for r in results),
         disconnects=sum(r.disconnects for r in results),
         central_duplicates_in_window=s1["records_duplicate_total"] - s0["records_duplicate_total"],
         births_pending_at_window_start=args.gateways - s0["births_total"],
         limits={"bench_nofile": nofile[0], "broker_nofile": broker_nofile,
                 "broker_max_connections": -1, "connect_errors": dict(errors),
                 "bench_loop_late_max_s": round(max(r.loop_lag_max_s for r in results), 3),
                 "cpu_pct": {**pct, "machine": machine_pct, "machine_max": 100 * ncpu}})


if __name__ == "__main__":
    main()
