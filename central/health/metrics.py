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

import enum
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import Field, dataclass, field, fields
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from central import CentralError
from central.alarms.lifecycle import AckState
from central.storage.program import Program, Rows, Sql
from protocols.command_results import CommandState
from protocols.limits import Reason
from runtime.metrics import counter, counter_by, gauge
from runtime.mqtt_refusal import Refusal

if TYPE_CHECKING:
    from central.storage import Storage

PREFIX = "fieldlink_central"
# Seconds for one ingest write transaction (a group of batches), fsync included.
ALARM_LEVELS = (1, 2)  # 一级, 二级 (DESIGN.md §7)
WRITE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _counter(help_: str) -> int:
    """A plain field rendered as the counter `{PREFIX}_{field}_total`."""
    return field(default=0, metadata={"kind": "counter", "help": help_})


def _gauge(help_: str) -> bool:
    """A plain field rendered as the gauge `{PREFIX}_{field}` (1 or 0)."""
    return field(default=False, metadata={"kind": "gauge", "help": help_})


def _by(label: str, help_: str, name: str | None = None) -> Counter[str]:
    """Counts by `label`, rendered as the counter `{PREFIX}_{name}`, by default
    `{field}_total`."""
    return field(default_factory=Counter,
                 metadata={"kind": "labelled", "label": label, "help": help_, "name": name})


class RefusedKind(enum.StrEnum):
    """What a refused message was: the label of `Metrics.retired_messages`."""

    STATE = "state"
    BIRTH = "birth"
    DATA = "data"
    RADIO = "radio"  # a narrowband frame (alarms, a heartbeat, 叫应 acks)


@dataclass(frozen=True, slots=True)
class GatewayLag:
    """One gateway as the last `refresh()` saw it."""

    gw: str
    last_seen_ms: int | None
    backlog: int | None  # what its last state message reported


