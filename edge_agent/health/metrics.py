"""The agent's Prometheus endpoint (prometheus_client), on localhost by default (`[metrics]`).

`metrics_loop` takes a snapshot of the agent on the event loop every `interval_s` (device
health, uplink counters, outbox stats, disk, narrowband) and hands it to `AgentCollector`,
which the HTTP server's thread turns into metric families at each scrape: the scrape never
touches the agent's objects or the SQLite thread, and a slow scrape never slows the loop.
Family names start with `fieldlink_edge_`; packaging/alerts-fieldlink.yml has rules on them.
An address that cannot be bound (the port in use) is `MetricsPortError`: the supervisor says
so in one WARNING line and retries with its back-off.
"""

from __future__ import annotations

import asyncio
import errno
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_agent import EdgeError
from edge_agent.bearers import Refusal
from edge_agent.control.server import device_health
from edge_agent.outbox.store import OutboxError, OutboxStats
from edge_agent.terminals.metrics import terminal_metrics
from protocols.errors import DetailedError
from runtime.metrics import counter, counter_by, gauge
from runtime.mqtt_refusal import Refusal as MqttRefusal
from runtime.sqlite import open_reader
from runtime.tasks import TaskUnavailableError

if TYPE_CHECKING:
    from edge_agent.health.view import RuntimeView

log = structlog.get_logger("edge_agent.health.metrics")


class MetricsPortError(EdgeError, TaskUnavailableError, DetailedError):
    """The endpoint's address cannot be bound: `reason` says why (another process has it)."""

    template = "metrics port {host}:{port} {reason}"
    host: str
    port: int
    reason: str

