"""Central's Prometheus metrics, exposed with prometheus_client (text format 0.0.4).

One `Metrics` object lives on `app.state`; the ingest loop, history and the narrowband
receiver count into its plain fields (all on the event loop thread, so ints are enough), and
`GET /metrics` renders them through a private `CollectorRegistry` (no global state): a
collector turns the fields into families at render time, and the batch-commit latency is a
prometheus_client `Histogram` in the same registry. The metric names are the ones the
hand-written text had, so dashboards and alerting rules (packaging/alerts-fieldlink.yml) keep
working; values now print as floats (`1.0`).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from central import CentralError
from central.storage.program import Program, Rows, Sql
from protocols.limits import Reason
from runtime.metrics import counter, counter_by, gauge

if TYPE_CHECKING:
    from central.storage import Storage

PREFIX = "fieldlink_central"
# Seconds for one ingest write transaction (a group of batches), fsync included.
WRITE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# (field, metric name, type, help) for the plain numbers.
SCALARS = (
    ("batches", "batches_total", "counter", "Data batches written and acknowledged."),
    ("commits", "commits_total", "counter", "Ingest write transactions committed."),
    ("records_inserted", "records_inserted_total", "counter", "Records newly stored (the "
     "ingest rate is its rate())."),
    ("records_duplicate", "records_duplicate_total", "counter", "Records received again and "
     "already held."),
    ("acks_published", "acks_published_total", "counter", "down/ack messages published."),
    ("acks_failed", "acks_failed_total", "counter", "down/ack publishes that failed (the "
     "gateway sends those records again)."),
    ("states", "states_total", "counter", "Gateway state messages stored."),
    ("births", "births_total", "counter", "Gateway birth messages stored."),
    ("write_failures", "write_failures_total", "counter", "Write transactions rolled back."),
    ("mqtt_connects", "mqtt_connects_total", "counter", "Successful MQTT connections."),
    ("mqtt_connected", "mqtt_connected", "gauge", "1 while connected to the broker."),
    ("records_clock_suspect", "records_clock_suspect_total", "counter", "Records stored with a "
     "time central judged implausible (future or before 2020)."),
    ("records_time_corrected", "records_time_corrected_total", "counter", "Suspect-time "
     "records replaced by a corrected copy."),
    ("records_merged", "records_merged_total", "counter", "Records whose full copy came over "
     "IP after a narrowband copy, which it replaced."),
    ("samples_aggregated", "samples_aggregated_total", "counter", "Readings folded into the "
     "1m/1h aggregates."),
    ("narrowband_records", "narrowband_records_total", "counter", "Alarm records stored from "
     "narrowband frames (the full copy over IP merges into them)."),
    ("narrowband_port_open", "narrowband_port_open", "gauge", "1 while central's narrowband "
     "radio port is open."),
    ("narrowband_port_failures", "narrowband_port_failures_total", "counter", "Times the "
     "narrowband radio port could not be opened or was lost."),
)
# (field, metric name, label, help) for the counts by a label.
LABELLED = (
    ("purged", "purged_rows_total", "table", "Rows deleted by retention, by table."),
    ("decode_errors", "decode_errors_total", "class", "Bad messages dropped, by error class."),
    ("messages_rejected", "messages_rejected_total", "reason", "Ingested messages dropped "
     "whole, by reason."),
    ("records_rejected", "records_rejected_total", "reason", "Records refused inside good "
     "batches (acked, counted as reported lost), by reason."),
    ("attrs_rejected", "attrs_rejected_total", "reason", "Stored records whose attrs break "
     "their contract (alarm transitions, outbox reports): kept, acked, they move no alarm "
     "and no loss count; by reason."),
    ("narrowband_received", "narrowband_received_total", "kind", "Narrowband frames accepted, "
     "by kind."),
    ("narrowband_rejected", "narrowband_rejected_total", "reason", "Narrowband messages "
     "dropped, by reason."),
)


@dataclass(frozen=True, slots=True)
class GatewayLag:
    """One gateway as the last `refresh()` saw it."""

    gw: str
    last_seen_ms: int | None
    backlog: int | None  # what its last state message reported


@dataclass
class Metrics:
    batches: int = 0
    commits: int = 0
    records_inserted: int = 0
    records_duplicate: int = 0
    acks_published: int = 0
    acks_failed: int = 0
    states: int = 0
    births: int = 0
    write_failures: int = 0
    mqtt_connects: int = 0
    mqtt_connected: bool = False
    records_clock_suspect: int = 0
    records_time_corrected: int = 0
    records_merged: int = 0  # IP copies that replaced a narrowband copy (also duplicates)
    samples_aggregated: int = 0
    # rows deleted by retention, by table
    purged: Counter[str] = field(default_factory=Counter)
    # bad input by error class name, e.g. {"MalformedEnvelopeError": 3, "TopicError": 1}
    decode_errors: Counter[str] = field(default_factory=Counter)
    # ingest refusals by reason (protocols.limits.Reason and central.ingest.subscriber's own): whole
    # messages dropped, and single records of otherwise good batches (refused and acked)
    messages_rejected: Counter[str] = field(default_factory=Counter)
    records_rejected: Counter[str] = field(default_factory=Counter)
    # stored records whose attrs break their contract (central.ingest.rejects.count_bad_attrs)
    attrs_rejected: Counter[str] = field(default_factory=Counter)
    # narrowband receiver (central.narrowband.receiver): frames by kind, rejects by reason, the port
    narrowband_received: Counter[str] = field(default_factory=Counter)
    narrowband_rejected: Counter[str] = field(default_factory=Counter)
    narrowband_records: int = 0
    narrowband_port_open: bool = False
    narrowband_port_failures: int = 0

    # read from storage by `refresh()` just before each render (GET /metrics): per gateway,
    # active alarms by (level, ack state), commands by state
    gateways: tuple[GatewayLag, ...] = ()
    alarms_active: tuple[tuple[int, str, int], ...] = ()
    command_states: tuple[tuple[str, int], ...] = ()

    def count_error(self, error_class: str) -> None:
        self.decode_errors[error_class] += 1

    def __post_init__(self) -> None:
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_FieldsCollector(self))
        self._write_seconds = Histogram(
            "batch_write_seconds", "Seconds per ingest write transaction (the batches of one "
            "drain, committed with fsync) before their acks go out.", namespace=PREFIX,
            buckets=WRITE_BUCKETS, registry=self._registry)

    def observe_write(self, seconds: float) -> None:
        """One ingest write transaction took `seconds` (central.ingest.subscriber times it)."""
        self._write_seconds.observe(seconds)

    async def refresh(self, storage: Storage) -> None:
        """Read what only the database knows (each gateway's last contact and backlog)."""
        self.gateways = tuple(GatewayLag(g.gw, g.last_seen_ms, g.backlog)
                              for g in await storage.list_gateways())
        try:
            alarms = await storage.run(_alarm_counts, write=False)
            commands = await storage.run(_command_counts, write=False)
        except CentralError:
            return  # the numbers of the last good refresh stay; the endpoint still answers
        self.alarms_active = tuple((int(lv), str(ack), int(n)) for lv, ack, n in alarms)
        self.command_states = tuple((str(state), int(n)) for state, n in commands)

    def render(self) -> str:
        """The Prometheus text format (version 0.0.4)."""
        return generate_latest(self._registry).decode()


class _FieldsCollector(Collector):
    """The plain fields of one `Metrics`, as families, read at each render."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        for attr, name, kind, help_ in SCALARS:
            value = float(getattr(self._m, attr))
            build = counter if kind == "counter" else gauge
            yield build(f"{PREFIX}_{name}", help_, value)
        for attr, name, label, help_ in LABELLED:
            counts: Counter[str] = getattr(self._m, attr)
            if attr in ("messages_rejected", "records_rejected"):
                # Every ingest refusal reason from 0, so rate() and alerts see it from the start.
                seeded: Counter[str] = Counter({str(r): 0 for r in Reason})
                seeded.update(counts)  # update() keeps zeros, `+` would drop them
                counts = seeded
            yield counter_by(f"{PREFIX}_{name}", help_, label, counts)
        yield from self._gateways()

    def _gateways(self) -> Iterator[Metric]:
        now_s = time.time()
        lag = GaugeMetricFamily(f"{PREFIX}_gateway_last_seen_age_seconds", "Seconds since "
                                "central last heard from each gateway (its lag).", labels=["gw"])
        backlog = GaugeMetricFamily(f"{PREFIX}_gateway_backlog_records", "Unsent records each "
                                    "gateway reported in its last state message.", labels=["gw"])
        for g in self._m.gateways:
            if g.last_seen_ms is not None:
                lag.add_metric([g.gw], max(0.0, now_s - g.last_seen_ms / 1000))
            if g.backlog is not None:
                backlog.add_metric([g.gw], float(g.backlog))
        yield from (lag, backlog)
        alarms = GaugeMetricFamily(f"{PREFIX}_alarms_active", "Active alarms by level and "
                                   "acknowledgement.", labels=["level", "ack"])
        for level, ack, n in self._m.alarms_active:
            alarms.add_metric([str(level), ack], float(n))
        yield alarms
        commands = GaugeMetricFamily(f"{PREFIX}_commands", "Commands by state (queued, sent, "
                                     "done, failed, expired, ...).", labels=["state"])
        for state, n in self._m.command_states:
            commands.add_metric([state], float(n))
        yield commands


def _alarm_counts() -> Program[Rows]:
    rows = yield Sql("SELECT level, ack_state, count(*) FROM alarms WHERE state = 'active'"
                     " GROUP BY level, ack_state")
    return rows


def _command_counts() -> Program[Rows]:
    rows = yield Sql("SELECT state, count(*) FROM commands GROUP BY state")
    return rows