@dataclass
class Metrics:
    batches: int = _counter("Data batches written and acknowledged.")
    commits: int = _counter("Ingest write transactions committed.")
    records_inserted: int = _counter("Records newly stored (the ingest rate is its rate()).")
    records_duplicate: int = _counter("Records received again and already held.")
    acks_published: int = _counter("down/ack messages published.")
    acks_failed: int = _counter("down/ack publishes that failed (the gateway sends those "
                                "records again).")
    states: int = _counter("Gateway state messages stored.")
    births: int = _counter("Gateway birth messages stored.")
    write_failures: int = _counter("Write transactions rolled back.")
    mqtt_connects: int = _counter("Successful MQTT connections.")
    mqtt_connected: bool = _gauge("1 while connected to the broker.")
    # runtime.mqtt_refusal.Refusal: connack, certificate (revoked or untrusted), tls
    mqtt_connect_refusals: Counter[str] = _by("cause", "Connect attempts the broker refused, "
                                              "by cause.")
    records_clock_suspect: int = _counter("Records stored with a time central judged "
                                          "implausible (future or before 2020).")
    records_time_corrected: int = _counter("Suspect-time records replaced by a corrected copy.")
    records_merged: int = _counter("Records whose full copy came over IP after a narrowband "
                                   "copy, which it replaced.")  # also counted as duplicates
    samples_aggregated: int = _counter("Readings folded into the 1m/1h aggregates.")
    purged: Counter[str] = _by("table", "Rows deleted by retention, by table.",
                               name="purged_rows_total")
    # e.g. {"MalformedEnvelopeError": 3, "TopicError": 1}
    decode_errors: Counter[str] = _by("class", "Bad messages dropped, by error class.")
    # ingest refusals by reason (protocols.limits.Reason and central.ingest.subscriber's own): whole
    # messages dropped, and single records of otherwise good batches (refused and acked)
    messages_rejected: Counter[str] = _by("reason", "Ingested messages dropped whole, by "
                                          "reason.")
    records_rejected: Counter[str] = _by("reason", "Records refused inside good batches "
                                         "(acked, counted as reported lost), by reason.")
    # central.ingest.rejects.count_bad_attrs
    attrs_rejected: Counter[str] = _by("reason", "Stored records whose attrs break their "
                                       "contract (alarm transitions, outbox reports): kept, "
                                       "acked, they move no alarm and no loss count; by reason.")
    # narrowband receiver (central.narrowband.receiver): frames by kind, rejects by reason, the port
    narrowband_received: Counter[str] = _by("kind", "Narrowband frames accepted, by kind.")
    narrowband_rejected: Counter[str] = _by("reason", "Narrowband messages dropped, by reason.")
    narrowband_records: int = _counter("Alarm records stored from narrowband frames (the full "
                                       "copy over IP merges into them).")
    # the downlink (central.narrowband.downlink): the terminal's answers to warning segments
    narrowband_downlink: Counter[str] = _by("result", "Downlink warning segments answered by "
                                            "central's terminal: accepted or refused.")
    narrowband_port_open: bool = _gauge("1 while central's narrowband radio port is open.")
    narrowband_port_failures: int = _counter("Times the narrowband radio port could not be "
                                             "opened or was lost.")
    # central.identity.retire.RetiredGate: ingest and the radio receiver then check against
    # the list last read (logged once per outage)
    retired_list_unreadable: int = _counter("Times the retired gateways could not be re-read "
                                            "for a message check.")
    # its refusals (also in the retired gateways' rows, which name the gateway: no gw label);
    # not among the rejections, as the messages are not bad: the gateway should be silent
    retired_messages: Counter[str] = _by("kind", "Messages of retired gateways refused, by "
                                         "kind (state, birth, data, radio): a decommissioned "
                                         "gateway still talking.")

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
        for f in fields(self._m):
            kind = f.metadata.get("kind")
            if kind == "counter":
                yield counter(f"{PREFIX}_{f.name}_total", f.metadata["help"],
                              float(getattr(self._m, f.name)))
            elif kind == "gauge":
                yield gauge(f"{PREFIX}_{f.name}", f.metadata["help"],
                            float(getattr(self._m, f.name)))
        for f in fields(self._m):
            if f.metadata.get("kind") == "labelled":
                yield self._labelled(f)
        yield from self._gateways()

    def _labelled(self, f: Field[Counter[str]]) -> Metric:
        counts: Counter[str] = getattr(self._m, f.name)
        # Every ingest refusal reason, connect refusal cause and retired message kind from 0,
        # so rate() and alerts see each from the start.
        seeds = {"messages_rejected": Reason, "records_rejected": Reason,
                 "mqtt_connect_refusals": Refusal, "retired_messages": RefusedKind}
        if f.name in seeds:
            seeded: Counter[str] = Counter({str(r): 0 for r in seeds[f.name]})
            seeded.update(counts)  # update() keeps zeros, `+` would drop them
            counts = seeded
        name = f.metadata["name"] or f"{f.name}_total"
        return counter_by(f"{PREFIX}_{name}", f.metadata["help"], f.metadata["label"], counts)

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
        # Every level x ack state and every command state from 0: a series that appears only
        # with its first alarm or command would be invisible to rate() and to alerting rules.
        active = {(str(level), str(ack)): 0.0 for level in ALARM_LEVELS for ack in AckState}
        active |= {(str(level), ack): float(n) for level, ack, n in self._m.alarms_active}
        alarms = GaugeMetricFamily(f"{PREFIX}_alarms_active", "Active alarms by level and "
                                   "acknowledgement.", labels=["level", "ack"])
        for (level, ack), n in sorted(active.items()):
            alarms.add_metric([level, ack], n)
        yield alarms
        states = {str(state): 0.0 for state in CommandState}
        states |= {state: float(n) for state, n in self._m.command_states}
        commands = GaugeMetricFamily(f"{PREFIX}_commands", "Commands by state (pending, sent, "
                                     "received, executing, succeeded, failed, ...).",
                                     labels=["state"])
        for state, n in sorted(states.items()):
            commands.add_metric([state], n)
        yield commands


def _alarm_counts() -> Program[Rows]:
    rows = yield Sql("SELECT level, ack_state, count(*) FROM alarms WHERE state = 'active'"
                     " GROUP BY level, ack_state")
    return rows


def _command_counts() -> Program[Rows]:
    rows = yield Sql("SELECT state, count(*) FROM commands GROUP BY state")
    return rows