P = "fieldlink_edge"
# Device health counters exported as poll errors, by kind.
POLL_ERRORS = ("timeouts", "connect_errors", "exceptions", "framing_errors", "decode_errors")
UPLINK_COUNTERS = {
    "connects": "MQTT connections made.",
    "batches_sent": "Data messages published.",
    "records_sent": "Records published (first sends and resends).",
    "batches_resent": ("Batches whose ack timed out, or in flight when central came online, "
                       "and whose records went out again."),
    "acks": "Acks received from central.",
    "records_acked": "Records newly marked delivered by an ack.",
    "acks_refused": "Acks naming a seq this uplink never sent (forged or foreign).",
}
LANES = ("alarm", "event", "live", "backlog")
STORED_EVERY_S = 60.0  # how often the records in the outbox file are counted (a scan of an index)
DISK_GAUGES = ("fs_free_bytes", "fs_total_bytes", "reserve_bytes", "owned_bytes", "held")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a scrape reports, taken on the event loop."""

    gateway: str
    wall_s: float
    uplink_connected: bool
    uplink: Mapping[str, int]
    devices: tuple[Mapping[str, Any], ...]
    stats: OutboxStats | None
    disk: Mapping[str, Any] = field(default_factory=dict)
    narrowband: Mapping[str, Any] | None = None
    restarts: Mapping[str, int] = field(default_factory=dict)  # by supervised task
    maintenance_errors: int = 0  # the outbox's maintenance rounds refused by the disk
    terminals: Mapping[str, Any] | None = None  # 叫应 terminals (TerminalService.status())
    stored_records: int | None = None  # rows in the outbox file, delivered ones kept included
    # connect attempts a broker refused, by `runtime.mqtt_refusal.Refusal`, and that reached
    # no broker that answered (`MqttSession.refusals`, `path_failures`)
    uplink_refusals: Mapping[str, int] = field(default_factory=dict)
    uplink_path_failures: int = 0


class AgentCollector(Collector):
    """Turns the latest `Snapshot` into metric families (called from the HTTP thread)."""

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None

    def describe(self) -> list[Metric]:
        return []  # no collect() at registration: the first snapshot comes later

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot  # one reference read: the loop swaps whole snapshots
        if s is None:
            return
        yield from _devices(s)
        yield from _outbox(s)
        yield from _uplink(s)
        yield from _narrowband(s)
        yield from _disk_and_clock(s)
        yield from _tasks(s)
        if s.terminals is not None:
            yield from terminal_metrics(s.terminals)


def _devices(s: Snapshot) -> Iterator[Metric]:
    cycles = CounterMetricFamily(f"{P}_poll_cycles", "Poll cycles run, by device.",
                                 labels=["device"])
    ok = CounterMetricFamily(f"{P}_poll_cycles_ok", "Poll cycles that read every point, by device.",
                             labels=["device"])
    errors = CounterMetricFamily(f"{P}_poll_errors", "Poll failures by device and kind.",
                                 labels=["device", "kind"])
    up = GaugeMetricFamily(f"{P}_device_up", "1 while the device answers (state ok).",
                           labels=["device"])
    for d in s.devices:
        dev = str(d.get("device", "?"))
        cycles.add_metric([dev], float(d.get("cycles", 0)))
        ok.add_metric([dev], float(d.get("cycles_ok", 0)))
        for kind in POLL_ERRORS:
            errors.add_metric([dev, kind], float(d.get(kind, 0)))
        up.add_metric([dev], 1.0 if d.get("state") == "ok" else 0.0)
    yield from (cycles, ok, errors, up)


def _outbox(s: Snapshot) -> Iterator[Metric]:
    st = s.stats
    if st is None:
        return
    lanes = GaugeMetricFamily(f"{P}_outbox_records", "Unsent records in the outbox, by lane.",
                              labels=["lane"])
    for lane in LANES:
        lane_stats = st.lanes.get(lane)
        lanes.add_metric([lane], float(lane_stats.count if lane_stats else 0))
    yield lanes
    yield _lane_bytes(s, st)
    yield gauge(f"{P}_outbox_bytes", "Outbox file size: main file, WAL and shared memory.",
                st.db_bytes)
    yield gauge(f"{P}_outbox_used_bytes", "Outbox pages holding data (what the budget counts).",
                st.used_bytes)
    if st.max_bytes is not None:
        yield gauge(f"{P}_outbox_max_bytes", "The outbox's disk budget.", st.max_bytes)
    age = (max(0.0, s.wall_s - st.oldest_undelivered_ts_ms / 1000)
           if st.oldest_undelivered_ts_ms else 0.0)
    yield gauge(f"{P}_outbox_oldest_unsent_age_seconds", "Age of the oldest record central "
                "has not acknowledged (0 when none).", age)
    yield counter(f"{P}_outbox_delivered", "Records central acknowledged.",
                  float(st.delivered_total))


def _lane_bytes(s: Snapshot, st: OutboxStats) -> Metric:
    """Each lane's share of the outbox's used bytes: its unsent records times the mean stored
    size of a record (used bytes / records in the file). Records of one kind are alike in
    size, so this tracks the lane closely without reading every row at each scrape."""
    family = GaugeMetricFamily(f"{P}_outbox_lane_bytes", "Estimated bytes the unsent records "
                               "of each lane take in the outbox (records x mean stored record "
                               "size).", labels=["lane"])
    stored = max(s.stored_records or 0, st.backlog)
    per_record = st.used_bytes / stored if stored else 0.0
    for lane in LANES:
        lane_stats = st.lanes.get(lane)
        family.add_metric([lane], round((lane_stats.count if lane_stats else 0) * per_record))
    return family


def _uplink(s: Snapshot) -> Iterator[Metric]:
    yield gauge(f"{P}_uplink_connected", "1 while connected to the MQTT broker.",
                1.0 if s.uplink_connected else 0.0)
    for name, help_ in UPLINK_COUNTERS.items():
        yield counter(f"{P}_uplink_{name}", help_, float(s.uplink.get(name, 0)))
    # Every cause from 0: an alert on certificate refusals sees the series before the first.
    yield counter_by(f"{P}_uplink_connect_refusals", "Connect attempts the broker refused, by "
                     "cause (connack, certificate: revoked or untrusted, tls).", "cause",
                     {str(r): 0 for r in MqttRefusal} | dict(s.uplink_refusals))
    yield counter(f"{P}_uplink_connect_path_failures", "Connect attempts that reached no "
                  "broker that answered (refused, reset, closed before CONNACK, timed out).",
                  float(s.uplink_path_failures))


def _narrowband(s: Snapshot) -> Iterator[Metric]:
    """Always present: zeros on a gateway without a radio (`narrowband_configured` 0), and
    every refusal reason from 0, so alerting rules and rate() see each series from the start."""
    nb = s.narrowband or {}
    counters: Mapping[str, Any] = nb.get("counters") or {}
    yield gauge(f"{P}_narrowband_configured", "1 when the gateway has a BeiDou terminal or PDT "
                "radio ([narrowband]).", 1.0 if s.narrowband is not None else 0.0)
    yield gauge(f"{P}_narrowband_active",
                "1 while alarms go by BeiDou/PDT (IP down long enough).",
                1.0 if nb.get("active") else 0.0)
    sends = CounterMetricFamily(f"{P}_narrowband_sends", "Narrowband frames sent, by kind.",
                                labels=["kind"])
    sends.add_metric(["alarm"], float(counters.get("alarms_sent", 0)))
    sends.add_metric(["heartbeat"], float(counters.get("heartbeats_sent", 0)))
    yield sends
    refusals = {str(r): 0 for r in Refusal} | {str(k): v for k, v in
                                               (counters.get("refusals") or {}).items()}
    yield counter_by(f"{P}_narrowband_refusals", "Frames the terminal or radio refused, by "
                     "reason.", "reason", refusals)
    yield counter(f"{P}_narrowband_errors", "Narrowband send errors.",
                  float(counters.get("errors", 0)))


def _disk_and_clock(s: Snapshot) -> Iterator[Metric]:
    disk = GaugeMetricFamily(f"{P}_disk", "The outbox's file system and held records "
                             "(fs_free_bytes, fs_total_bytes, reserve_bytes, owned_bytes, held).",
                             labels=["field"])
    for key in DISK_GAUGES:
        value = s.disk.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            disk.add_metric([key], float(value))
    yield disk
    yield gauge(f"{P}_disk_full", "1 during a full-disk episode (records held in memory).",
                1.0 if s.disk.get("full") else 0.0)
    # Prometheus compares this with its own clock: a gateway whose time drifts shows at once.
    yield gauge(f"{P}_clock_unix_seconds",
                "The gateway's wall clock when the snapshot was taken.",
                s.wall_s)
    clock = s.stats.clock if s.stats is not None else {}
    yield gauge(f"{P}_clock_suspect", "1 while the outbox judges the wall clock implausible.",
                1.0 if clock.get("suspect") else 0.0)


def _tasks(s: Snapshot) -> Iterator[Metric]:
    yield counter_by(f"{P}_task_restarts", "Restarts of each supervised task (it crashed or "
                     "returned).", "task", s.restarts)
    yield counter(f"{P}_outbox_maintenance_errors", "Outbox maintenance rounds the disk "
                  "refused (an outage: the next round tries again).", float(s.maintenance_errors))


def count_stored(path: Path) -> int | None:
    """Records in the outbox file, delivered ones not yet pruned included (a read-only
    connection beside the agent's, as `edge-agent status` reads it); None when unreadable."""
    try:
        conn = open_reader(path, autocommit=True)
        if conn is None:
            return None
        try:
            return int(conn.execute("SELECT count(*) FROM records").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error as exc:
        log.warning("metrics_outbox_unreadable", error=str(exc))
        return None


async def take_snapshot(runtime: RuntimeView, stored_records: int | None = None) -> Snapshot:
    """The agent's state now, read on the event loop (the outbox through its own thread)."""
    stats: OutboxStats | None = None
    if runtime.outbox is not None:
        try:
            stats = await runtime.outbox.stats()
        except OutboxError as exc:
            log.warning("metrics_outbox_unreadable", error=str(exc))
    uplink = runtime.uplink
    counters = ({k: int(getattr(uplink.counters, k, 0)) for k in UPLINK_COUNTERS}
                if uplink is not None else {})
    return Snapshot(
        gateway=runtime.config.gateway.id, wall_s=time.time(),
        uplink_connected=bool(uplink and uplink.connected), uplink=counters,
        devices=tuple(device_health(d) for d in runtime.devices), stats=stats,
        disk=dict(runtime.disk or {}),
        narrowband=runtime.narrowband.status() if runtime.narrowband else None,
        restarts=dict(runtime.restarts),
        maintenance_errors=runtime.outbox.maintenance_errors if runtime.outbox else 0,
        terminals=runtime.terminals.status() if runtime.terminals else None,
        stored_records=stored_records,
        uplink_refusals=dict(uplink.session.refusals) if uplink is not None else {},
        uplink_path_failures=uplink.session.path_failures if uplink is not None else 0)


async def metrics_loop(runtime: RuntimeView, collector: AgentCollector, interval_s: float) -> None:
    """Refresh the collector's snapshot forever (a supervised task: `metrics`)."""
    stored: int | None = None
    counted = -STORED_EVERY_S
    while True:
        if runtime.outbox is not None and time.monotonic() - counted >= STORED_EVERY_S:
            stored = await asyncio.to_thread(count_stored, runtime.config.outbox_path)
            counted = time.monotonic()
        collector.snapshot = await take_snapshot(runtime, stored)
        await asyncio.sleep(interval_s)


@asynccontextmanager
async def metrics_server(host: str, port: int, collector: AgentCollector) -> AsyncIterator[int]:
    """Serve `collector` at http://host:port/metrics (prometheus_client's own server, in its
    thread) until the block ends; yields the bound port (port 0: a free one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        reason = "in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound: {exc.strerror}"
        raise MetricsPortError(host, port, reason) from exc
    bound = int(server.server_port)
    log.info("metrics_listening", host=host, port=bound)
    try:
        yield bound
    finally:
        await asyncio.to_thread(server.shutdown)
        server.server_close()
        thread.join(timeout=5)


async def serve_metrics(runtime: RuntimeView, collector: AgentCollector) -> None:
    """The `metrics.http` task: the endpoint from `[metrics]`, refreshed until cancelled."""
    cfg = runtime.config.metrics
    async with metrics_server(cfg.host, cfg.port, collector):
        await metrics_loop(runtime, collector, cfg.interval_s)


__all__ = ["AgentCollector", "MetricsPortError", "Snapshot", "metrics_loop", "metrics_server",
           "serve_metrics", "take_snapshot"]
